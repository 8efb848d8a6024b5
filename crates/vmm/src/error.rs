//! The VMM's errors: each is one line for the user.

/// Errors building or running a VM; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `/dev/kvm` unusable.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(String),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM setup failed: {what}: {err}")]
    KvmSetup {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    /// A file named in the config could not be opened.
    #[error("cannot read {what} {path}: {err}")]
    File {
        /// kernel, initrd, ...
        what: &'static str,
        /// Its path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// Kernel loading failed.
    #[error("cannot boot kernel {path}: {err}")]
    Boot {
        /// The kernel path.
        path: String,
        /// The error.
        err: arch::boot::BootError,
    },
    /// Setting up the machine failed.
    #[error("{0}")]
    Setup(String),
}

/// Maps a KVM ioctl's error during set-up to a [`VmmError`] saying what was being done.
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |err| VmmError::KvmSetup { what, err }
}

/// Maps any set-up failure to [`VmmError::Setup`].
pub fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}
