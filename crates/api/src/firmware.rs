//! The firmware a VM boots through when it has no kernel: `bios` (SeaBIOS, from Debian's
//! `seabios` package), `uefi`, or the path of a firmware image. The firmware then loads the
//! operating system from the VM's own disks, through their bootloader.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where tern looks for SeaBIOS (`bios`): Debian's `seabios` package, then QEMU's data
/// directory.
pub const BIOS_PATHS: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/bios-256k.bin",
];

/// Where tern looks for OVMF (`uefi`): its code image, and the template of the variable store
/// each VM gets a copy of. Debian's `ovmf` package (the 4 MiB flash layout, Secure Boot off),
/// then QEMU's data directory.
pub const UEFI_PATHS: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/qemu/OVMF_CODE_4M.fd",
        "/usr/share/qemu/OVMF_VARS_4M.fd",
    ),
];

/// The firmware of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Firmware {
    /// SeaBIOS ([`BIOS_PATHS`]): PC BIOS boot from MBR or GPT disks.
    Bios,
    /// UEFI: OVMF ([`UEFI_PATHS`]), with its variables in a flash.
    Uefi,
    /// A flat firmware image with an x86 reset vector, mapped so that it ends at 4 GiB.
    Path(PathBuf),
}

impl Firmware {
    /// The image file to map: the first of [`BIOS_PATHS`] that exists for `bios`, OVMF's code
    /// for `uefi`, the path itself for a path.
    pub fn image(&self) -> Result<PathBuf, String> {
        match self {
            Firmware::Bios => BIOS_PATHS
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    format!(
                        "firmware 'bios': SeaBIOS is not installed (looked for {}; Debian's package is 'seabios')",
                        BIOS_PATHS.join(" and ")
                    )
                }),
            Firmware::Uefi => uefi_files().map(|(code, _)| code),
            Firmware::Path(p) => Ok(p.clone()),
        }
    }
}

/// OVMF's code image and variable store template: the first pair of [`UEFI_PATHS`] where
/// both exist.
pub fn uefi_files() -> Result<(PathBuf, PathBuf), String> {
    UEFI_PATHS
        .iter()
        .map(|(c, v)| (PathBuf::from(c), PathBuf::from(v)))
        .find(|(c, v)| c.exists() && v.exists())
        .ok_or_else(|| {
            let looked: Vec<String> = UEFI_PATHS
                .iter()
                .map(|(c, v)| format!("{c} with {v}"))
                .collect();
            format!(
                "firmware 'uefi': OVMF is not installed (looked for {}; Debian's package is 'ovmf')",
                looked.join(", ")
            )
        })
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Firmware::Bios => f.write_str("bios"),
            Firmware::Uefi => f.write_str("uefi"),
            Firmware::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl FromStr for Firmware {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("firmware: expected bios, uefi or the path of a firmware image".into()),
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            p => Ok(Firmware::Path(PathBuf::from(p))),
        }
    }
}

impl TryFrom<String> for Firmware {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Firmware> for String {
    fn from(f: Firmware) -> String {
        f.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!("bios".parse::<Firmware>(), Ok(Firmware::Bios));
        assert_eq!("uefi".parse::<Firmware>(), Ok(Firmware::Uefi));
        assert_eq!(
            "/x/bios.bin".parse::<Firmware>(),
            Ok(Firmware::Path("/x/bios.bin".into()))
        );
        assert!("".parse::<Firmware>().is_err());
        let j = serde_json::to_string(&Firmware::Bios).unwrap();
        assert_eq!(j, "\"bios\"");
        let f: Firmware = serde_json::from_str("\"./fw.bin\"").unwrap();
        assert_eq!(f, Firmware::Path("./fw.bin".into()));
        match Firmware::Uefi.image() {
            Ok(p) => assert!(p.ends_with("OVMF_CODE_4M.fd"), "{}", p.display()),
            Err(e) => assert!(e.contains("'ovmf'"), "{e}"),
        }
        assert_eq!(Firmware::Path("/a".into()).image(), Ok(PathBuf::from("/a")));
    }
}
