//! Command line of `nvidia-webhook`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::InjectConfig;
use crate::limits::Limits;
pub use nvidia_contract::logging::LogFormat;
use nvidia_contract::{self as contract, DEFAULT_WAIT_TIMEOUT_TEXT};

#[derive(Debug, Parser)]
#[command(
    name = "nvidia-webhook",
    version,
    about = "Mutating admission webhook: GPU pods wait for the node's NVIDIA driver and see it at /usr/local/nvidia"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, env = "NVIDIA_WEBHOOK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve admission reviews over HTTPS: POST /mutate, GET /healthz, /readyz, /metrics.
    Serve(Box<ServeArgs>),
    /// Print manifests (file or stdin, YAML or JSON) mutated exactly as the server would.
    Inject(InjectArgs),
    /// Keep the serving certificate Secret valid and the webhook's caBundle in step (without cert-manager).
    Certs(CertsArgs),
    /// Check in the cluster that a GPU pod in a labelled namespace gets the injection (a
    /// server-side dry-run create; what `helm test` runs). Exits non-zero when it does not.
    Selftest(SelftestArgs),
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// A namespace labelled for injection, where the service account may create pods.
    #[arg(long, env = "NVIDIA_WEBHOOK_SELFTEST_NAMESPACE")]
    pub namespace: String,
    /// The GPU resource the probe pod requests.
    #[arg(long, env = "NVIDIA_WEBHOOK_SELFTEST_RESOURCE", default_value = "nvidia.com/gpu")]
    pub resource: String,
    /// The probe pod's image (never pulled: the create is a dry run).
    #[arg(long, env = "NVIDIA_WEBHOOK_SELFTEST_IMAGE", default_value = "registry.k8s.io/pause:3.10")]
    pub image: String,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Namespace of the Service and the Secret.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Secret holding the CA and the serving certificate.
    #[arg(long, env = "NVIDIA_WEBHOOK_TLS_SECRET")]
    pub secret: String,
    /// Service the API server calls (its DNS names go into the certificate).
    #[arg(long, env = "NVIDIA_WEBHOOK_SERVICE")]
    pub service: String,
    /// MutatingWebhookConfiguration whose caBundle is kept in step.
    #[arg(long, env = "NVIDIA_WEBHOOK_CONFIG")]
    pub webhook_config: String,
    /// Keep running and check again at --interval.
    #[arg(long, env = "NVIDIA_WEBHOOK_CERTS_WATCH")]
    pub watch: bool,
    #[arg(long, env = "NVIDIA_WEBHOOK_CERTS_INTERVAL", value_parser = humantime::parse_duration, default_value = "1h")]
    pub interval: Duration,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "NVIDIA_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// PEM certificate chain; reloaded when it changes.
    #[arg(long, env = "NVIDIA_WEBHOOK_TLS_CERT", default_value = "/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key; reloaded when it changes.
    #[arg(long, env = "NVIDIA_WEBHOOK_TLS_KEY", default_value = "/tls/tls.key")]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes.
    #[arg(long, env = "NVIDIA_WEBHOOK_TLS_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub tls_reload_interval: Duration,
    /// After SIGTERM: how long to keep serving with /readyz failing.
    #[arg(long, env = "NVIDIA_WEBHOOK_SHUTDOWN_DELAY", value_parser = humantime::parse_duration, default_value = "5s")]
    pub shutdown_delay: Duration,
    /// After the delay: how long in-flight requests get to finish.
    #[arg(long, env = "NVIDIA_WEBHOOK_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub inject: InjectionArgs,
}

/// What one client can make the server hold (see `nvidia_webhook::limits`).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Connections open at once; a new one beyond takes the place of the one idle the longest.
    #[arg(long, env = "NVIDIA_WEBHOOK_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "NVIDIA_WEBHOOK_MAX_STREAMS", default_value_t = Limits::default().max_streams)]
    pub max_streams: u32,
    /// Time for a TLS handshake.
    #[arg(long, env = "NVIDIA_WEBHOOK_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub handshake_timeout: Duration,
    /// Time for an HTTP/1 request head.
    #[arg(long, env = "NVIDIA_WEBHOOK_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub header_timeout: Duration,
    /// Time for a whole request body.
    #[arg(long, env = "NVIDIA_WEBHOOK_BODY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub body_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    #[arg(long, env = "NVIDIA_WEBHOOK_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "90s")]
    pub idle_timeout: Duration,
    /// Request body bytes buffered at once across the server; beyond it requests get 503.
    #[arg(long, env = "NVIDIA_WEBHOOK_MAX_BUFFERED_BYTES", default_value_t = Limits::default().max_buffered_bytes)]
    pub max_buffered_bytes: usize,
    /// Request body bytes buffered at once for one client address; beyond it requests get 503.
    #[arg(long, env = "NVIDIA_WEBHOOK_MAX_PEER_BYTES", default_value_t = Limits::default().max_peer_bytes)]
    pub max_peer_bytes: usize,
    /// Request body bytes buffered at once on one connection; beyond it requests get 503.
    #[arg(long, env = "NVIDIA_WEBHOOK_MAX_CONNECTION_BYTES", default_value_t = Limits::default().max_connection_bytes)]
    pub max_connection_bytes: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections.max(1),
            max_streams: self.max_streams.max(1),
            handshake_timeout: self.handshake_timeout,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
            max_buffered_bytes: self.max_buffered_bytes,
            max_peer_bytes: self.max_peer_bytes,
            max_connection_bytes: self.max_connection_bytes,
        }
    }
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Manifest file, or `-` for stdin.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub file: PathBuf,
    #[command(flatten)]
    pub inject: InjectionArgs,
}

/// What the webhook injects; the chart passes the same values as to the installer DaemonSet.
#[derive(Debug, Args)]
pub struct InjectionArgs {
    /// Image of nvidia-installer for the init container.
    #[arg(long, env = "NVIDIA_WEBHOOK_INSTALLER_IMAGE", default_value = "ghcr.io/gardenlinux/nvidia-installer:latest")]
    pub installer_image: String,
    /// imagePullPolicy of the init container.
    #[arg(long, env = "NVIDIA_WEBHOOK_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// Host directory with the driver cache, `current` and `ready`.
    #[arg(long, env = "NVIDIA_WEBHOOK_DRIVER_ROOT", default_value = contract::DRIVER_ROOT)]
    pub driver_root: String,
    /// Where GPU containers see the driver.
    #[arg(long, env = "NVIDIA_WEBHOOK_MOUNT_PATH", default_value = contract::MOUNT_PATH)]
    pub mount_path: String,
    /// How long the init container waits for the driver.
    #[arg(long, env = "NVIDIA_WEBHOOK_WAIT_TIMEOUT", value_parser = humantime::parse_duration, default_value = DEFAULT_WAIT_TIMEOUT_TEXT)]
    pub wait_timeout: Duration,
    /// Resource names that make a container a GPU container (a trailing `*` matches a prefix).
    #[arg(
        long,
        env = "NVIDIA_WEBHOOK_GPU_RESOURCES",
        value_delimiter = ',',
        default_values_t = contract::DEFAULT_GPU_RESOURCES.map(String::from)
    )]
    pub gpu_resources: Vec<String>,
    /// Set or extend LD_LIBRARY_PATH in GPU containers.
    #[arg(long, env = "NVIDIA_WEBHOOK_SET_LIBRARY_PATH", default_value_t = true, action = clap::ArgAction::Set)]
    pub set_library_path: bool,
}

impl InjectionArgs {
    pub fn config(&self) -> crate::Result<InjectConfig> {
        let config = InjectConfig {
            installer_image: self.installer_image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            driver_root: self.driver_root.clone(),
            mount_path: self.mount_path.clone(),
            wait_timeout: self.wait_timeout,
            gpu_resources: self.gpu_resources.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
            set_library_path: self.set_library_path,
        };
        config.validate()?;
        Ok(config)
    }
}
