//! The bucket: client construction, object keys, and ranged, resumable, parallel downloads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{Error, Result};

/// How to reach the bucket. Secrets are kept out of `Debug`.
#[derive(Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Extra CA certificates (PEM) to trust, for S3-compatible stores with a private CA.
    pub ca_file: Option<PathBuf>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("ca_file", &self.ca_file)
            .field("static_credentials", &self.access_key_id.is_some())
            .finish()
    }
}

/// How downloads are split and retried.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub part_size: u64,
    pub concurrency: usize,
    pub max_attempts: u32,
    pub backoff: Duration,
}

impl Default for Transfer {
    fn default() -> Self {
        Self { part_size: 4 << 20, concurrency: 8, max_attempts: 6, backoff: Duration::from_millis(200) }
    }
}

/// Build an S3 client: static keys when given, else the default chain (IRSA, instance roles…).
pub async fn client(options: &S3Options) -> Result<Client> {
    let mut trust = tls::TrustStore::default();
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path).map_err(|e| Error::io("reading the S3 CA file", path, e))?;
        trust = trust.with_pem_certificate(pem);
    }
    let context = tls::TlsContext::builder()
        .with_trust_store(trust)
        .build()
        .map_err(|e| Error::Config(format!("S3 TLS settings: {e}")))?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(context)
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let (Some(id), Some(secret)) = (&options.access_key_id, &options.secret_access_key) {
        loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "nvidia-installer-secret"));
    }
    let shared = loader.load().await;
    let mut config = aws_sdk_s3::config::Builder::from(&shared)
        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(30))
                .build(),
        );
    if shared.region().is_none() {
        config = config.region(Region::new("us-east-1"));
    }
    if let Some(endpoint) = &options.endpoint {
        config = config.endpoint_url(endpoint).force_path_style(true);
    }
    Ok(Client::from_conf(config.build()))
}

/// The object keys of one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleKeys {
    pub archive: String,
    pub manifest: String,
    pub legacy: String,
}

impl BundleKeys {
    pub fn new(gardenlinux: &str, kernel: &str, driver: &str) -> Self {
        let archive = format!("gardenlinux-{gardenlinux}/{kernel}/nvidia-{driver}.tar.zst");
        Self {
            manifest: format!("{archive}.manifest.json"),
            archive,
            legacy: format!("gardenlinux-{gardenlinux}-nvidia-{driver}.tar.gz"),
        }
    }
}

/// Whether an S3 failure is worth another attempt.
fn transient<E: ProvideErrorMetadata>(error: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> bool {
    match error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            status >= 500 || status == 429 || matches!(service.err().code(), Some("SlowDown" | "RequestTimeout"))
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    }
}

fn status<E>(error: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> Option<u16> {
    match error {
        SdkError::ServiceError(service) => Some(service.raw().status().as_u16()),
        _ => None,
    }
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    error: &SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> String {
    match error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let message = service.err().message().unwrap_or_default();
            format!("HTTP {} {code} {message}", service.raw().status().as_u16()).trim().to_owned()
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            text
        }
    }
}

fn backoff(transfer: &Transfer, attempt: u32) -> Duration {
    let base = transfer.backoff.saturating_mul(1 << attempt.min(6));
    base + Duration::from_millis(fastrand::u64(0..=base.as_millis() as u64 / 2 + 1))
}

/// Size and ETag of an object; `None` when it does not exist.
pub async fn head(
    client: &Client,
    bucket: &str,
    key: &str,
    transfer: &Transfer,
) -> Result<Option<(u64, Option<String>)>> {
    let mut attempt = 0;
    loop {
        match client.head_object().bucket(bucket).key(key).send().await {
            Ok(out) => {
                let size = out.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                return Ok(Some((size, out.e_tag().map(str::to_owned))));
            }
            Err(error) if status(&error) == Some(404) => return Ok(None),
            Err(error) if transient(&error) && attempt + 1 < transfer.max_attempts => {
                warn!(bucket, key, error = %describe(&error), attempt, "HEAD failed; retrying");
                tokio::time::sleep(backoff(transfer, attempt)).await;
                attempt += 1;
            }
            Err(error) => return Err(Error::s3("HEAD", bucket, key, describe(&error))),
        }
    }
}

/// A small object in full (a manifest); `None` when it does not exist.
pub async fn get_small(
    client: &Client,
    bucket: &str,
    key: &str,
    limit: u64,
    transfer: &Transfer,
) -> Result<Option<Vec<u8>>> {
    let Some((size, etag)) = head(client, bucket, key, transfer).await? else { return Ok(None) };
    if size > limit {
        return Err(Error::s3("GET", bucket, key, format!("{size} bytes is more than the {limit} expected")));
    }
    if size == 0 {
        return Ok(Some(Vec::new()));
    }
    let bytes = get_range(client, bucket, key, 0, size - 1, etag.as_deref(), transfer).await?;
    Ok(Some(bytes.to_vec()))
}

/// Bytes `first..=last` of an object, retried with backoff, resuming after what already arrived.
pub async fn get_range(
    client: &Client,
    bucket: &str,
    key: &str,
    first: u64,
    last: u64,
    etag: Option<&str>,
    transfer: &Transfer,
) -> Result<Bytes> {
    let want = usize::try_from(last - first + 1).map_err(|_| Error::s3("GET", bucket, key, "part too large".into()))?;
    let mut buffer = BytesMut::with_capacity(want);
    let mut attempt = 0u32;
    loop {
        let from = first + buffer.len() as u64;
        let mut request = client.get_object().bucket(bucket).key(key).range(format!("bytes={from}-{last}"));
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        let failure = match request.send().await {
            Ok(out) => {
                let mut body = out.body;
                let mut cut = None;
                loop {
                    match body.try_next().await {
                        Ok(Some(chunk)) => {
                            if buffer.len() + chunk.len() > want {
                                return Err(Error::s3(
                                    "GET",
                                    bucket,
                                    key,
                                    format!("bytes={from}-{last} returned more than asked"),
                                ));
                            }
                            buffer.extend_from_slice(&chunk);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            cut = Some(format!("body cut short: {error}"));
                            break;
                        }
                    }
                }
                if buffer.len() == want {
                    return Ok(buffer.freeze());
                }
                cut.unwrap_or_else(|| format!("body ended after {} of {want} bytes", buffer.len()))
            }
            Err(error) if transient(&error) => describe(&error),
            Err(error) => {
                let reason = match status(&error) {
                    Some(412) => "the object changed while it was being downloaded".to_owned(),
                    _ => describe(&error),
                };
                return Err(Error::s3("GET", bucket, key, reason));
            }
        };
        attempt += 1;
        if attempt >= transfer.max_attempts {
            return Err(Error::s3("GET", bucket, key, format!("gave up after {attempt} attempts: {failure}")));
        }
        warn!(bucket, key, range = %format!("{from}-{last}"), error = %failure, attempt, "transient S3 failure; resuming");
        tokio::time::sleep(backoff(transfer, attempt)).await;
    }
}

/// Download `size` bytes of an object in parts, in parallel, and send them in order to `sink`.
/// At most `concurrency` parts are in memory. Returns the number of bytes sent.
pub async fn download(
    client: &Client,
    bucket: &str,
    key: &str,
    size: u64,
    etag: Option<&str>,
    transfer: &Transfer,
    sink: mpsc::Sender<Bytes>,
) -> Result<u64> {
    let part = transfer.part_size.max(64 * 1024);
    let parts: Vec<(u64, u64)> = (0..size.div_ceil(part)).map(|i| (i * part, ((i + 1) * part).min(size) - 1)).collect();
    let mut stream = futures::stream::iter(parts)
        .map(|(first, last)| get_range(client, bucket, key, first, last, etag, transfer))
        .buffered(transfer.concurrency.max(1));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut reported = Instant::now();
    while let Some(bytes) = stream.next().await {
        let bytes = bytes?;
        sent += bytes.len() as u64;
        if sink.send(bytes).await.is_err() {
            // The consumer stopped (it has its own error to report).
            return Ok(sent);
        }
        if reported.elapsed() >= Duration::from_secs(2) || sent == size {
            reported = Instant::now();
            let elapsed = started.elapsed().as_secs_f64().max(1e-3);
            let rate = sent as f64 / elapsed;
            let eta = if rate > 0.0 { (size - sent) as f64 / rate } else { 0.0 };
            info!(
                bucket,
                key,
                bytes = sent,
                total = size,
                rate_mb_s = format!("{:.1}", rate / 1e6),
                eta_s = format!("{eta:.0}"),
                "downloading"
            );
        }
    }
    Ok(sent)
}
