//! `nvidia-webhook serve`: HTTPS with certificate reload and graceful shutdown.

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use tracing::{info, warn};

use crate::admission::{AppState, router};
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
pub async fn serve_on(
    listener: TcpListener,
    options: ServeOptions,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::Serve { addr: options.listen, source })?;
    let serve_error = |source| Error::Serve { addr, source };
    listener.set_nonblocking(true).map_err(serve_error)?;
    let loaded = wait_for_certificate(&options.tls).await?;
    let rustls = RustlsConfig::from_config(loaded.config);
    let watcher = tokio::spawn(tls::watch(options.tls.clone(), rustls.clone(), loaded.digest, options.reload_interval));

    let handle: Handle<SocketAddr> = Handle::new();
    let server = axum_server::tls_rustls::from_tcp_rustls(listener, rustls)
        .map_err(serve_error)?
        .handle(handle.clone())
        .serve(router(state.clone()).into_make_service());
    info!(%addr, cert = %options.tls.cert.display(), "serving admission reviews over HTTPS");
    let stopper = async {
        shutdown.await;
        state.set_ready(false);
        info!(delay = ?options.shutdown_delay, drain = ?options.drain_timeout, "shutting down: no longer ready");
        tokio::time::sleep(options.shutdown_delay).await;
        handle.graceful_shutdown(Some(options.drain_timeout));
        std::future::pending::<()>().await;
    };
    let result = tokio::select! {
        result = server => result.map_err(serve_error),
        () = stopper => Ok(()),
    };
    watcher.abort();
    info!("stopped");
    result
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
