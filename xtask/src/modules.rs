//! Kernel modules from an unpacked kernel package: name index, dependency closure (from each
//! module's `.modinfo` `depends=` field, since the package ships no `modules.dep`), and
//! decompression of `.ko.xz`/`.ko.zst`/`.ko.gz` so busybox `insmod` can load them.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One module file.
#[derive(Debug, Clone)]
pub struct Module {
    /// Module name (`kvm_amd`).
    pub name: String,
    /// Path relative to the modules directory (`kernel/arch/x86/kvm/kvm-amd.ko`).
    pub rel: String,
    /// Absolute host path.
    pub path: PathBuf,
}

/// The modules of one kernel release.
pub struct ModuleTree {
    pub root: PathBuf,
    by_name: BTreeMap<String, Module>,
}

/// Module name from a file name: strip `.ko[.xz|.zst|.gz]`, dashes become underscores.
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

impl ModuleTree {
    /// Indexes every module under `root` (a `lib/modules/<release>` directory).
    pub fn scan(root: &Path) -> Result<ModuleTree> {
        let mut by_name = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
            {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if let Some(name) = module_name(&file_name) {
                    let rel = path
                        .strip_prefix(root)
                        .unwrap_or(&path)
                        .to_string_lossy()
                        .into_owned();
                    by_name.insert(name.clone(), Module { name, rel, path });
                }
            }
        }
        if by_name.is_empty() {
            bail!("no kernel modules under {}", root.display());
        }
        Ok(ModuleTree {
            root: root.to_path_buf(),
            by_name,
        })
    }

    /// Looks a module up by name (dashes or underscores).
    pub fn get(&self, name: &str) -> Result<&Module> {
        self.by_name
            .get(&name.replace('-', "_"))
            .with_context(|| format!("module {name} not found under {}", self.root.display()))
    }

    /// All modules whose relative path starts with one of `prefixes`.
    pub fn under(&self, prefixes: &[&str]) -> Vec<&Module> {
        self.by_name
            .values()
            .filter(|m| prefixes.iter().any(|p| m.rel.starts_with(p)))
            .collect()
    }

    /// `names` and everything they depend on, dependencies first (a valid insmod order).
    pub fn load_order(&self, names: &[&str]) -> Result<Vec<&Module>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in names {
            self.visit(name, &mut done, &mut BTreeSet::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit<'a>(
        &'a self,
        name: &str,
        done: &mut BTreeSet<String>,
        in_progress: &mut BTreeSet<String>,
        order: &mut Vec<&'a Module>,
    ) -> Result<()> {
        let module = self.get(name)?;
        if done.contains(&module.name) {
            return Ok(());
        }
        if !in_progress.insert(module.name.clone()) {
            bail!("module dependency cycle through {}", module.name);
        }
        for dep in dependencies(&load(&module.path)?)? {
            self.visit(&dep, done, in_progress, order)?;
        }
        in_progress.remove(&module.name);
        done.insert(module.name.clone());
        order.push(module);
        Ok(())
    }
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
pub fn load(path: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.to_string_lossy();
    let mut out = Vec::new();
    let result = if name.ends_with(".ko.xz") {
        lzma_rust2::XzReader::new(data.as_slice(), true).read_to_end(&mut out)
    } else if name.ends_with(".ko.zst") {
        ruzstd::decoding::StreamingDecoder::new(data.as_slice())
            .map_err(std::io::Error::other)
            .and_then(|mut d| d.read_to_end(&mut out))
    } else if name.ends_with(".ko.gz") {
        flate2::read::GzDecoder::new(data.as_slice()).read_to_end(&mut out)
    } else {
        return Ok(data);
    };
    result.with_context(|| format!("cannot decompress {}", path.display()))?;
    Ok(out)
}

/// The `depends=` list from an ELF64 module's `.modinfo` section.
pub fn dependencies(ko: &[u8]) -> Result<Vec<String>> {
    let modinfo = elf_section(ko, ".modinfo").context("module has no .modinfo section")?;
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// Finds a section by name in a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if !elf.starts_with(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None;
    }
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    let shstrndx = usize::from(u16_at(0x3e)?);
    let section = |i: usize| -> Option<(u32, &'a [u8])> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(base)?;
        let offset = usize::try_from(u64_at(base + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(base + 0x20)?).ok()?;
        Some((name, elf.get(offset..offset.checked_add(size)?)?))
    };
    let (_, names) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_off, data) = section(i)?;
        let name = names.get(name_off as usize..)?;
        let end = name.iter().position(|&b| b == 0)?;
        (&name[..end] == wanted.as_bytes()).then_some(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(module_name("kvm-amd.ko").as_deref(), Some("kvm_amd"));
        assert_eq!(
            module_name("virtio_blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(elf_section(b"\x7fELF\x02\x01garbage", ".modinfo").is_none());
        assert!(dependencies(&[0u8; 100]).is_err());
    }
}
