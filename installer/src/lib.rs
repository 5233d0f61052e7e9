//! `nvidia-installer`: stages the prebuilt NVIDIA driver from S3 onto a node, loads it, marks the
//! node ready, and gates GPU pods (`wait`) until it is; in the compiler instance, builds and
//! publishes the driver bundles.
//!
//! Three roles, one folder each, over one shared format:
//! - [`bundle`]: the bundle format (manifest, archive checks, pack, module info), used by both roles;
//! - [`node`]: the node agent (stage, install, wait, status, gc and the kernel seam);
//! - [`compiler`]: the compiler instance (compile, the FIFO protocol, publish);
//! - [`s3`]: the bucket client both roles use; [`durable`]: fsync, atomic write and rename.
//!
//! [`cli`] declares the command line, [`commands`] runs one function per command; names, host
//! layout and bucket keys come from the contract crate ([`nvidia_contract`]).

pub mod bundle;
pub mod cli;
pub mod commands;
pub mod compiler;
pub mod durable;
pub mod node;
pub mod s3;
pub mod upgrade;

use std::path::{Path, PathBuf};

/// Errors of the installer. Each names the bucket, key, path, module or kernel involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The I/O error is part of the message (not a `source`), so that `{:#}` says it once.
    #[error("{action} {path}: {error}")]
    Io { action: &'static str, path: PathBuf, error: std::io::Error },
    #[error("archive {source_name}: {reason}")]
    Archive { source_name: String, reason: String },
    #[error("archive {source_name} refused: entry {entry:?}: {reason}")]
    Hostile { source_name: String, entry: String, reason: String },
    #[error("manifest {source_name}: {reason}")]
    Manifest { source_name: String, reason: String },
    #[error("{what}: sha256 mismatch: expected {expected}, got {actual}; nothing was published")]
    Checksum { what: String, expected: String, actual: String },
    #[error("no driver bundle in bucket {bucket}: tried {}", tried.join(", "))]
    NotFound { bucket: String, tried: Vec<String> },
    #[error("S3 {operation} s3://{bucket}/{key}: {reason}")]
    S3 { operation: &'static str, bucket: String, key: String, reason: String },
    /// The command line (or its environment) asks for something that cannot be done as asked.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    InvalidName(#[from] nvidia_contract::NameError),
    #[error("driver source {source_name}: {reason}")]
    DriverSource { source_name: String, reason: String },
    #[error("kernel headers {path}: {reason}")]
    KernelHeaders { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Tool { what: String, reason: String },
    #[error("dev container: {0}")]
    DevContainer(String),
    #[error("S3 TLS settings: {0}")]
    S3Tls(String),
    #[error("{what} stopped: {reason}")]
    Stopped { what: &'static str, reason: String },
    #[error("module {module} ({path}): {reason}")]
    Module { module: String, path: PathBuf, reason: String },
    #[error(
        "NVIDIA driver {loaded} is loaded on this node but {wanted} is to be installed: drain the node, then unload the old driver (rmmod nvidia_drm nvidia_modeset nvidia_uvm nvidia) or reboot it"
    )]
    OtherVersionLoaded { loaded: String, wanted: String },
    #[error("device node {path}: {reason}")]
    Device { path: PathBuf, reason: String },
    #[error("nvidia-smi ({path}) failed: {reason}")]
    Smi { path: PathBuf, reason: String },
    /// Another driver stays loaded and serving (the upgrade waits, or failed and was undone).
    #[error("NVIDIA driver {loaded} stays loaded, not {wanted}: {reason}")]
    KeptLoaded { loaded: String, wanted: String, state: Option<crate::upgrade::State>, reason: String },
    #[error("driver upgrade: {reason}")]
    Upgrade { reason: String },
    #[error("{0}")]
    WaitTimeout(String),
    #[error("the NVIDIA driver is not ready: {0}")]
    NotReady(String),
    #[error("encoding {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("building the modules for kernel {kernel} failed: {error} (full log: {log})")]
    Build { kernel: String, error: String, log: PathBuf },
    #[error("patch {patch} does not apply: {reason}")]
    Patch { patch: PathBuf, reason: String },
    #[error("signature of {what}: {reason}")]
    Signature { what: String, reason: String },
    #[error("kernel module flavor: {reason}")]
    Flavor { reason: String },
    #[error("GPU firmware: {reason}")]
    Firmware { reason: String },
    #[error("updating node {node}: {reason}")]
    Node { node: String, reason: String },
}

impl Error {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io { action, path: path.to_owned(), error: source }
    }

    pub fn s3(operation: &'static str, bucket: &str, key: &str, reason: String) -> Self {
        Self::S3 { operation, bucket: bucket.to_owned(), key: key.to_owned(), reason }
    }
}

impl Error {
    /// The process's exit code for this error ([`nvidia_contract::exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::WaitTimeout(_) => nvidia_contract::exit::WAIT_TIMEOUT,
            Error::NotReady(_) => nvidia_contract::exit::NOT_READY,
            _ => nvidia_contract::exit::FAILURE,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
