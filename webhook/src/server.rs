//! `nvidia-webhook serve`: HTTPS with certificate reload and graceful shutdown.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;

use axum::Router;
use axum_server::tls_rustls::RustlsConfig;
use futures::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::admission::{AppState, router};
use crate::limits::{Budget, ClientBudgets, HEADER_BYTES, HTTP1_BUFFER_BYTES, Limits};
use crate::tls::{self, TlsFiles};
use crate::{Error, Result};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
    /// After SIGTERM, keep serving (with `/readyz` failing) this long so endpoints drop the pod.
    pub shutdown_delay: Duration,
    /// Then give in-flight requests this long to finish.
    pub drain_timeout: Duration,
}

/// Bind `options.listen` and serve until `shutdown` resolves.
pub async fn serve(options: ServeOptions, state: Arc<AppState>, shutdown: impl Future<Output = ()>) -> Result<()> {
    let listener = TcpListener::bind(options.listen).map_err(|source| Error::Serve { addr: options.listen, source })?;
    serve_on(listener, options, state, shutdown).await
}

/// Serve on an already bound listener (tests bind port 0 and read the address first).
///
/// Each connection runs in a task of its own under the bounds of [`AppState::limits`]
/// ([`crate::limits`]). On `shutdown`: `/readyz` fails, serving goes on for the shutdown delay,
/// then no connection is accepted, open ones finish what is in flight within the drain timeout,
/// and what is left is closed.
pub async fn serve_on(
    listener: TcpListener,
    options: ServeOptions,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::Serve { addr: options.listen, source })?;
    let serve_error = |source| Error::Serve { addr, source };
    listener.set_nonblocking(true).map_err(serve_error)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(serve_error)?;
    let loaded = wait_for_certificate(&options.tls).await?;
    let rustls = RustlsConfig::from_config(loaded.config);
    let expiry = state.metrics.certificate_expiry.clone();
    expiry.set(loaded.not_after.unwrap_or(0));
    let watcher =
        tokio::spawn(tls::watch(options.tls.clone(), rustls.clone(), loaded.digest, options.reload_interval, expiry));
    info!(%addr, cert = %options.tls.cert.display(), "serving admission reviews over HTTPS");

    let router = router(state.clone());
    let clients = Arc::new(Clients::new(state.limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut drain_from = None;
    loop {
        tokio::select! {
            accepted = listener.accept(), if drain_from.is_none() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(client) = clients.admit(peer.ip(), &state.limits).await else {
                    state.metrics.refused_connections.inc();
                    debug!(%peer, limit = state.limits.max_connections, "connection limit reached, nothing to evict; closing");
                    continue;
                };
                let acceptor = TlsAcceptor::from(rustls.get_inner());
                let connection = Connection { state: state.clone(), router: router.clone(), stopped: stopped.clone() };
                connections.spawn(connection.serve(tcp, acceptor, client));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown, if !stopping => {
                stopping = true;
                state.set_ready(false);
                info!(delay = ?options.shutdown_delay, drain = ?options.drain_timeout, "shutting down: no longer ready");
                let stop = stop.clone();
                let delay = options.shutdown_delay;
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = stop.send(true);
                });
            }
            Ok(()) = stopped_changed(&stopped), if stopping && drain_from.is_none() => {
                drain_from = Some(tokio::time::Instant::now());
            }
            () = drain_deadline(drain_from, options.drain_timeout), if drain_from.is_some() => {
                warn!(open = connections.len(), "drain timeout: closing what is left");
                break;
            }
        }
        if drain_from.is_some() && connections.is_empty() {
            break;
        }
    }
    connections.shutdown().await;
    watcher.abort();
    info!("stopped");
    Ok(())
}

/// Resolves when the stop signal turns true.
async fn stopped_changed(stopped: &watch::Receiver<bool>) -> std::result::Result<(), watch::error::RecvError> {
    let mut stopped = stopped.clone();
    stopped.wait_for(|stop| *stop).await.map(|_| ())
}

async fn drain_deadline(from: Option<tokio::time::Instant>, timeout: Duration) {
    match from {
        Some(from) => tokio::time::sleep_until(from + timeout).await,
        None => std::future::pending().await,
    }
}

/// One client connection.
struct Connection {
    state: Arc<AppState>,
    router: Router,
    stopped: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(mut self, tcp: tokio::net::TcpStream, acceptor: TlsAcceptor, mut client: Admitted) {
        let limits = self.state.limits.clone();
        self.state.metrics.connections.inc();
        let _open = scopeguard(self.state.clone());
        let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
        let tls = match tokio::select! {
            result = handshake => result,
            _ = &mut client.evicted => return,
        } {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };
        let activity = client.activity.clone();
        let budgets =
            ClientBudgets { peer: client.peer_budget.clone(), connection: Budget::new(limits.max_connection_bytes) };
        let service = {
            let (router, activity) = (self.router.clone(), activity.clone());
            tower::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                let (router, busy) = (router.clone(), activity.begin());
                request.extensions_mut().insert(budgets.clone());
                async move {
                    let response = router.oneshot(request).await;
                    drop(busy);
                    response
                }
            })
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(HTTP1_BUFFER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_streams)
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_header_list_size(HEADER_BYTES as u32)
            .max_pending_accept_reset_streams(Some(64))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let connection = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(service));
        tokio::pin!(connection);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let mut closing: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(%error, "connection ended with an error");
                    }
                    break;
                }
                Ok(()) = self.stopped.wait_for(|stop| *stop).map(|r| r.map(|_| ())), if closing.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    // Requests in flight get the server's drain timeout (it closes what is left).
                    closing = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
                _ = ticker.tick(), if closing.is_none() => {
                    if activity.idle_for() > limits.idle_timeout {
                        debug!("idle connection closed");
                        connection.as_mut().graceful_shutdown();
                        closing = Some(tokio::time::Instant::now() + limits.header_timeout);
                    }
                }
                () = sleep_until(closing), if closing.is_some() => break,
                _ = &mut client.evicted, if closing.is_none() => {
                    debug!("connection evicted for a new one");
                    break;
                }
            }
        }
    }
}

/// The open connections, and the byte budgets of their client addresses.
struct Clients {
    max: usize,
    next_id: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<Open>,
}

#[derive(Default)]
struct Open {
    /// By connection id: its activity and how to evict it.
    connections: BTreeMap<u64, (Activity, Option<oneshot::Sender<()>>)>,
    /// By client address; the budget lives as long as a connection from there does.
    peers: HashMap<IpAddr, Weak<Semaphore>>,
}

/// A connection let in: its activity, its client's budget, and the signal that evicts it. Its
/// place is given back when it is dropped.
struct Admitted {
    id: u64,
    clients: Arc<Clients>,
    activity: Activity,
    peer_budget: Budget,
    evicted: oneshot::Receiver<()>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut open) = self.clients.open.lock() {
            open.connections.remove(&self.id);
        }
    }
}

impl Clients {
    fn new(max: usize) -> Self {
        Self { max: max.max(1), next_id: std::sync::atomic::AtomicU64::new(0), open: std::sync::Mutex::default() }
    }

    /// Let a connection from `peer` in. At the limit, the connection with nothing in flight for the
    /// longest is evicted for it (its task ends and gives the place back); `None` when every
    /// connection has a request in flight.
    async fn admit(self: &Arc<Self>, peer: IpAddr, limits: &Limits) -> Option<Admitted> {
        for _ in 0..50 {
            {
                let mut open = self.open.lock().ok()?;
                if open.connections.len() < self.max {
                    let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (evict, evicted) = oneshot::channel();
                    let activity = Activity::default();
                    open.connections.insert(id, (activity.clone(), Some(evict)));
                    let peer_budget = match open.peers.get(&peer).and_then(Weak::upgrade) {
                        Some(budget) => Budget::from_shared(budget),
                        None => {
                            let budget = Budget::new(limits.max_peer_bytes);
                            if open.peers.len() > 2 * self.max {
                                open.peers.retain(|_, b| b.strong_count() > 0);
                            }
                            open.peers.insert(peer, budget.downgrade());
                            budget
                        }
                    };
                    return Some(Admitted { id, clients: self.clone(), activity, peer_budget, evicted });
                }
                let idlest = open
                    .connections
                    .iter()
                    .filter(|(_, (activity, evict))| evict.is_some() && activity.in_flight() == 0)
                    // Connections that never got a request through first (a stalled handshake
                    // or request head), then the one idle the longest.
                    .max_by_key(|(_, (activity, _))| (!activity.served(), activity.idle_for()))
                    .map(|(id, _)| *id);
                match idlest.and_then(|id| open.connections.get_mut(&id)).and_then(|(_, evict)| evict.take()) {
                    Some(evict) => {
                        let _ = evict.send(());
                    }
                    None => return None,
                }
            }
            // The evicted task ends and gives its place back.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Decrements the open-connections gauge when the connection's task ends, however it ends.
struct OpenConnection(Arc<AppState>);

fn scopeguard(state: Arc<AppState>) -> OpenConnection {
    OpenConnection(state)
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.metrics.connections.dec();
    }
}

/// Requests in flight on a connection, since when it has had none (since it opened, before its
/// first request), and whether it has had one.
#[derive(Debug, Clone)]
struct Activity(Arc<std::sync::Mutex<(usize, std::time::Instant, bool)>>);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new((0, std::time::Instant::now(), false))))
    }
}

impl Activity {
    fn in_flight(&self) -> usize {
        self.0.lock().map(|state| state.0).unwrap_or(0)
    }

    fn served(&self) -> bool {
        self.0.lock().map(|state| state.2).unwrap_or(false)
    }

    fn begin(&self) -> Busy {
        if let Ok(mut state) = self.0.lock() {
            state.0 += 1;
            state.2 = true;
        }
        Busy(self.clone())
    }

    /// How long nothing has been in flight (zero while something is).
    fn idle_for(&self) -> Duration {
        let Ok(state) = self.0.lock() else { return Duration::ZERO };
        if state.0 > 0 { Duration::ZERO } else { state.1.elapsed() }
    }
}

/// One request in flight.
struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        if let Ok(mut state) = (self.0).0.lock() {
            state.0 -= 1;
            state.1 = std::time::Instant::now();
        }
    }
}

/// The certificate may be written by a sidecar after the server starts: wait for it.
async fn wait_for_certificate(files: &TlsFiles) -> Result<tls::Loaded> {
    let mut last = String::new();
    loop {
        match files.load() {
            Ok(loaded) => return Ok(loaded),
            Err(error @ Error::TlsRead { .. }) => {
                let message = error.to_string();
                if message != last {
                    warn!(%error, "waiting for the serving certificate");
                    last = message;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
