//! What sits between a TLS connection and the s3s service: fault injection, the request log and
//! the per-connection bandwidth cap.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use hyper::{Request, Response, StatusCode};
use percent_encoding::percent_decode_str;
use s3s::Body;
use s3s::service::S3Service;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::faults::{Fault, Faults};
use super::log::{self, LogEntry, RequestLog, SharedEntry};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Paced bodies are handed to the connection in chunks of at most this many bytes.
const PACE_CHUNK: usize = 16 * 1024;

/// How far a paced connection may fall behind its schedule and then catch up at full speed, so
/// that the timer's granularity does not lower the rate.
const PACE_BURST: Duration = Duration::from_millis(5);

/// What the server and the tests share.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) faults: Faults,
    pub(crate) log: RequestLog,
    /// Bytes per second per connection; 0 is no cap.
    bandwidth_limit: AtomicU64,
    /// Buckets that live in another region than the server's default, as AWS has them: a request
    /// signed for another region gets `301 PermanentRedirect` with `x-amz-bucket-region`.
    bucket_regions: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// The request rate the server takes before it answers `503 SlowDown`, as S3 does per prefix.
    request_rate: Mutex<Option<RequestRate>>,
}

/// A request-rate limit: a token bucket of `burst` requests refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct RequestRate {
    pub per_second: f64,
    pub burst: f64,
    /// Sent with each `503 SlowDown` when set (S3 sends none; other stores do).
    pub retry_after: Option<u64>,
    tokens: f64,
    at: Option<Instant>,
}

impl RequestRate {
    pub fn new(per_second: f64, burst: f64, retry_after: Option<u64>) -> Self {
        Self { per_second, burst, retry_after, tokens: burst, at: None }
    }

    /// Whether one more request fits now; takes its token when it does.
    fn admit(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            self.tokens = (self.tokens + now.duration_since(at).as_secs_f64() * self.per_second).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl State {
    pub(crate) fn bandwidth_limit(&self) -> Option<u64> {
        match self.bandwidth_limit.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    pub(crate) fn set_bandwidth_limit(&self, limit: Option<u64>) {
        self.bandwidth_limit.store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    pub(crate) fn set_bucket_region(&self, bucket: &str, region: &str) {
        if let Ok(mut regions) = self.bucket_regions.lock() {
            regions.insert(bucket.to_owned(), region.to_owned());
        }
    }

    fn bucket_region(&self, bucket: &str) -> Option<String> {
        self.bucket_regions.lock().ok()?.get(bucket).cloned()
    }

    pub(crate) fn set_request_rate(&self, rate: Option<RequestRate>) {
        *self.request_rate.lock().unwrap_or_else(PoisonError::into_inner) = rate;
    }

    /// `None` when the request may be served, else the `Retry-After` to answer `503 SlowDown` with
    /// (`Some(None)`: none).
    fn refuse(&self) -> Option<Option<u64>> {
        let mut rate = self.request_rate.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = rate.as_mut()?;
        if rate.admit(Instant::now()) { None } else { Some(rate.retry_after) }
    }
}

/// The region a request is signed for: the credential scope's third part, from the
/// `Authorization` header or a presigned URL's `X-Amz-Credential`.
fn signed_region(request: &Request<Incoming>) -> Option<String> {
    let header = request.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let credential = header
        .and_then(|h| h.split("Credential=").nth(1))
        .map(|c| c.split([',', ' ']).next().unwrap_or_default().to_owned())
        .or_else(|| {
            let query = request.uri().query()?;
            let value = query.split('&').find_map(|p| p.strip_prefix("X-Amz-Credential="))?;
            Some(percent_decode_str(value).decode_utf8_lossy().into_owned())
        })?;
    credential.split('/').nth(2).map(str::to_owned)
}

/// One accepted connection: when its writes were last flushed, and its pacing schedule.
#[derive(Debug)]
pub(crate) struct Connection {
    id: u64,
    flushes: AtomicU64,
    flush_waker: Mutex<Option<Waker>>,
    next_send: Mutex<Option<Instant>>,
}

impl Connection {
    pub(crate) fn new(id: u64) -> Arc<Self> {
        Arc::new(Self { id, flushes: AtomicU64::new(0), flush_waker: Mutex::new(None), next_send: Mutex::new(None) })
    }

    fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn flushed(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        if let Some(waker) = self.flush_waker.lock().unwrap_or_else(PoisonError::into_inner).take() {
            waker.wake();
        }
    }

    /// Whether a flush completed after the count was `mark`; if not, `cx` is woken by the next one.
    fn flushed_since(&self, mark: u64, cx: &Context<'_>) -> bool {
        if self.flushes() > mark {
            return true;
        }
        *self.flush_waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
        self.flushes() > mark
    }

    /// Books `bytes` on the schedule of a connection capped at `rate` bytes per second and returns
    /// when they may be sent.
    fn reserve(&self, bytes: usize, rate: u64) -> Instant {
        let now = Instant::now();
        let mut next = self.next_send.lock().unwrap_or_else(PoisonError::into_inner);
        let earliest = now.checked_sub(PACE_BURST).unwrap_or(now);
        let start = next.map_or(now, |next| next.max(earliest));
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start
    }
}

/// The connection's stream, noting each completed flush so that a body cut short is cut only
/// after everything before the cut has reached the socket.
#[derive(Debug)]
pub(crate) struct ConnectionIo<T> {
    inner: T,
    connection: Arc<Connection>,
}

impl<T> ConnectionIo<T> {
    pub(crate) fn new(inner: T, connection: Arc<Connection>) -> Self {
        Self { inner, connection }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnectionIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnectionIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = ready!(Pin::new(&mut self.inner).poll_flush(cx));
        if result.is_ok() {
            self.connection.flushed();
        }
        Poll::Ready(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The service a connection is served by: applies faults, logs, paces, and forwards to s3s.
#[derive(Debug, Clone)]
pub(crate) struct Front {
    s3: S3Service,
    state: Arc<State>,
    connection: Arc<Connection>,
}

impl Front {
    pub(crate) fn new(s3: S3Service, state: Arc<State>, connection: Arc<Connection>) -> Self {
        Self { s3, state, connection }
    }

    async fn serve(self, request: Request<Incoming>) -> Result<Response<ResponseBody>, BoxError> {
        let path = percent_decode_str(request.uri().path()).decode_utf8_lossy().into_owned();
        let fault = self.state.faults.take(request.method(), &path);
        let bandwidth_limit = self.state.bandwidth_limit();
        let entry = self.state.log.push(LogEntry {
            connection: self.connection.id,
            method: request.method().clone(),
            path: path.clone(),
            query: request.uri().query().map(str::to_owned),
            range: request.headers().get(RANGE).and_then(|range| range.to_str().ok()).map(str::to_owned),
            received: std::time::Instant::now(),
            user_agent: request
                .headers()
                .get(hyper::header::USER_AGENT)
                .and_then(|agent| agent.to_str().ok())
                .map(str::to_owned),
            status: None,
            bytes_sent: 0,
            fault: fault.clone(),
            bandwidth_limit,
        });

        if let Some(retry_after) = self.state.refuse() {
            let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", &path);
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(hyper::header::RETRY_AFTER, seconds.into());
            }
            log::lock(&entry).status = Some(response.status().as_u16());
            return Ok(response.map(|body| ResponseBody::new(body, entry, self.connection, bandwidth_limit, None)));
        }
        let bucket = path.trim_start_matches('/').split('/').next().unwrap_or_default().to_owned();
        let region = self.state.bucket_region(&bucket);
        if let Some(region) = &region
            && signed_region(&request).as_deref() != Some(region.as_str())
        {
            let response = redirect_response(request.method() == hyper::Method::HEAD, region, &bucket);
            log::lock(&entry).status = Some(response.status().as_u16());
            return Ok(response.map(|body| ResponseBody::new(body, entry, self.connection, bandwidth_limit, None)));
        }
        let mut cut_after = None;
        let response = match fault {
            Some(Fault::Reset) => return Err("connection reset by an injected fault".into()),
            Some(Fault::CutBody { after }) => {
                cut_after = Some(after);
                self.forward(request, &path).await
            }
            Some(fault) => match fault.error() {
                Some((status, code)) => error_response(status, code, &path),
                None => self.forward(request, &path).await,
            },
            None => self.forward(request, &path).await,
        };
        let mut response = response;
        if let Some(region) = region.and_then(|r| hyper::header::HeaderValue::from_str(&r).ok()) {
            response.headers_mut().insert("x-amz-bucket-region", region);
        }
        log::lock(&entry).status = Some(response.status().as_u16());
        Ok(response.map(|body| ResponseBody::new(body, entry, self.connection, bandwidth_limit, cut_after)))
    }

    async fn forward(&self, request: Request<Incoming>, path: &str) -> Response<Body> {
        match self.s3.call(request.map(Body::from)).await {
            Ok(response) => response,
            Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", path),
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for Front {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().serve(request))
    }
}

/// What S3 answers a request sent to the wrong region: `301 PermanentRedirect` naming the bucket's
/// region in `x-amz-bucket-region` (a HEAD gets no body).
fn redirect_response(head: bool, region: &str, bucket: &str) -> Response<Body> {
    let body = if head {
        String::new()
    } else {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>PermanentRedirect</Code><Message>The bucket you are \
             attempting to access must be addressed using the specified endpoint. Please send all future requests to \
             this endpoint.</Message><Endpoint>{}.s3.{region}.amazonaws.com</Endpoint><Bucket>{}</Bucket>\
             <RequestId>redirect</RequestId></Error>",
            escape_xml(bucket),
            escape_xml(bucket)
        )
    };
    Response::builder()
        .status(StatusCode::MOVED_PERMANENTLY)
        .header(CONTENT_TYPE, "application/xml")
        .header(CONTENT_LENGTH, body.len())
        .header("x-amz-bucket-region", region)
        .header("x-amz-request-id", "redirect")
        .body(Body::from(body))
        .expect("a redirect is a valid response")
}

/// An S3 error response, as S3 sends it.
fn error_response(status: StatusCode, code: &str, resource: &str) -> Response<Body> {
    let message = match code {
        "SlowDown" => "Please reduce your request rate.",
        "AccessDenied" => "Access Denied",
        "NoSuchKey" => "The specified key does not exist.",
        _ => "We encountered an internal error. Please try again.",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
         <Resource>{}</Resource><RequestId>injected</RequestId></Error>",
        escape_xml(resource)
    );
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/xml")
        .header(CONTENT_LENGTH, body.len())
        .header("x-amz-request-id", "injected")
        .body(Body::from(body))
        .expect("an S3 error response is a valid response")
}

fn escape_xml(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// This many more body bytes may be sent.
    After(u64),
    /// The body goes on past the cut: once the pending bytes are sent, the connection is dropped.
    Armed,
    /// Everything before the cut was handed to the connection when it had flushed `mark` times;
    /// the next flush puts it on the socket.
    Flushing { mark: u64 },
}

/// A response body as sent: counted into the log entry, paced, and cut short when asked.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    inner: Body,
    entry: SharedEntry,
    connection: Arc<Connection>,
    bandwidth_limit: Option<u64>,
    cut: Option<Cut>,
    /// Data taken from `inner` and not sent yet.
    pending: Bytes,
    /// How much of `pending` the pacer has cleared.
    cleared: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl ResponseBody {
    fn new(
        inner: Body,
        entry: SharedEntry,
        connection: Arc<Connection>,
        bandwidth_limit: Option<u64>,
        cut_after: Option<u64>,
    ) -> Self {
        Self {
            inner,
            entry,
            connection,
            bandwidth_limit,
            cut: cut_after.map(Cut::After),
            pending: Bytes::new(),
            cleared: 0,
            sleep: None,
        }
    }

    /// Sends the next chunk of `pending`, when the pacer allows.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        if self.cleared == 0 {
            match self.bandwidth_limit {
                None => self.cleared = self.pending.len(),
                Some(rate) => {
                    self.cleared = self.pending.len().min(PACE_CHUNK);
                    let at = self.connection.reserve(self.cleared, rate);
                    if at > Instant::now() {
                        self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                    }
                }
            }
        }
        if let Some(sleep) = self.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
        }
        let chunk = self.pending.split_to(self.cleared);
        self.cleared = 0;
        log::lock(&self.entry).bytes_sent += chunk.len() as u64;
        Poll::Ready(chunk)
    }

    /// Takes in a data frame from `inner`, shortened to what the cut allows.
    fn take_in(&mut self, mut data: Bytes) {
        if let Some(Cut::After(left)) = self.cut {
            match usize::try_from(left) {
                Ok(left) if data.len() > left => {
                    data.truncate(left);
                    self.cut = Some(Cut::Armed);
                }
                _ => self.cut = Some(Cut::After(left - data.len() as u64)),
            }
        }
        self.pending = data;
    }
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let chunk = ready!(this.poll_send(cx));
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            match this.cut {
                Some(Cut::Armed) => {
                    this.cut = Some(Cut::Flushing { mark: this.connection.flushes() });
                    continue;
                }
                Some(Cut::Flushing { mark }) => {
                    if this.connection.flushed_since(mark, cx) {
                        return Poll::Ready(Some(Err("response body cut short by an injected fault".into())));
                    }
                    return Poll::Pending;
                }
                Some(Cut::After(_)) | None => {}
            }
            let Some(frame) = ready!(Pin::new(&mut this.inner).poll_frame(cx)) else {
                return Poll::Ready(None);
            };
            match frame?.into_data() {
                Ok(data) => this.take_in(data),
                Err(frame) => return Poll::Ready(Some(Ok(frame))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty()
            && !matches!(self.cut, Some(Cut::Armed | Cut::Flushing { .. }))
            && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + pending);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}
