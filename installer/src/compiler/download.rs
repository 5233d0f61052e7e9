//! Fetching a driver source (NVIDIA's `.run`) over HTTPS: the system's CA certificates
//! (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), plain `http://` refused unless allowed, the bytes
//! hashed as they arrive, progress in the log.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::info;

use crate::{Error, Result};

/// How often a long download says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Download `url` into `target`; returns the hex sha256 of what was written.
pub fn download(url: &str, target: &Path, allow_http: bool) -> Result<String> {
    let fail = |reason: String| Error::DriverSource { source_name: url.to_owned(), reason };
    if url.starts_with("http://") && !allow_http {
        return Err(fail(
            "plain http:// is refused: the file is built and run in a privileged container; use https://, or pass --allow-http together with --driver-sha256".to_owned(),
        ));
    }
    // A runtime of its own, on a thread of its own: the compile step runs synchronously, called
    // from async code (the command line, `install --allow-compilation`) or a plain thread.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("starting the download: {e}"))?;
                runtime.block_on(fetch(url, target, allow_http))
            })
            .join()
            .unwrap_or_else(|_| Err("the download thread failed".to_owned()))
    })
    .map_err(fail)
}

async fn fetch(url: &str, target: &Path, allow_http: bool) -> std::result::Result<String, String> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .https_only(!allow_http)
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60));
    let native = rustls_native_certs::load_native_certs();
    if native.certs.is_empty() {
        return Err(format!("no CA certificates found on this system ({:?})", native.errors));
    }
    for cert in native.certs {
        if let Ok(cert) = reqwest::Certificate::from_der(&cert) {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder.build().map_err(|e| format!("HTTPS client: {e}"))?;
    let mut response = client.get(url).send().await.map_err(|e| describe(&e))?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    let total = response.content_length();
    info!(url, bytes = total, "downloading the driver source");
    let mut file = std::fs::File::create(target).map_err(|e| format!("writing {}: {e}", target.display()))?;
    let mut hasher = Sha256::new();
    let (started, mut reported) = (Instant::now(), Instant::now());
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        file.write_all(&chunk).map_err(|e| format!("writing {}: {e}", target.display()))?;
        hasher.update(&chunk);
        received += chunk.len() as u64;
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            let rate = received as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta_s = total.map(|t| (t.saturating_sub(received)) as f64 / rate.max(1.0)).map(|s| s.round() as u64);
            info!(url, received, total, rate_mb_s = rate / 1e6, eta_s, "downloading the driver source");
        }
    }
    if let Some(total) = total.filter(|t| *t != received) {
        return Err(format!("the body ended after {received} of {total} bytes"));
    }
    file.sync_all().map_err(|e| format!("writing {}: {e}", target.display()))?;
    info!(url, bytes = received, elapsed_s = started.elapsed().as_secs_f64(), "driver source downloaded");
    Ok(hex::encode(hasher.finalize()))
}

/// An error with its causes (reqwest's own message omits them).
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}
