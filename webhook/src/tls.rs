//! Serving certificate: loaded from PEM files, reloaded when they change, without dropping
//! connections (new handshakes get the new certificate, open connections keep theirs).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Where the certificate chain and key live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded certificate and the digest of the files it came from.
#[derive(Debug)]
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub digest: [u8; 32],
    /// When the leaf certificate expires (Unix seconds), when it can be read.
    pub not_after: Option<i64>,
}

impl TlsFiles {
    /// Read both files and build a rustls server config (TLS 1.2 and 1.3, ALPN h2 and http/1.1).
    pub fn load(&self) -> Result<Loaded> {
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let digest: [u8; 32] = Sha256::new().chain_update(&cert_pem).chain_update(&key_pem).finalize().into();
        let config = server_config(&cert_pem, &key_pem, &self.cert, &self.key)?;
        let not_after = std::str::from_utf8(&cert_pem)
            .ok()
            .and_then(|pem| nvidia_certs::read(pem).ok())
            .map(|summary| summary.not_after.unix_timestamp());
        Ok(Loaded { config, digest, not_after })
    }

    /// Digest of the current file contents, or `None` when they cannot be read (mid-swap).
    fn digest(&self) -> Option<[u8; 32]> {
        let cert = std::fs::read(&self.cert).ok()?;
        let key = std::fs::read(&self.key).ok()?;
        Some(Sha256::new().chain_update(cert).chain_update(key).finalize().into())
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::TlsRead { path: path.to_owned(), source })
}

/// Build a server config from PEM bytes; the paths only name the source in errors.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8], cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>> {
    let invalid = |path: &Path, reason: String| Error::TlsInvalid { path: path.to_owned(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| invalid(cert_path, format!("unreadable PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(cert_path, "no CERTIFICATE block".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => invalid(key_path, "no PRIVATE KEY block".to_owned()),
        e => invalid(key_path, format!("unreadable PEM: {e}")),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(cert_path, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(key_path, format!("does not match the certificate or is unsupported: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Poll the files every `interval`; when their contents change and form a valid pair, swap the
/// served certificate. A half-written pair is ignored until it becomes valid.
pub async fn watch(
    files: TlsFiles,
    rustls: RustlsConfig,
    mut digest: [u8; 32],
    interval: Duration,
    expiry: prometheus_client::metrics::gauge::Gauge,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut reported: Option<[u8; 32]> = None;
    loop {
        ticker.tick().await;
        let Some(now) = files.digest() else { continue };
        if now == digest {
            continue;
        }
        match files.load() {
            Ok(loaded) => {
                rustls.reload_from_config(loaded.config);
                digest = loaded.digest;
                expiry.set(loaded.not_after.unwrap_or(0));
                reported = None;
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            Err(error) => {
                if reported != Some(now) {
                    tracing::warn!(%error, "new serving certificate not usable yet; keeping the current one");
                    reported = Some(now);
                }
            }
        }
    }
}
