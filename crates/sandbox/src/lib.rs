//! tern's sandbox: what each of its threads may ask of the kernel (seccomp, per thread role)
//! and which paths tern may reach at all (Landlock).
//!
//! The filters are compiled by the `seccompiler` crate from the allow-lists in [`lists`], when
//! tern is built (build.rs runs [`compile`]); applying them per thread goes through
//! [`lifecycle::threads`], where every thread of tern starts. The call names and the `SIGSYS` report are tern's own: seccompiler compiles
//! filters but neither names calls nor reports violations.

pub mod compile;
pub mod landlock;
pub mod lists;
pub mod seccomp;
mod syscalls;
