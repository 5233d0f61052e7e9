//! `nvidia-webhook`: a mutating admission webhook that gives GPU pods the node's NVIDIA driver.
//!
//! The work is one pure function, [`mutate::mutate`], shared by the HTTPS server
//! ([`admission`], [`server`]) and the offline `inject` command ([`manifest`]).

pub mod admission;
pub mod cli;
pub mod config;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod mutate;
pub mod pod;
pub mod quantity;
pub mod selftest;
pub mod server;
pub mod tls;

pub use config::InjectConfig;
pub use mutate::{Mutation, Outcome, SkipReason, mutate, mutate_view};
pub use pod::PodView;

/// Errors of this crate. Each says what failed and with what.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{list} {container:?} mounts the volume {volume:?}, which nvidia-installer injects read-only from the host; use another volume name"
    )]
    InjectedVolumeReferenced { list: &'static str, container: String, volume: String },
    #[error(
        "ephemeral container {container:?} mounts the volume {volume:?}, which nvidia-installer injects from the host, without readOnly: true"
    )]
    InjectedVolumeWritable { container: String, volume: String },
    #[error("pod annotation {annotation}: {error}")]
    InvalidPin { annotation: String, error: nvidia_contract::NameError },
    #[error("reading TLS material from {path}: {source}")]
    TlsRead { path: std::path::PathBuf, source: std::io::Error },
    #[error("TLS material in {path}: {reason}")]
    TlsInvalid { path: std::path::PathBuf, reason: String },
    #[error("manifest document {index}: {reason}")]
    Manifest { index: usize, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("serving on {addr}: {source}")]
    Serve { addr: std::net::SocketAddr, source: std::io::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
