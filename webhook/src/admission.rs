//! The HTTP layer: parse the AdmissionReview, call [`mutate`](crate::mutate()), answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use kube::core::GroupVersionKind;
use kube::core::TypeMeta;
use kube::core::admission::{AdmissionResponse, Operation};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::config::InjectConfig;
use crate::limits::{Budget, ClientBudgets, Held, Limits};
use crate::metrics::Metrics;
use crate::mutate::{Outcome, mutate_view};
use crate::pod::PodView;

/// Largest AdmissionReview accepted. The API server caps a request at 3 MiB and a review
/// carries the object (and, on update, the old object), so 4 MiB never refuses a real review.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Shared state of the server.
#[derive(Debug)]
pub struct AppState {
    pub config: InjectConfig,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Request bodies buffered across the server.
    pub budget: Budget,
    ready: AtomicBool,
    started: Instant,
    /// Second (since `started`, plus one) of the last refusal logged at `warn`.
    last_refusal_log: AtomicU64,
}

impl AppState {
    pub fn new(config: InjectConfig) -> Arc<Self> {
        Self::with_limits(config, Limits::default())
    }

    pub fn with_limits(config: InjectConfig, limits: Limits) -> Arc<Self> {
        let budget = Budget::new(limits.max_buffered_bytes);
        Arc::new(Self {
            config,
            metrics: Metrics::new(),
            limits,
            budget,
            ready: AtomicBool::new(true),
            started: Instant::now(),
            last_refusal_log: AtomicU64::new(0),
        })
    }

    /// Whether a refusal may be logged at `warn` now (at most one a second).
    fn log_refusal_now(&self) -> bool {
        let now = self.started.elapsed().as_secs() + 1;
        self.last_refusal_log.swap(now, Ordering::Relaxed) != now
    }

    /// Mark the server as going away: `/readyz` fails so endpoints drop it before it stops.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// The webhook's routes: `POST /mutate`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

async fn mutate_handler(State(state): State<Arc<AppState>>, request: HttpRequest) -> Response {
    let started = Instant::now();
    state.metrics.requests.inc();
    let response = match read_body(&state, request).await {
        Ok((body, _held)) => review(&state, &body),
        Err(refusal) => {
            state.metrics.error(refusal.reason);
            // A flood of refusals is counted in full but logged at most once a second: the log must
            // not become what a hostile client fills.
            if state.log_refusal_now() {
                warn!(status = %refusal.status, error = %refusal.message, "admission request body refused");
            } else {
                debug!(status = %refusal.status, error = %refusal.message, "admission request body refused");
            }
            (refusal.status, format!("{}\n", refusal.message)).into_response()
        }
    };
    state.metrics.latency.observe(started.elapsed().as_secs_f64());
    response
}

/// Why a request body was not read.
struct Refusal {
    status: StatusCode,
    /// Metric label.
    reason: &'static str,
    message: String,
}

/// Read a request body within the body timeout, holding its bytes as they arrive against the
/// server's budget and (when served on a connection) its client's and its connection's. A
/// declared `Content-Length` is checked against the limit but holds nothing.
async fn read_body(state: &AppState, request: HttpRequest) -> Result<(Bytes, Held), Refusal> {
    use http_body_util::BodyExt;
    let client = request.extensions().get::<ClientBudgets>().cloned();
    let budgets: Vec<&Budget> = std::iter::once(&state.budget)
        .chain(client.as_ref().into_iter().flat_map(|c| [&c.peer, &c.connection]))
        .collect();
    let too_large = |size: String| Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        reason: "too-large",
        message: format!("the request body is {size}; the limit is {MAX_BODY_BYTES} bytes"),
    };
    let busy = |held: &Held, wanted: usize| Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        reason: "busy",
        message: format!(
            "too many request bytes in flight: {wanted} more bytes after {} would exceed the server's budget of {}, its client's of {} or its connection's of {}",
            held.bytes(),
            state.limits.max_buffered_bytes,
            state.limits.max_peer_bytes,
            state.limits.max_connection_bytes
        ),
    };
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut held = Held::default();
    if let Some(length) = declared.map(|l| usize::try_from(l).unwrap_or(usize::MAX))
        && length > MAX_BODY_BYTES
    {
        return Err(too_large(format!("{length} bytes")));
    }
    let mut body = request.into_body();
    // The declared length sizes the buffer (address space only until bytes arrive and are
    // counted), so a large review is not copied as it grows.
    let capacity = declared.map_or(0, |l| usize::try_from(l).unwrap_or(0).min(MAX_BODY_BYTES));
    let read = async {
        let mut bytes = bytes::BytesMut::with_capacity(capacity);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| Refusal {
                status: StatusCode::BAD_REQUEST,
                reason: "unreadable-body",
                message: format!("reading the request body: {error}"),
            })?;
            let Ok(chunk) = frame.into_data() else { continue };
            let total = bytes.len() + chunk.len();
            if total > MAX_BODY_BYTES {
                return Err(too_large(format!("more than {MAX_BODY_BYTES} bytes")));
            }
            if total > held.bytes() && !held.take(total - held.bytes(), &budgets) {
                return Err(busy(&held, total - held.bytes()));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes.freeze())
    };
    match tokio::time::timeout(state.limits.body_timeout, read).await {
        Ok(Ok(bytes)) => Ok((bytes, held)),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal {
            status: StatusCode::REQUEST_TIMEOUT,
            reason: "slow-body",
            message: format!(
                "the request body did not arrive within {}",
                humantime::format_duration(state.limits.body_timeout)
            ),
        }),
    }
}

/// The review as it arrives, read in one pass: the envelope's three fields, and of the request
/// what the answer needs. The pod is read into the mutation's view ([`PodView`]), so serde skips
/// what the mutation does not look at (and kube's `AdmissionReview`, which flattens its
/// `TypeMeta`, would make serde buffer the whole body before reading it a second time).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    request: Option<Request>,
}

/// The fields of an `AdmissionRequest` the webhook decides on.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    #[serde(default)]
    pub object: Option<PodView>,
}

/// Read a review body: its `apiVersion` and `kind`, and its request if it has one.
pub fn parse_review(body: &[u8]) -> serde_json::Result<(TypeMeta, Option<Request>)> {
    let Envelope { api_version, kind, request } = serde_json::from_slice(body)?;
    Ok((TypeMeta { api_version, kind }, request))
}

/// Answer one review body: the fast path, or a careful look at what could not be read.
fn review(state: &AppState, body: &[u8]) -> Response {
    match parse_review(body) {
        Ok((types, Some(request))) => reply(admit(state, &request, types)),
        Ok((_, None)) => {
            state.metrics.error("malformed");
            bad_request("the AdmissionReview carries no request".to_owned())
        }
        Err(error) => unreadable(state, body, error),
    }
}

/// An allowing response to the request `uid`, echoing the review's `apiVersion` and `kind`.
fn allow(uid: &str, types: TypeMeta) -> AdmissionResponse {
    let mut response = AdmissionResponse::invalid("");
    response.allowed = true;
    response.result = Default::default();
    response.uid = uid.to_owned();
    response.types = types;
    response
}

/// Decide on a parsed request.
pub fn admit(state: &AppState, request: &Request, types: TypeMeta) -> AdmissionResponse {
    let response = allow(&request.uid, types);
    let pod_create = request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.sub_resource.is_none()
        && request.operation == Operation::Create;
    if let Some(pod) = request.object.as_ref().filter(|_| is_ephemeral_update(request)) {
        return match crate::mutate::check_ephemeral_containers(pod) {
            Ok(()) => response,
            Err(error) => {
                state.metrics.error("invalid-pod");
                warn!(uid = %request.uid, %error, "ephemeral container refused");
                response.deny(error.to_string())
            }
        };
    }
    let Some(pod) = request.object.as_ref().filter(|_| pod_create) else {
        state.metrics.skip(crate::metrics::NOT_POD_CREATE);
        debug!(uid = %request.uid, kind = %request.kind.kind, operation = ?request.operation, "not a pod creation; allowed unchanged");
        return response;
    };
    let namespace = request.namespace.as_deref().or(pod.metadata.namespace.as_deref()).unwrap_or_default();
    let name = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default();
    match mutate_view(pod, &state.config) {
        Ok(mutation) => {
            let mut response = response;
            if !mutation.warnings.is_empty() {
                for warning in &mutation.warnings {
                    warn!(uid = %request.uid, namespace, pod = name, warning = %warning, "pod left partly unchanged");
                }
                response.warnings = Some(mutation.warnings);
            }
            match mutation.outcome {
                Outcome::Injected { mounted } => {
                    state.metrics.injected.inc();
                    info!(uid = %request.uid, namespace, pod = name, ?mounted, "driver injected");
                    let types = response.types.clone();
                    match response.with_patch(mutation.patch) {
                        Ok(response) => response,
                        Err(error) => {
                            state.metrics.error("patch-encoding");
                            allow(&request.uid, types)
                                .deny(format!("nvidia-installer webhook could not encode its patch: {error}"))
                        }
                    }
                }
                Outcome::Skipped(reason) => {
                    state.metrics.skip(reason.as_str());
                    debug!(uid = %request.uid, namespace, pod = name, reason = reason.as_str(), "pod left unchanged");
                    response
                }
            }
        }
        Err(error) => {
            state.metrics.error("invalid-pod");
            warn!(uid = %request.uid, namespace, pod = name, %error, "pod refused");
            response.deny(error.to_string())
        }
    }
}

/// `kubectl debug` and the like: an update of a pod's `ephemeralcontainers` subresource.
fn is_ephemeral_update(request: &Request) -> bool {
    request.kind.group.is_empty()
        && request.kind.kind == "Pod"
        && request.sub_resource.as_deref() == Some("ephemeralcontainers")
        && request.operation == Operation::Update
}

/// The body did not read as an AdmissionReview of a Pod. Answer with the request's uid when it
/// has one, so the API server can tell the user what went wrong; otherwise 400.
fn unreadable(state: &AppState, body: &[u8], error: serde_json::Error) -> Response {
    state.metrics.error("malformed");
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        warn!(%error, "admission request is not JSON");
        return bad_request(format!("the request body is not JSON: {error}"));
    };
    let request = value.get("request");
    let Some(uid) = request.and_then(|r| r.get("uid")).and_then(Value::as_str) else {
        warn!(%error, "admission request is not an AdmissionReview");
        return bad_request(format!(
            "the request body is not an admission.k8s.io/v1 AdmissionReview with a request uid: {error}"
        ));
    };
    let text = |v: Option<&Value>, default: &str| v.and_then(Value::as_str).unwrap_or(default).to_owned();
    let kind = request.and_then(|r| r.pointer("/kind/kind")).and_then(Value::as_str).unwrap_or_default();
    let mut response = AdmissionResponse::invalid(format!(
        "nvidia-installer webhook could not read the {} in AdmissionReview {uid}: {error}",
        if kind.is_empty() { "object" } else { kind }
    ));
    response.uid = uid.to_owned();
    response.types = TypeMeta {
        api_version: text(value.get("apiVersion"), "admission.k8s.io/v1"),
        kind: text(value.get("kind"), "AdmissionReview"),
    };
    if kind != "Pod" {
        // Not ours to judge: the webhook is registered for pods only.
        response.allowed = true;
        response.result = Default::default();
    }
    warn!(uid, %error, kind, allowed = response.allowed, "AdmissionReview could not be read");
    reply(response)
}

/// Serialize the review. The API server reads `patch` as Go `[]byte`, which JSON carries as
/// base64; kube's type holds raw bytes (serialized as a number array), so encode it here.
fn reply(response: AdmissionResponse) -> Response {
    match encode(response) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(error) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the AdmissionReview: {error}\n")).into_response()
        }
    }
}

/// The AdmissionReview answering with `response`, as JSON bytes: kube's response with its patch
/// carried as base64, written in one pass.
pub fn encode(mut response: AdmissionResponse) -> serde_json::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Review<'a> {
        api_version: &'a str,
        kind: &'a str,
        response: Answer<'a>,
    }
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        #[serde(flatten)]
        response: &'a AdmissionResponse,
        #[serde(skip_serializing_if = "Option::is_none")]
        patch: Option<String>,
    }
    let patch = response.patch.take().map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes));
    let review = Review {
        api_version: &response.types.api_version,
        kind: &response.types.kind,
        response: Answer { response: &response, patch },
    };
    serde_json::to_vec(&review)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message + "\n").into_response()
}
