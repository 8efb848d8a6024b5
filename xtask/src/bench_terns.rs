//! The tern variants a benchmark runs side by side with QEMU: the tern measured and, with
//! `--baseline PATH` and/or `--baseline-args "ARGS"`, a baseline in the same runs (an earlier
//! tern binary, or the same binary with other `tern run` arguments, e.g. `--seccomp off`),
//! reported in `baseline` and `tern/baseline` columns. Shared by bench-probe, bench-snapshot,
//! bench-blk, bench-net and bench-migrate.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The options that choose the tern variants, flattened into each benchmark's command.
#[derive(clap::Args)]
pub(crate) struct TernOpts {
    /// tern binary to measure [default: build target/x86_64-unknown-linux-gnu/release/tern].
    #[arg(long)]
    tern: Option<PathBuf>,
    /// A baseline tern binary (an earlier one) to run in the same runs (extra columns
    /// `baseline` and `tern/baseline`).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Extra `tern run` arguments for the baseline, split on white space (e.g. "--seccomp off");
    /// without --baseline the baseline is the measured tern binary itself.
    #[arg(long, allow_hyphen_values = true)]
    baseline_args: Option<String>,
}

/// One tern variant: its name in the report, its binary and the extra `tern run` arguments it
/// gets.
pub(crate) struct Tern {
    pub name: &'static str,
    pub program: PathBuf,
    pub extra: Vec<String>,
}

impl Tern {
    /// The `tern run …` command line `args` (starting with `run`) with this variant's extra
    /// arguments added at the end.
    pub fn args(&self, args: &[String]) -> Vec<String> {
        args.iter().chain(&self.extra).cloned().collect()
    }

    /// The variant for a report: its binary and extra arguments.
    fn describe(&self) -> String {
        let mut s = self.program.display().to_string();
        if !self.extra.is_empty() {
            s += &format!(" with `{}`", self.extra.join(" "));
        }
        s
    }
}

impl TernOpts {
    /// Fails (before any build) if `--baseline` names a missing file.
    pub fn check(&self) -> Result<()> {
        match &self.baseline {
            Some(b) if !b.is_file() => bail!("baseline binary {} does not exist", b.display()),
            _ => Ok(()),
        }
    }

    /// The variants: `tern` (built unless `--tern` names it), then `baseline` if either
    /// baseline option is given.
    pub fn terns(&self) -> Result<Vec<Tern>> {
        self.check()?;
        let tern = match &self.tern {
            Some(t) => t.clone(),
            None => crate::ci::build_tern()?,
        };
        Ok(terns(
            &tern,
            self.baseline.as_deref(),
            self.baseline_args.as_deref(),
        ))
    }
}

/// The variants of `tern` and an optional baseline: a baseline binary, extra arguments, or
/// both (the measured binary with `baseline_args` alone).
pub(crate) fn terns(
    tern: &Path,
    baseline: Option<&Path>,
    baseline_args: Option<&str>,
) -> Vec<Tern> {
    let mut v = vec![Tern {
        name: "tern",
        program: tern.to_path_buf(),
        extra: Vec::new(),
    }];
    if baseline.is_some() || baseline_args.is_some() {
        v.push(Tern {
            name: "baseline",
            program: baseline.unwrap_or(tern).to_path_buf(),
            extra: baseline_args
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        });
    }
    v
}

/// Whether the variants include a baseline.
pub(crate) fn has_baseline(terns: &[Tern]) -> bool {
    terns.len() > 1
}

/// The report's line on the variants when there is a baseline.
pub(crate) fn describe(terns: &[Tern]) -> Option<String> {
    let [tern, baseline] = terns else {
        return None;
    };
    Some(format!(
        "tern {}; baseline {} (same runs, the two alternating which goes first)",
        tern.describe(),
        baseline.describe()
    ))
}

/// The order in which run number `run` starts `n` tern variants: rotated from run to run, so
/// that no variant always goes first (with one variant, always just it).
pub(crate) fn tern_order(n: usize, run: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + run) % n)
}

/// Run number `run` of every variant, `f` started in [`tern_order`]; the results in `terns`
/// order.
pub(crate) fn run_terns<T>(
    terns: &[Tern],
    run: usize,
    mut f: impl FnMut(&Tern) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(terns.len());
    for i in tern_order(terns.len(), run) {
        let t = &terns[i];
        let r = f(t).with_context(|| format!("{} {}", t.name, t.program.display()))?;
        out.push((i, r));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, r)| r).collect())
}

/// The `baseline` and `tern/baseline` column heads (empty without a baseline), `width` wide
/// for the values.
pub(crate) fn baseline_heads(terns: &[Tern], width: usize) -> String {
    if has_baseline(terns) {
        format!(" {:>width$} {:>14}", "baseline", "tern/baseline")
    } else {
        String::new()
    }
}

/// A row's `baseline` and `tern/baseline` cells (empty without a baseline); `median(i)` is the
/// row's median for variant `i`.
pub(crate) fn baseline_cells(
    terns: &[Tern],
    width: usize,
    precision: usize,
    median: impl Fn(usize) -> f64,
) -> String {
    if has_baseline(terns) {
        let (t, b) = (median(0), median(1));
        format!(" {b:>width$.precision$} {:>14.3}", t / b)
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tern_order_alternates() {
        let order = |n, run| tern_order(n, run).collect::<Vec<_>>();
        assert_eq!(order(1, 0), [0]);
        assert_eq!(order(1, 1), [0]);
        assert_eq!(order(2, 0), [0, 1]);
        assert_eq!(order(2, 1), [1, 0]);
        assert_eq!(order(2, 2), [0, 1]);
    }

    #[test]
    fn baseline_variants() {
        let t = Path::new("/t/tern");
        let b = Path::new("/b/tern");
        let names = |v: &[Tern]| v.iter().map(|x| x.name).collect::<Vec<_>>();
        assert_eq!(names(&terns(t, None, None)), ["tern"]);
        let v = terns(t, None, Some(" --seccomp  off "));
        assert_eq!(names(&v), ["tern", "baseline"]);
        assert_eq!(v[1].program, t);
        assert_eq!(v[1].extra, ["--seccomp", "off"]);
        assert!(v[0].extra.is_empty());
        let v = terns(t, Some(b), None);
        assert_eq!(v[1].program, b);
        assert!(v[1].extra.is_empty());
        let run = vec!["run".to_string(), "--cpus".into(), "1".into()];
        assert_eq!(
            terns(t, Some(b), Some("--seccomp off"))[1].args(&run),
            ["run", "--cpus", "1", "--seccomp", "off"]
        );
        assert_eq!(
            describe(&terns(t, None, Some("--seccomp off"))).unwrap(),
            "tern /t/tern; baseline /t/tern with `--seccomp off` (same runs, the two \
             alternating which goes first)"
        );
        assert!(describe(&terns(t, None, None)).is_none());
    }

    #[test]
    fn runs_in_rotated_order_results_in_variant_order() {
        let v = terns(Path::new("/t"), None, Some(""));
        let mut started = Vec::new();
        let r = run_terns(&v, 1, |t| {
            started.push(t.name);
            Ok(t.name.len())
        })
        .unwrap();
        assert_eq!(started, ["baseline", "tern"]);
        assert_eq!(r, [4, 8]);
    }
}
