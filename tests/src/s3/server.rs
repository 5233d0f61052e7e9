//! The server: its own tokio runtime on a background thread, HTTPS on 127.0.0.1, stopped on drop.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use hyper_util::rt::TokioIo;
use nvidia_certs::Lifetimes;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use super::faults::Faults;
use super::log::RequestLog;
use super::store::Backend;
use super::wire::{Connection, ConnectionIo, Front, RequestRate, State};
use crate::support::{random_hex, tls_acceptor};

const REGION: &str = "us-east-1";

/// How to start an [`S3Server`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Caps each connection's response bodies at this many bytes per second.
    pub bandwidth_limit: Option<u64>,
}

/// An S3 server on 127.0.0.1 for one test: its own store, credentials and certificate.
#[derive(Debug)]
pub struct S3Server {
    addr: SocketAddr,
    endpoint: String,
    ca_pem: String,
    ca_file: PathBuf,
    root: PathBuf,
    access_key: String,
    secret_key: String,
    state: Arc<State>,
    backend: Backend,
    runtime: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Holds the store and the CA file; removed after the server has stopped.
    _dir: TempDir,
}

impl S3Server {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> Self {
        let dir = tempfile::Builder::new().prefix("s3-server-").tempdir().expect("creating the S3 server's temp dir");
        let root = dir.path().join("store");
        std::fs::create_dir(&root).expect("creating the S3 server's store dir");

        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let certs =
            nvidia_certs::generate(&names, Lifetimes::default()).expect("generating the S3 server's certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &certs.ca_cert).expect("writing the S3 server's CA file");
        let acceptor = tls_acceptor(&certs.cert, &certs.key);

        let access_key = format!("AKIA{}", random_hex(8).to_uppercase());
        let secret_key = random_hex(20);
        let backend = Backend::new(&root);
        let s3 = {
            let mut builder = S3ServiceBuilder::new(backend.clone());
            builder.set_auth(SimpleAuth::from_single(access_key.as_str(), secret_key.as_str()));
            builder.build()
        };

        let state = Arc::new(State::default());
        state.set_bandwidth_limit(options.bandwidth_limit);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the S3 server to 127.0.0.1");
        listener.set_nonblocking(true).expect("making the S3 server's listener non-blocking");
        let addr = listener.local_addr().expect("reading the S3 server's address");

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-server")
            .enable_all()
            .build()
            .expect("building the S3 server's runtime");
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel();
        let serving = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("s3-server".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("registering the S3 server's listener");
                    serve(listener, acceptor, s3, serving, stopped).await;
                });
                runtime.shutdown_timeout(Duration::from_secs(5));
            })
            .expect("starting the S3 server's thread");

        Self {
            addr,
            endpoint: format!("https://{addr}"),
            ca_pem: certs.ca_cert,
            ca_file,
            root,
            access_key,
            secret_key,
            state,
            backend,
            runtime: handle,
            stop: Some(stop),
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// `https://127.0.0.1:PORT`
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA that signed the server's certificate (for `localhost` and `127.0.0.1`), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// [`ca_pem`](Self::ca_pem) written to a file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn region(&self) -> &str {
        REGION
    }

    /// The directory the store keeps buckets and objects in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What a client process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", REGION.to_owned()),
            ("NVIDIA_INSTALLER_S3_ENDPOINT", self.endpoint.clone()),
            ("NVIDIA_INSTALLER_S3_CA_FILE", self.ca_file.display().to_string()),
            // One node at a time in a test: no need to spread the first request.
            ("NVIDIA_INSTALLER_START_JITTER", "0s".to_owned()),
        ]
    }

    /// The queue of faults to apply to the next matching requests.
    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// The requests received over the network (the helpers below do not appear in it).
    pub fn log(&self) -> &RequestLog {
        &self.state.log
    }

    pub fn bandwidth_limit(&self) -> Option<u64> {
        self.state.bandwidth_limit()
    }

    /// Puts `bucket` in `region`, as AWS would have a bucket outside the endpoint's default region:
    /// requests signed for any other region get `301 PermanentRedirect` with
    /// `x-amz-bucket-region`, and every answer about the bucket carries that header.
    pub fn set_bucket_region(&self, bucket: &str, region: &str) {
        self.state.set_bucket_region(bucket, region);
    }

    /// Takes at most `rate` requests per second (a token bucket) and answers the others `503
    /// SlowDown`, as S3 answers a burst on one prefix; `None` lifts the limit.
    pub fn set_request_rate(&self, rate: Option<RequestRate>) {
        self.state.set_request_rate(rate);
    }

    /// Caps each connection's response bodies at `limit` bytes per second, from the next response on.
    pub fn set_bandwidth_limit(&self, limit: Option<u64>) {
        self.state.set_bandwidth_limit(limit);
    }

    pub fn create_bucket(&self, bucket: &str) {
        let backend = self.backend.clone();
        let bucket = bucket.to_owned();
        self.run(async move { backend.create_bucket(&bucket).await });
    }

    pub fn put_object(&self, bucket: &str, key: &str, data: impl Into<Bytes>) {
        let (backend, bucket, key, data) = (self.backend.clone(), bucket.to_owned(), key.to_owned(), data.into());
        self.run(async move { backend.put_object(&bucket, &key, data).await });
    }

    /// Uploads a file without holding it in memory.
    pub fn put_file(&self, bucket: &str, key: &str, path: &Path) {
        let (backend, bucket, key, path) = (self.backend.clone(), bucket.to_owned(), key.to_owned(), path.to_owned());
        self.run(async move { backend.put_file(&bucket, &key, &path).await });
    }

    /// The object's content, `None` when there is no such key.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (backend, bucket, key) = (self.backend.clone(), bucket.to_owned(), key.to_owned());
        self.run(async move { backend.get_object(&bucket, &key).await })
    }

    /// The bucket's keys, sorted.
    pub fn list(&self, bucket: &str) -> Vec<String> {
        let (backend, bucket) = (self.backend.clone(), bucket.to_owned());
        self.run(async move { backend.list(&bucket).await })
    }

    /// Runs `work` on the server's runtime and waits for it; callable from sync code and from
    /// inside another runtime.
    /// A panic in `work` is raised again here.
    fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> T {
        let (done, result) = mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            // The receiver only goes away when the caller has panicked.
            done.send(AssertUnwindSafe(work).catch_unwind().await).ok();
        });
        match result.recv().expect("the S3 server's runtime stopped during a helper call") {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the S3 server's thread panicked");
        }
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    s3: S3Service,
    state: Arc<State>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = 0;
    loop {
        let tcp = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    // Out of file descriptors or similar: give the system a moment.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        connections += 1;
        let connection = Connection::new(connections);
        let front = Front::new(s3.clone(), Arc::clone(&state), Arc::clone(&connection));
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            tcp.set_nodelay(true).ok();
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let io = TokioIo::new(ConnectionIo::new(tls, connection));
            // Errors end this connection only: a client going away, or an injected fault.
            hyper::server::conn::http1::Builder::new().serve_connection(io, front).await.ok();
        });
    }
}
