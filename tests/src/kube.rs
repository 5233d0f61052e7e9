//! A Kubernetes API endpoint on loopback for the calls the project makes: Secrets, the
//! MutatingWebhookConfiguration, merge patches of Nodes and `events.k8s.io` Events. An API
//! server cannot run on this machine, so this stands at the seam instead: objects are kept in
//! memory with the API server's create, replace (with `resourceVersion` checks), JSON patch and
//! merge patch semantics, over HTTPS with a bearer token, and every request is recorded so tests
//! check exactly what the binaries ask. A kubeconfig points clients at it.
//!
//! ```no_run
//! use integration_tests::kube::ApiServer;
//!
//! let api = ApiServer::start();
//! let dir = tempfile::tempdir().unwrap();
//! let kubeconfig = api.kubeconfig(dir.path());
//! // Run the binary with KUBECONFIG=kubeconfig, then look at api.requests() and api.object(..).
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::{random_hex, tls_acceptor};

/// One request as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
    /// The status it was answered with.
    pub status: u16,
    /// When it was answered.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct Store {
    /// Objects by their item path, e.g. `/api/v1/namespaces/ns/secrets/name`.
    objects: Mutex<BTreeMap<String, Value>>,
    version: AtomicU64,
    requests: Mutex<Vec<ApiRequest>>,
    /// (method, path, status): the next matching request is answered with that status.
    faults: Mutex<VecDeque<Fault>>,
    /// (method, path, object path, change): once the next matching request is answered, the
    /// object is changed, as another writer would between that read and the client's next write.
    changes: Mutex<Vec<Change>>,
    /// Admission: applied to every created object whose collection path ends with the suffix, as
    /// the API server calls a mutating webhook before it stores (or, on a dry run, only answers).
    admission: Mutex<Vec<(String, Admission)>>,
}

/// (method, path, status, message): answer the next matching request with that status.
type Fault = (String, String, u16, Option<String>);

/// (method, path, object path, change): see [`ApiServer::change_after_next`].
type Change = (String, String, String, Arc<dyn Fn(&mut Value) + Send + Sync>);

/// A mutating admission step: the object as sent, the object to store.
pub type Admission = Arc<dyn Fn(Value) -> Value + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("objects", &lock(&self.objects).len()).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The API endpoint for one test; stopped on drop.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    ca_pem: String,
    token: String,
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    pub fn start() -> Self {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let certs = nvidia_certs::generate(&names, nvidia_certs::Lifetimes::default())
            .expect("generating the API server's certificate");
        let acceptor = tls_acceptor(&certs.cert, &certs.key);
        let token = random_hex(16);
        let store = Arc::new(Store::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the API server to 127.0.0.1");
        listener.set_nonblocking(true).expect("making the API server's listener non-blocking");
        let addr = listener.local_addr().expect("reading the API server's address");
        let (stop, mut stopped) = oneshot::channel::<()>();
        let serving = Arc::clone(&store);
        let bearer = format!("Bearer {token}");
        let thread = std::thread::Builder::new()
            .name("kube-api".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the API server's runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("registering the API server's listener");
                    loop {
                        let tcp = tokio::select! {
                            _ = &mut stopped => return,
                            accepted = listener.accept() => match accepted {
                                Ok((tcp, _)) => tcp,
                                Err(_) => continue,
                            },
                        };
                        let acceptor = acceptor.clone();
                        let store = Arc::clone(&serving);
                        let bearer = bearer.clone();
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else { return };
                            let service = hyper::service::service_fn(move |request| {
                                let store = Arc::clone(&store);
                                let bearer = bearer.clone();
                                async move { Ok::<_, std::convert::Infallible>(handle(&store, &bearer, request).await) }
                            });
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tls), service)
                                .await
                                .ok();
                        });
                    }
                });
            })
            .expect("starting the API server's thread");
        Self { addr, ca_pem: certs.ca_cert, token, store, stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Write a kubeconfig for this server (its CA, a bearer token) into `dir` and return its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: loopback\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: test\n  user:\n    token: {}\ncontexts:\n- name: loopback\n  context:\n    cluster: loopback\n    user: test\n    namespace: default\ncurrent-context: loopback\n",
            self.url(),
            self.token
        );
        let path = dir.join("kubeconfig");
        std::fs::write(&path, text).expect("writing the kubeconfig");
        path
    }

    /// Store `object` at its item path, as if it had been created earlier.
    pub fn insert(&self, path: &str, mut object: Value) {
        object["metadata"]["resourceVersion"] = json!(self.store.next_version());
        lock(&self.store.objects).insert(path.to_owned(), object);
    }

    /// The object at an item path.
    pub fn object(&self, path: &str) -> Option<Value> {
        lock(&self.store.objects).get(path).cloned()
    }

    /// Objects whose item path starts with `prefix`.
    pub fn objects(&self, prefix: &str) -> Vec<Value> {
        lock(&self.store.objects).iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect()
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.store.requests).clone()
    }

    /// Requests other than reads.
    pub fn writes(&self) -> Vec<ApiRequest> {
        self.requests().into_iter().filter(|r| r.method != "GET").collect()
    }

    /// Answer the next `method` request to `path` with `status` (and change nothing).
    /// Run `admission` on every object created in a collection whose path ends with `suffix`
    /// (e.g. `/pods`), before it is stored or, for `dryRun=All`, answered without being stored.
    pub fn admit(&self, suffix: &str, admission: Admission) {
        lock(&self.store.admission).push((suffix.to_owned(), admission));
    }

    pub fn fail_next(&self, method: &str, path: &str, status: u16) {
        lock(&self.store.faults).push_back((method.to_owned(), path.to_owned(), status, None));
    }

    /// [`fail_next`](Self::fail_next) with the Status message the API server would send.
    pub fn fail_next_with(&self, method: &str, path: &str, status: u16, message: &str) {
        lock(&self.store.faults).push_back((method.to_owned(), path.to_owned(), status, Some(message.to_owned())));
    }

    /// Once the next `method` request on `path` is answered, change the object at `object` with
    /// `change` (and give it a new resourceVersion), as another client writing between that read
    /// and the reader's next write does.
    pub fn change_after_next(
        &self,
        method: &str,
        path: &str,
        object: &str,
        change: impl Fn(&mut Value) + Send + Sync + 'static,
    ) {
        lock(&self.store.changes).push((method.to_owned(), path.to_owned(), object.to_owned(), Arc::new(change)));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(thread) = self.thread.take() {
            thread.join().ok();
        }
    }
}

impl Store {
    fn next_version(&self) -> String {
        (self.version.fetch_add(1, Ordering::SeqCst) + 1).to_string()
    }
}

async fn handle(store: &Store, bearer: &str, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().as_str().to_owned();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().map(str::to_owned);
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_type = header("content-type");
    let authorized = header("authorization").as_deref() == Some(bearer);
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value =
        if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    let fault = {
        let mut faults = lock(&store.faults);
        let at = faults.iter().position(|(m, p, _, _)| *m == method && *p == path);
        at.and_then(|at| faults.remove(at)).map(|(_, _, status, message)| (status, message))
    };
    let (status, answer) = if !authorized {
        status(401, "Unauthorized", "no or wrong bearer token".to_owned())
    } else if let Some((code, message)) = fault {
        let reason = match code {
            409 => "Conflict",
            403 => "Forbidden",
            429 => "TooManyRequests",
            _ => "InternalError",
        };
        status(code, reason, message.unwrap_or_else(|| format!("injected {code} for {method} {path}")))
    } else {
        let dry_run = query.as_deref().is_some_and(|q| q.split('&').any(|p| p == "dryRun=All"));
        let mut body = body.clone();
        if method == "POST" {
            let admissions: Vec<Admission> = lock(&store.admission)
                .iter()
                .filter(|(s, _)| path.ends_with(s.as_str()))
                .map(|(_, a)| Arc::clone(a))
                .collect();
            for admission in admissions {
                body = admission(body);
            }
        }
        if dry_run && method == "POST" {
            let mut object = body.clone();
            if object["metadata"]["name"].is_null() {
                let prefix = object["metadata"]["generateName"].as_str().unwrap_or_default().to_owned();
                object["metadata"]["name"] = json!(format!("{prefix}{}", &random_hex(3)[..5]));
            }
            (201, object)
        } else {
            apply(store, &method, &path, query.as_deref(), content_type.as_deref(), &body)
        }
    };
    let change = {
        let mut changes = lock(&store.changes);
        let at = changes.iter().position(|(m, p, _, _)| *m == method && *p == path);
        at.map(|at| changes.remove(at))
    };
    if let Some((_, _, object, change)) = change
        && let Some(stored) = lock(&store.objects).get_mut(&object)
    {
        change(stored);
        stored["metadata"]["resourceVersion"] = json!(store.next_version());
    }
    lock(&store.requests).push(ApiRequest {
        method,
        path,
        query,
        content_type,
        body,
        status,
        at: std::time::Instant::now(),
    });
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())))
        .unwrap_or_default()
}

/// Now, as the API server writes times (RFC 3339, seconds).
pub fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Whether `path` names a collection (`/api/v1/pods`, `/apis/g/v/namespaces/ns/res`) rather than
/// an item.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segments.first() {
        Some(&"api") => segments.len().saturating_sub(2),
        Some(&"apis") => segments.len().saturating_sub(3),
        _ => return false,
    };
    rest % 2 == 1
}

/// The items of the collection at `path` (`/api/v1/nodes`, `/api/v1/namespaces/ns/pods`, or
/// every namespace's: `/api/v1/pods`) that match the selectors of `query`.
fn list(objects: &BTreeMap<String, Value>, path: &str, query: Option<&str>) -> Option<Value> {
    let resource = path.rsplit('/').next()?.to_owned();
    let all_namespaces = path.matches('/').count() == 3 && !path.contains("/namespaces/") && resource != "nodes";
    let in_collection = |key: &str| match key.rsplit_once('/') {
        Some((parent, _)) if parent == path => true,
        Some((parent, _)) if all_namespaces => {
            parent.ends_with(&format!("/{resource}"))
                && parent.starts_with(&format!("{}/namespaces/", &path[..path.len() - resource.len() - 1]))
        }
        _ => false,
    };
    let params: Vec<(String, String)> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()))
        .collect();
    let selector = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (labels, fields) = (selector("labelSelector"), selector("fieldSelector"));
    let matches = |object: &Value| {
        let labels_ok = labels.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
            Some((k, v)) => object["metadata"]["labels"][k].as_str() == Some(v),
            None => !object["metadata"]["labels"][term].is_null(),
        });
        let fields_ok = fields.split(',').filter(|t| !t.is_empty()).all(|term| match term.split_once('=') {
            Some(("spec.nodeName", v)) => object["spec"]["nodeName"].as_str() == Some(v),
            Some(("metadata.name", v)) => object["metadata"]["name"].as_str() == Some(v),
            _ => false,
        });
        labels_ok && fields_ok
    };
    let items: Vec<Value> =
        objects.iter().filter(|(key, _)| in_collection(key)).map(|(_, o)| o.clone()).filter(|o| matches(o)).collect();
    let singular = resource.trim_end_matches('s');
    let kind = format!("{}{}List", singular[..1].to_uppercase(), &singular[1..]);
    Some(json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}))
}

fn apply(
    store: &Store,
    method: &str,
    path: &str,
    query: Option<&str>,
    content_type: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut objects = lock(&store.objects);
    let not_found = || status(404, "NotFound", format!("{path} not found"));
    match method {
        "GET" => match objects.get(path) {
            Some(object) => (200, object.clone()),
            None if is_collection(path) => match list(&objects, path, query) {
                Some(list) => (200, list),
                None => not_found(),
            },
            None => not_found(),
        },
        "DELETE" => match objects.remove(path) {
            Some(object) => (200, object),
            None => not_found(),
        },
        "POST" if path.ends_with("/eviction") => {
            let pod = path.trim_end_matches("/eviction");
            match objects.remove(pod) {
                Some(_) => (
                    201,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ),
                None => status(404, "NotFound", format!("{pod} not found")),
            }
        }
        "POST" => {
            let metadata = &body["metadata"];
            let name = match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
                (Some(name), _) => name.to_owned(),
                (None, Some(prefix)) => format!("{prefix}{}", &random_hex(3)[..5]),
                (None, None) => return status(422, "Invalid", "metadata.name or generateName required".to_owned()),
            };
            let item = format!("{path}/{name}");
            if objects.contains_key(&item) {
                return status(409, "AlreadyExists", format!("{item} already exists"));
            }
            let mut object = body.clone();
            object["metadata"]["name"] = json!(name);
            object["metadata"]["resourceVersion"] = json!(store.next_version());
            object["metadata"]["uid"] = json!(random_hex(16));
            if object["metadata"]["creationTimestamp"].is_null() {
                object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            }
            objects.insert(item, object.clone());
            (201, object)
        }
        "PUT" => {
            let Some(current) = objects.get(path) else { return not_found() };
            let have = &current["metadata"]["resourceVersion"];
            let sent = &body["metadata"]["resourceVersion"];
            if !sent.is_null() && sent != have {
                return status(
                    409,
                    "Conflict",
                    format!("the object has been modified: {path} is at {have}, not {sent}"),
                );
            }
            let mut object = body.clone();
            object["metadata"]["uid"] = current["metadata"]["uid"].clone();
            object["metadata"]["resourceVersion"] = json!(store.next_version());
            objects.insert(path.to_owned(), object.clone());
            (200, object)
        }
        "PATCH" => {
            let Some(current) = objects.get(path) else { return not_found() };
            let mut object = current.clone();
            match content_type {
                Some("application/json-patch+json") => {
                    let patch: json_patch::Patch = match serde_json::from_value(body.clone()) {
                        Ok(patch) => patch,
                        Err(e) => return status(400, "BadRequest", format!("not a JSON patch: {e}")),
                    };
                    if let Err(e) = json_patch::patch(&mut object, &patch) {
                        return status(422, "Invalid", format!("the JSON patch does not apply: {e}"));
                    }
                }
                Some("application/merge-patch+json") => json_patch::merge(&mut object, body),
                other => return status(415, "UnsupportedMediaType", format!("patch type {other:?} not served here")),
            }
            // A resourceVersion the patch sets is a precondition, as the API server takes it.
            let have = &current["metadata"]["resourceVersion"];
            let sent = &object["metadata"]["resourceVersion"];
            if sent != have {
                return status(
                    409,
                    "Conflict",
                    format!("the object has been modified: {path} is at {have}, not {sent}"),
                );
            }
            object["metadata"]["resourceVersion"] = json!(store.next_version());
            objects.insert(path.to_owned(), object.clone());
            (200, object)
        }
        _ => status(405, "MethodNotAllowed", format!("{method} not served here")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_with_a_stale_resource_version_conflicts() {
        let store = Store::default();
        let path = "/api/v1/namespaces/ns/secrets";
        let (code, created) = apply(&store, "POST", path, None, None, &json!({"metadata": {"name": "s"}}));
        assert_eq!(code, 201);
        let item = format!("{path}/s");
        let mut stale = created.clone();
        stale["metadata"]["resourceVersion"] = json!("0");
        assert_eq!(apply(&store, "PUT", &item, None, None, &stale).0, 409);
        assert_eq!(apply(&store, "PUT", &item, None, None, &created).0, 200);
        assert_eq!(apply(&store, "POST", path, None, None, &json!({"metadata": {"name": "s"}})).0, 409);
        assert_eq!(apply(&store, "GET", &format!("{path}/other"), None, None, &Value::Null).0, 404);
    }

    #[test]
    fn a_patch_with_a_stale_resource_version_conflicts() {
        let store = Store::default();
        let path = "/api/v1/nodes";
        let (_, created) = apply(&store, "POST", path, None, None, &json!({"metadata": {"name": "n"}}));
        let item = format!("{path}/n");
        let merge = Some("application/merge-patch+json");
        let version = created["metadata"]["resourceVersion"].clone();
        let patch = json!({"metadata": {"resourceVersion": version, "labels": {"a": "1"}}});
        assert_eq!(apply(&store, "PATCH", &item, None, merge, &patch).0, 200);
        let (code, answer) = apply(&store, "PATCH", &item, None, merge, &patch);
        assert_eq!(code, 409, "the version moved on: {answer}");
        assert_eq!(apply(&store, "PATCH", &item, None, merge, &json!({"metadata": {"labels": {"b": "2"}}})).0, 200);
    }
}
