//! The bucket: client construction, object keys, and ranged, resumable, parallel downloads.

mod throttle;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use nvidia_contract::BundleKeys;

pub use throttle::{Throttle, ThrottleStats};

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
    /// Appended to the User-Agent as `app/<name>` (the node's name): the bucket's access logs then
    /// say which node sent what.
    pub app_name: Option<String>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("ca_file", &self.ca_file)
            .field("static_credentials", &self.access_key_id.is_some())
            .field("app_name", &self.app_name)
            .finish()
    }
}

/// How downloads are split, paced and retried. Clones share one [`Throttle`]: the requests of one
/// stage are paced together.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub part_size: u64,
    /// The most requests in flight (the throttle starts lower and adapts).
    pub concurrency: usize,
    /// Attempts at a request that fails for another reason than throttling.
    pub max_attempts: u32,
    /// The first retry waits up to this long; each further one up to twice as long (full jitter).
    pub backoff: Duration,
    /// A random wait up to this long before the first request to the bucket, so that a node pool
    /// started at once does not reach the bucket at once.
    pub start_jitter: Duration,
    /// Shared pacing: adaptive concurrency, and the deadline until which throttling is retried.
    pub throttle: Arc<Throttle>,
    /// The longest one attempt at a ranged GET may take. A server that stalls or trickles (a byte
    /// now and then keeps a read timeout happy) is cut off after this, and the part is retried
    /// from where it stopped.
    pub stall_timeout: Duration,
}

impl Default for Transfer {
    fn default() -> Self {
        Self::new(8, DEFAULT_THROTTLE_PATIENCE)
    }
}

impl Transfer {
    /// At most `concurrency` requests in flight; throttling retried for `patience` from now.
    pub fn new(concurrency: usize, patience: Duration) -> Self {
        Self {
            part_size: 4 << 20,
            concurrency,
            max_attempts: 6,
            backoff: Duration::from_millis(200),
            start_jitter: Duration::ZERO,
            throttle: Throttle::new(concurrency, patience),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }

    /// Sleep a random part of [`start_jitter`](Self::start_jitter).
    pub async fn jitter_start(&self) {
        if !self.start_jitter.is_zero() {
            let wait = Duration::from_micros(fastrand::u64(0..=self.start_jitter.as_micros() as u64));
            info!(wait_ms = wait.as_millis() as u64, "spreading the first request to the bucket");
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long throttling (503 SlowDown, 429) is retried unless configured.
pub const DEFAULT_THROTTLE_PATIENCE: Duration = Duration::from_secs(30 * 60);

/// [`Transfer::stall_timeout`] unless configured: a 4 MiB part in a minute is 70 KB/s.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A bucket and the client that reaches it.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub client: Client,
    pub name: String,
}

impl Bucket {
    /// The bucket `options` name, with a client built from them.
    pub async fn connect(options: &S3Options) -> Result<Self> {
        Ok(Self { client: client(options).await?, name: options.bucket.clone() })
    }
}

/// The region buckets are assumed to be in until HeadBucket says otherwise.
const DEFAULT_REGION: &str = "us-east-1";

/// Build an S3 client for `options.bucket`: static keys when given, else the default chain (IRSA,
/// instance roles…). The bucket's region is found out, not assumed: one HeadBucket, which S3
/// answers from any region with the bucket's own in `x-amz-bucket-region` (also when it refuses
/// the request: the original system's read policy allows no ListBucket). With no region
/// configured the client then uses that region; a configured region that is wrong is followed once,
/// with a warning naming both.
pub async fn client(options: &S3Options) -> Result<Client> {
    client_paced(options, &Transfer::default()).await
}

/// [`client`], its HeadBucket paced and retried as `transfer` says.
pub async fn client_paced(options: &S3Options, transfer: &Transfer) -> Result<Client> {
    let (client, configured) = build_client(options, None).await?;
    let used = client.config().region().map(|r| r.as_ref().to_owned()).unwrap_or_else(|| DEFAULT_REGION.to_owned());
    let Some(actual) = bucket_region(&client, &options.bucket, transfer).await? else { return Ok(client) };
    if actual == used {
        return Ok(client);
    }
    if configured {
        warn!(bucket = %options.bucket, configured = %used, region = %actual, "the bucket is in another region than configured; following it");
    } else {
        info!(bucket = %options.bucket, region = %actual, "found the bucket's region");
    }
    Ok(build_client(options, Some(&actual)).await?.0)
}

/// The region S3 names for `bucket` (`x-amz-bucket-region` of a HeadBucket, whatever its status);
/// `None` when it names none (an S3-compatible store).
async fn bucket_region(client: &Client, bucket: &str, transfer: &Transfer) -> Result<Option<String>> {
    let mut retries = Retries::new(transfer);
    let named = loop {
        let sent = {
            let _permit = transfer.throttle.acquire().await;
            client.head_bucket().bucket(bucket).send().await
        };
        match sent {
            Ok(out) => break out.bucket_region().map(str::to_owned),
            Err(SdkError::ServiceError(service)) if service.raw().headers().get("x-amz-bucket-region").is_some() => {
                break service.raw().headers().get("x-amz-bucket-region").map(str::to_owned);
            }
            Err(SdkError::ResponseError(response)) => {
                break response.raw().headers().get("x-amz-bucket-region").map(str::to_owned);
            }
            Err(error) if transient(&error) => match retries.after(classify(&error)) {
                Some(wait) => {
                    let attempts = retries.attempts();
                    warn!(bucket, error = %describe(&error), attempts, "HeadBucket failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(gave_up("HEAD", bucket, "", &retries, &describe(&error))),
            },
            // Refused without naming a region (an S3-compatible store): the configured one stays.
            Err(SdkError::ServiceError(_)) => break None,
            Err(error) => return Err(Error::s3("HEAD", bucket, "", describe(&error))),
        }
    };
    // The header becomes part of the endpoint's host name: only what a region name holds.
    Ok(named.filter(|r| {
        !r.is_empty() && r.len() <= 40 && r.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }))
}

/// The client itself, for `region` when given, else for the configured region (or the default);
/// and whether a region was configured.
async fn build_client(options: &S3Options, region: Option<&str>) -> Result<(Client, bool)> {
    let mut trust = tls::TrustStore::default();
    if let Some(path) = &options.ca_file {
        let pem = std::fs::read(path).map_err(|e| Error::io("reading the S3 CA file", path, e))?;
        trust = trust.with_pem_certificate(pem);
    }
    let context =
        tls::TlsContext::builder().with_trust_store(trust).build().map_err(|e| Error::S3Tls(e.to_string()))?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
        .tls_context(context)
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = region.or(options.region.as_deref()) {
        loader = loader.region(Region::new(region.to_owned()));
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
    let configured = shared.region().is_some();
    if !configured {
        config = config.region(Region::new(DEFAULT_REGION));
    }
    if let Some(endpoint) = &options.endpoint {
        config = config.endpoint_url(endpoint).force_path_style(true);
    }
    // A node name that is no valid app name (it always is: DNS names) only goes unnamed.
    if let Some(name) = options.app_name.as_deref().and_then(|n| aws_sdk_s3::config::AppName::new(n.to_owned()).ok()) {
        config = config.app_name(name);
    }
    Ok((Client::from_conf(config.build()), configured && region.is_none()))
}

/// What a failed attempt calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The server asks to slow down (503 SlowDown or any 503, 429), perhaps saying how long to wait.
    Throttled(Option<Duration>),
    /// Worth another attempt (a 5xx, a timeout, a connection lost).
    Transient,
    /// Not worth another attempt.
    Fatal,
}

fn classify<E: ProvideErrorMetadata>(error: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> Failure {
    match error {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let retry_after = || service.raw().headers().get("retry-after").and_then(throttle::parse_retry_after);
            if status == 429 || status == 503 || service.err().code() == Some("SlowDown") {
                Failure::Throttled(retry_after())
            } else if status >= 500 || service.err().code() == Some("RequestTimeout") {
                Failure::Transient
            } else {
                Failure::Fatal
            }
        }
        SdkError::ConstructionFailure(_) => Failure::Fatal,
        _ => Failure::Transient,
    }
}

/// Whether an S3 failure is worth another attempt.
fn transient<E: ProvideErrorMetadata>(error: &SdkError<E, aws_smithy_runtime_api::http::Response>) -> bool {
    classify(error) != Failure::Fatal
}

/// The attempts at one request.
struct Retries<'a> {
    transfer: &'a Transfer,
    failed: u32,
    throttled: u32,
}

impl<'a> Retries<'a> {
    fn new(transfer: &'a Transfer) -> Self {
        Self { transfer, failed: 0, throttled: 0 }
    }

    /// After a failed attempt: how long to wait before the next, or `None` to give up. Throttling
    /// is retried until the throttle's deadline; other failures `max_attempts` times in all.
    fn after(&mut self, failure: Failure) -> Option<Duration> {
        let throttle = &self.transfer.throttle;
        let wait = match failure {
            Failure::Fatal => return None,
            Failure::Throttled(asked) => {
                self.throttled += 1;
                // The throttle pauses this stage's every request; this one goes when it may.
                let wait = throttle.slow_down(self.transfer.backoff, asked);
                if !throttle.can_wait(wait) {
                    return None;
                }
                wait
            }
            Failure::Transient => {
                self.failed += 1;
                if self.failed >= self.transfer.max_attempts {
                    return None;
                }
                throttle::full_jitter(self.transfer.backoff, self.failed)
            }
        };
        throttle.retried();
        Some(wait)
    }

    /// How many attempts have failed so far, for messages.
    fn attempts(&self) -> u32 {
        self.failed + self.throttled
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
            let mut text = format!("HTTP {} {code} {message}", service.raw().status().as_u16()).trim().to_owned();
            if let Some(region) = service.raw().headers().get("x-amz-bucket-region") {
                text.push_str(&format!(" (the bucket is in region {region})"));
            }
            text
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

/// The error for a request given up on, saying whether throttling or failures made it give up.
fn gave_up(op: &'static str, bucket: &str, key: &str, retries: &Retries<'_>, last: &str) -> Error {
    let why = if retries.throttled > 0 && retries.failed < retries.transfer.max_attempts {
        format!("still throttled at the deadline after {} attempts: {last}", retries.attempts())
    } else {
        format!("gave up after {} attempts: {last}", retries.attempts())
    };
    Error::s3(op, bucket, key, why)
}

/// Size and ETag of an object; `None` when it does not exist.
pub async fn head(
    client: &Client,
    bucket: &str,
    key: &str,
    transfer: &Transfer,
) -> Result<Option<(u64, Option<String>)>> {
    let mut retries = Retries::new(transfer);
    loop {
        let sent = {
            let _permit = transfer.throttle.acquire().await;
            client.head_object().bucket(bucket).key(key).send().await
        };
        match sent {
            Ok(out) => {
                transfer.throttle.succeeded();
                let size = out.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                return Ok(Some((size, out.e_tag().map(str::to_owned))));
            }
            Err(error) if status(&error) == Some(404) => return Ok(None),
            Err(error) => match retries.after(classify(&error)) {
                Some(wait) => {
                    let attempts = retries.attempts();
                    warn!(bucket, key, error = %describe(&error), attempts, "HEAD failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                None if transient(&error) => return Err(gave_up("HEAD", bucket, key, &retries, &describe(&error))),
                None => return Err(Error::s3("HEAD", bucket, key, describe(&error))),
            },
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
    let bytes = get_range(client, bucket, key, 0, size - 1, etag.as_deref(), transfer, BytesMut::new()).await?;
    Ok(Some(bytes.to_vec()))
}

/// Bytes `first..=last` of an object into `buffer` (emptied first; grown when too small), retried
/// with backoff, resuming after what already arrived.
#[allow(clippy::too_many_arguments)]
pub async fn get_range(
    client: &Client,
    bucket: &str,
    key: &str,
    first: u64,
    last: u64,
    etag: Option<&str>,
    transfer: &Transfer,
    mut buffer: BytesMut,
) -> Result<Bytes> {
    let want = usize::try_from(last - first + 1).map_err(|_| Error::s3("GET", bucket, key, "part too large".into()))?;
    buffer.clear();
    buffer.reserve(want);
    let mut retries = Retries::new(transfer);
    loop {
        let from = first + buffer.len() as u64;
        let mut request = client.get_object().bucket(bucket).key(key).range(format!("bytes={from}-{last}"));
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        let had = buffer.len();
        let permit = transfer.throttle.acquire().await;
        let fetched = tokio::time::timeout(transfer.stall_timeout, fetch(request, &mut buffer, want)).await;
        drop(permit);
        let (kind, failure) = match fetched {
            Ok(Fetched::Complete) => {
                transfer.throttle.succeeded();
                transfer.throttle.received(want as u64);
                return Ok(buffer.freeze());
            }
            Ok(Fetched::Failed(kind, failure)) => (kind, failure),
            Ok(Fetched::TooMuch) => {
                return Err(Error::s3("GET", bucket, key, format!("bytes={from}-{last} returned more than asked")));
            }
            Ok(Fetched::Refused(error)) => return Err(Error::s3("GET", bucket, key, error)),
            Err(_) => (
                Failure::Transient,
                format!(
                    "stalled: bytes={from}-{last} not complete after {} ({} bytes of this part received, {} in this attempt)",
                    humantime::format_duration(transfer.stall_timeout),
                    buffer.len(),
                    buffer.len() - had
                ),
            ),
        };
        let Some(wait) = retries.after(kind) else {
            return Err(gave_up("GET", bucket, key, &retries, &failure));
        };
        let attempts = retries.attempts();
        let range = format!("{from}-{last}");
        match kind {
            Failure::Throttled(_) => info!(bucket, key, %range, error = %failure, attempts, "throttled; backing off"),
            _ => warn!(bucket, key, %range, error = %failure, attempts, "transient S3 failure; resuming"),
        }
        tokio::time::sleep(wait).await;
    }
}

/// How one attempt at a ranged GET ended.
enum Fetched {
    Complete,
    /// Worth another attempt (from where it stopped).
    Failed(Failure, String),
    TooMuch,
    /// Not worth another attempt.
    Refused(String),
}

/// One attempt: send the request and append the body to `buffer`.
async fn fetch(
    request: aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder,
    buffer: &mut BytesMut,
    want: usize,
) -> Fetched {
    let mut body = match request.send().await {
        Ok(out) => out.body,
        Err(error) if transient(&error) => return Fetched::Failed(classify(&error), describe(&error)),
        Err(error) => {
            return Fetched::Refused(match status(&error) {
                Some(412) => "the object changed while it was being downloaded".to_owned(),
                _ => describe(&error),
            });
        }
    };
    loop {
        match body.try_next().await {
            Ok(Some(chunk)) => {
                if buffer.len() + chunk.len() > want {
                    return Fetched::TooMuch;
                }
                buffer.extend_from_slice(&chunk);
            }
            Ok(None) if buffer.len() == want => return Fetched::Complete,
            Ok(None) => {
                return Fetched::Failed(
                    Failure::Transient,
                    format!("body ended after {} of {want} bytes", buffer.len()),
                );
            }
            Err(error) => return Fetched::Failed(Failure::Transient, format!("body cut short: {error}")),
        }
    }
}

/// Buffers of downloaded parts, handed back by the consumer once it is done with a part, so that
/// a long download reuses a few allocations instead of faulting in fresh memory for every part.
#[derive(Debug, Clone, Default)]
pub struct PartBuffers(Arc<Mutex<Vec<BytesMut>>>);

impl PartBuffers {
    /// Keep `part`'s memory for a later part, if nothing else holds it.
    pub fn give_back(&self, part: Bytes) {
        if let Ok(buffer) = part.try_into_mut()
            && let Ok(mut buffers) = self.0.lock()
        {
            buffers.push(buffer);
        }
    }

    /// A buffer to fill: one handed back, or a new one.
    pub fn take(&self) -> BytesMut {
        self.0.lock().ok().and_then(|mut buffers| buffers.pop()).unwrap_or_default()
    }
}

/// A spawned part download, cancelled when dropped (a failed download stops the others).
struct PartTask(tokio::task::JoinHandle<Result<Bytes>>);

impl Drop for PartTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Future for PartTask {
    type Output = Result<Result<Bytes>, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// Download `size` bytes of an object in parts, in parallel, and send them in order to `sink`.
/// Each part downloads in a task of its own, so transfers go on while the consumer is busy; at
/// most `concurrency` parts are in flight or waiting. Returns the number of bytes sent.
#[allow(clippy::too_many_arguments)]
pub async fn download(
    client: &Client,
    bucket: &str,
    key: &str,
    size: u64,
    etag: Option<&str>,
    transfer: &Transfer,
    sink: mpsc::Sender<Bytes>,
    buffers: &PartBuffers,
) -> Result<u64> {
    let part = transfer.part_size.max(64 * 1024);
    let parts: Vec<(u64, u64)> = (0..size.div_ceil(part)).map(|i| (i * part, ((i + 1) * part).min(size) - 1)).collect();
    let mut stream = futures::stream::iter(parts)
        .map(|(first, last)| {
            let (client, bucket_name, key_name) = (client.clone(), bucket.to_owned(), key.to_owned());
            let (etag, transfer, buffer) = (etag.map(str::to_owned), transfer.clone(), buffers.take());
            let task = PartTask(tokio::spawn(async move {
                get_range(&client, &bucket_name, &key_name, first, last, etag.as_deref(), &transfer, buffer).await
            }));
            async move {
                task.await
                    .map_err(|e| Error::s3("GET", bucket, key, format!("bytes={first}-{last}: download task: {e}")))?
            }
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_handed_back_is_filled_again_in_the_same_memory() {
        let buffers = PartBuffers::default();
        let mut buffer = buffers.take();
        buffer.extend_from_slice(&[7; 1000]);
        let part = buffer.freeze();
        let address = part.as_ptr();
        buffers.give_back(part);
        let mut again = buffers.take();
        again.clear();
        again.reserve(1000);
        assert_eq!(again.as_ptr(), address);
        assert_eq!(buffers.take().capacity(), 0, "the pool had one buffer");
    }

    #[test]
    fn a_part_still_held_elsewhere_is_left_alone() {
        let buffers = PartBuffers::default();
        let part = Bytes::from(vec![1u8; 64]);
        let held = part.clone();
        buffers.give_back(part);
        assert_eq!(buffers.take().capacity(), 0);
        assert_eq!(&held[..], &[1u8; 64][..]);
    }
}
