//! Command line of `nvidia-installer`. Every flag also reads an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use nvidia_contract::layout::Layout;
pub use nvidia_contract::logging::LogFormat;
use nvidia_contract::{DEFAULT_MODULES_TEXT, DEFAULT_WAIT_TIMEOUT_TEXT, DRIVER_ROOT};

use crate::compiler::compile::Flavor;
use crate::s3::{S3Options, Transfer};

#[derive(Debug, Parser)]
#[command(
    name = "nvidia-installer",
    version,
    about = "NVIDIA drivers for Garden Linux nodes: stage from S3, load, mark ready; gate GPU pods"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, env = "NVIDIA_INSTALLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stage, load the modules, create device nodes, run nvidia-smi, write the ready marker, label the node.
    Install(InstallArgs),
    /// Download, verify and extract the bundle into the host cache; no kernel changes.
    Stage(StageArgs),
    /// Block until the node's driver (or the pinned version) is ready.
    Wait(WaitArgs),
    /// Print the node's driver state as JSON.
    Status(StatusArgs),
    /// Remove cached bundles other than current (keep the newest N of the others).
    Gc(GcArgs),
    /// Pack a bundle directory (bin/, lib/, modules/) into a tar.zst with its manifest.
    Pack(PackArgs),
    /// Upload a bundle to S3; its manifest supplies driver version and kernel release.
    Publish(PublishArgs),
    /// Build the modules for a kernel from a driver source and headers, and pack the bundle.
    Compile(CompileArgs),
    /// In the privileged dev container: serve compile requests from the FIFOs in --cmd-dir.
    DevServe(DevServeArgs),
    /// In the modulus container: send a compile request to dev-serve, wait, then publish.
    Modulus(ModulusArgs),
    /// Drive live driver upgrades: cordon, drain and switch at most --max-unavailable GPU nodes at
    /// a time (the chart's upgrade controller Deployment).
    UpgradeController(UpgradeControllerArgs),
}

/// How the upgrade controller paces a rollout.
#[derive(Debug, Args)]
pub struct UpgradeControllerArgs {
    /// The installer pods' namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// The installer pods' labels (`key=value,...`): deleting a node's installer pod starts the switch.
    #[arg(long, env = "NVIDIA_INSTALLER_POD_LABELS", value_delimiter = ',')]
    pub installer_labels: Vec<String>,
    /// GPU nodes upgraded at once: a number or a percentage of the GPU nodes.
    #[arg(long, env = "NVIDIA_UPGRADE_MAX_UNAVAILABLE", default_value = "1")]
    pub max_unavailable: crate::upgrade::MaxUnavailable,
    /// How long pods holding the driver may take to leave a draining node.
    #[arg(long, env = "NVIDIA_UPGRADE_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub drain_timeout: Duration,
    /// Then: keep waiting (wait), delete them (force-after), or give the node up (skip-node).
    #[arg(long, env = "NVIDIA_UPGRADE_DRAIN_POLICY", value_enum, default_value = "wait")]
    pub on_drain_timeout: crate::upgrade::DrainPolicy,
    /// How long a node may stay in `unloading`, `installing` or `validating` before a warning Event;
    /// a node in `unloading` that cannot be switched by then (NotReady, no installer pod) is marked
    /// `failed` and uncordoned with the driver it has.
    #[arg(long, env = "NVIDIA_UPGRADE_SWITCH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "15m")]
    pub switch_timeout: Duration,
    /// GPU resources (`prefix*` allowed): pods asking for one are drained.
    #[arg(
        long,
        env = "NVIDIA_INSTALLER_GPU_RESOURCES",
        value_delimiter = ',',
        default_value = "nvidia.com/gpu,nvidia.com/mig-*"
    )]
    pub gpu_resources: Vec<String>,
    /// How often it looks.
    #[arg(long, env = "NVIDIA_UPGRADE_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub interval: Duration,
    /// The Lease (in --namespace) one controller at a time holds; others stand by.
    #[arg(long, env = "NVIDIA_UPGRADE_LEASE", default_value = "nvidia-installer-upgrade-controller")]
    pub lease_name: String,
    /// How long a Lease not renewed stays its holder's before a standing-by controller takes it.
    #[arg(long, env = "NVIDIA_UPGRADE_LEASE_DURATION", value_parser = whole_seconds, default_value = "15s")]
    pub lease_duration: Duration,
    /// This controller's name in the Lease (a unique suffix is added); the pod's name in the chart.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Serve the controller's metrics (`GET /metrics`, plain HTTP) on this address, e.g. 0.0.0.0:9403.
    #[arg(long, env = "NVIDIA_UPGRADE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What `install` does when another driver version is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpgradeMode {
    /// Refuse (drain and reboot the node by hand).
    Manual,
    /// Stage beside it, ask the upgrade controller, and switch when it orders.
    Controller,
}

/// The driver source and how to build it; shared by `compile`, `modulus` and `install
/// --allow-compilation`.
#[derive(Debug, Clone, Args)]
pub struct DriverSourceArgs {
    /// A .run installer, a directory or tarball of the kernel-module sources, or an http(s) URL of
    /// one (needed to compile).
    #[arg(long, env = "NVIDIA_DRIVER_SOURCE")]
    pub driver_source: Option<String>,
    /// sha256 the source must have (without it a download is not verified; a warning says so).
    /// Downloads trust the system's CA certificates (SSL_CERT_FILE / SSL_CERT_DIR to change them).
    #[arg(long, env = "NVIDIA_DRIVER_SHA256")]
    pub driver_sha256: Option<String>,
    /// Directory with bin/ and lib/ (default: the .run's own files).
    #[arg(long, env = "NVIDIA_USERSPACE_DIR")]
    pub userspace: Option<PathBuf>,
    /// Kernel build tree (Debian's split trees are followed); default /lib/modules/<release>/build
    /// where the build runs.
    #[arg(long, env = "KERNEL_HEADERS")]
    pub kernel_headers: Option<PathBuf>,
    #[arg(long, env = "NVIDIA_DRIVER_FLAVOR", value_enum, default_value = "auto")]
    pub flavor: Flavor,
    /// Directory of *.patch files applied in name order before the build.
    #[arg(long, env = "NVIDIA_DRIVER_PATCHES")]
    pub patches: Option<PathBuf>,
    /// GPU firmware for this driver version (gsp_*.bin), for sources that ship it apart from the
    /// .run (e.g. Debian's firmware-nvidia-gsp): the files' directory, or a root with nvidia/<version>/.
    #[arg(long, env = "NVIDIA_DRIVER_FIRMWARE")]
    pub firmware: Option<PathBuf>,
    /// Allow an http:// driver source (refused by default: only https://).
    #[arg(long, env = "NVIDIA_DRIVER_ALLOW_HTTP")]
    pub allow_http: bool,
    /// Sign the built modules with this private key (PEM), for kernels that enforce module
    /// signatures (Secure Boot); with --module-signing-cert.
    #[arg(long, env = "NVIDIA_MODULE_SIGNING_KEY", requires = "module_signing_cert")]
    pub module_signing_key: Option<PathBuf>,
    /// The X.509 certificate of --module-signing-key, as enrolled on the nodes (MOK).
    #[arg(long, env = "NVIDIA_MODULE_SIGNING_CERT", requires = "module_signing_key")]
    pub module_signing_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CompileArgs {
    #[command(flatten)]
    pub source: DriverSourceArgs,
    /// Default: what the headers say.
    #[arg(long, env = "KERNEL_RELEASE")]
    pub kernel_release: Option<String>,
    /// The bundle to write (default: <out-dir>/nvidia-bundle.tar.zst).
    #[arg(long, env = "NVIDIA_INSTALLER_OUTPUT")]
    pub output: Option<PathBuf>,
    #[arg(long, env = "NVIDIA_INSTALLER_OUT_DIR", default_value = "/out")]
    pub out_dir: PathBuf,
    /// Default: what the sources say.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: Option<String>,
    #[arg(long, env = "GARDENLINUX_VERSION")]
    pub gardenlinux_version: Option<String>,
    /// Parallel make jobs (0: one per core).
    #[arg(long, env = "NVIDIA_INSTALLER_JOBS", default_value_t = 0)]
    pub jobs: usize,
}

#[derive(Debug, Clone, Args)]
pub struct DevServeArgs {
    /// The shared directory with the FIFOs.
    #[arg(long, env = "NVIDIA_INSTALLER_CMD_DIR", default_value = "/cmd")]
    pub cmd_dir: PathBuf,
    /// The shared output directory (requests name their output in it).
    #[arg(long, env = "NVIDIA_INSTALLER_OUT_DIR", default_value = "/out")]
    pub out_dir: PathBuf,
    /// Where sources are unpacked and built.
    #[arg(long, env = "NVIDIA_INSTALLER_WORK_DIR", default_value = "/tmp/nvidia-build")]
    pub work_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ModulusArgs {
    #[arg(long, env = "NVIDIA_INSTALLER_CMD_DIR", default_value = "/cmd")]
    pub cmd_dir: PathBuf,
    #[command(flatten)]
    pub compile: CompileArgs,
    /// How long to wait for the dev container to start serving.
    #[arg(long, env = "NVIDIA_INSTALLER_DEV_WAIT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub dev_wait: Duration,
    /// How long the build may take.
    #[arg(long, env = "NVIDIA_INSTALLER_COMPILE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60m")]
    pub timeout: Duration,
    /// Publish the bundle to the bucket afterwards.
    #[arg(long, env = "NVIDIA_INSTALLER_PUBLISH")]
    pub publish: bool,
    /// Replace an existing bundle when publishing.
    #[arg(long, env = "NVIDIA_INSTALLER_FORCE")]
    pub force: bool,
    /// Keep running after success (a DaemonSet container would otherwise be restarted and build again).
    #[arg(long, env = "NVIDIA_INSTALLER_STAY")]
    pub stay: bool,
    /// Sign the published manifest with this signify secret key.
    #[arg(long, env = "NVIDIA_INSTALLER_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    #[arg(long, env = "NVIDIA_INSTALLER_BUCKET")]
    pub bucket: Option<String>,
    #[command(flatten)]
    pub endpoint: S3Endpoint,
}

#[derive(Debug, Args)]
pub struct PackArgs {
    /// Directory with bin/, lib/ and modules/.
    #[arg(long, env = "NVIDIA_INSTALLER_BUNDLE_DIR")]
    pub dir: PathBuf,
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: String,
    /// Kernel release the modules were built for (checked against their vermagic).
    #[arg(long, env = "KERNEL_RELEASE")]
    pub kernel_release: String,
    /// open or proprietary.
    #[arg(long, env = "NVIDIA_INSTALLER_FLAVOR", default_value = "open")]
    pub flavor: String,
    #[arg(long, env = "GARDENLINUX_VERSION")]
    pub gardenlinux_version: Option<String>,
    /// The tar.zst to write.
    #[arg(long, env = "NVIDIA_INSTALLER_OUTPUT")]
    pub output: PathBuf,
    /// zstd level.
    #[arg(long, env = "NVIDIA_INSTALLER_ZSTD_LEVEL", default_value_t = 9)]
    pub level: i32,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The tar.zst made by compile or pack.
    #[arg(long, env = "NVIDIA_INSTALLER_BUNDLE")]
    pub bundle: PathBuf,
    #[arg(long, env = "GARDENLINUX_VERSION")]
    pub gardenlinux_version: String,
    /// Replace an existing bundle.
    #[arg(long, env = "NVIDIA_INSTALLER_FORCE")]
    pub force: bool,
    /// Sign the manifest with this signify secret key (unencrypted: signify-openbsd -G -n).
    #[arg(long, env = "NVIDIA_INSTALLER_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    #[command(flatten)]
    pub s3: S3Args,
}

/// Where the host is and which driver.
#[derive(Debug, Clone, Args)]
pub struct HostArgs {
    /// Where the node's root is mounted (every host path is taken under it).
    #[arg(long, env = "NVIDIA_INSTALLER_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,
    /// Driver root on the host: cache/, current, ready.
    #[arg(long, env = "NVIDIA_INSTALLER_DRIVER_ROOT", default_value = DRIVER_ROOT)]
    pub driver_root: String,
}

impl HostArgs {
    pub fn layout(&self) -> Layout {
        Layout::new(&self.host_root, &self.driver_root)
    }
}

/// Which bundle.
#[derive(Debug, Clone, Args)]
pub struct BundleArgs {
    /// NVIDIA driver version, e.g. 535.261.03.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: String,
    /// Garden Linux version, e.g. 1877.3; default: GARDENLINUX_VERSION (or VERSION_ID) in the host's /etc/os-release.
    #[arg(long, env = "GARDENLINUX_VERSION")]
    pub gardenlinux_version: Option<String>,
    /// Kernel release; default: the running kernel.
    #[arg(long, env = "KERNEL_RELEASE")]
    pub kernel_release: Option<String>,
    /// Public keys (signify .pub files' base64 lines) one of which must have signed a bundle's
    /// manifest; several, comma-separated, while keys are rotated. None: signatures are not checked.
    #[arg(long, env = "NVIDIA_INSTALLER_TRUSTED_KEYS", value_delimiter = ',')]
    pub trusted_keys: Vec<String>,
    /// With trusted keys: still accept bundles that carry no signature (and the original
    /// system's, which have none).
    #[arg(long, env = "NVIDIA_INSTALLER_ALLOW_UNSIGNED")]
    pub allow_unsigned: bool,
}

/// The bucket. Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the default chain.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    #[arg(long, env = "NVIDIA_INSTALLER_BUCKET")]
    pub bucket: String,
    #[command(flatten)]
    pub endpoint: S3Endpoint,
    /// Bytes per ranged GET.
    #[arg(long, env = "NVIDIA_INSTALLER_PART_SIZE", default_value_t = 4 << 20)]
    pub part_size: u64,
    /// Ranged GETs in flight.
    #[arg(long, env = "NVIDIA_INSTALLER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// The longest one ranged GET may take before it is retried from where it stopped (a stalled
    /// or trickling server); after the retries the stage fails naming the object.
    #[arg(long, env = "NVIDIA_INSTALLER_STALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub stall_timeout: Duration,
    /// Wait a random time up to this long before the first request to the bucket (not on a cache
    /// hit), so that a node pool started at once reaches the bucket spread out.
    #[arg(long, env = "NVIDIA_INSTALLER_START_JITTER", value_parser = humantime::parse_duration, default_value = "10s")]
    pub start_jitter: Duration,
    /// How long throttling (503 SlowDown, 429) is retried, with backoff and fewer requests in
    /// flight, before staging fails; other failures are retried a few times only.
    #[arg(long, env = "NVIDIA_INSTALLER_S3_DEADLINE", value_parser = humantime::parse_duration, default_value = "30m")]
    pub s3_deadline: Duration,
}

/// Where the bucket is served and which CA to trust; shared by every command that talks to S3.
#[derive(Debug, Clone, Args)]
pub struct S3Endpoint {
    /// Endpoint of an S3-compatible store (path-style addressing).
    #[arg(long, env = "NVIDIA_INSTALLER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    #[arg(long, env = "NVIDIA_INSTALLER_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,
}

impl S3Endpoint {
    pub fn options(&self, bucket: &str) -> S3Options {
        S3Options {
            bucket: bucket.to_owned(),
            endpoint: given(&self.s3_endpoint),
            region: given(&self.region),
            ca_file: given(&self.s3_ca_file),
            access_key_id: None,
            secret_access_key: None,
            app_name: None,
        }
    }
}

impl S3Args {
    pub fn options(&self) -> S3Options {
        self.endpoint.options(&self.bucket)
    }

    pub fn transfer(&self) -> Transfer {
        Transfer {
            part_size: self.part_size,
            stall_timeout: self.stall_timeout,
            start_jitter: self.start_jitter,
            ..Transfer::new(self.concurrency, self.s3_deadline)
        }
    }
}

#[derive(Debug, Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub host: HostArgs,
    #[command(flatten)]
    pub bundle: BundleArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub stage: StageArgs,
    /// Modules to load, in dependency order (nvidia-drm and nvidia-peermem on request).
    #[arg(
        long,
        env = "NVIDIA_INSTALLER_MODULES",
        value_delimiter = ',',
        default_value = DEFAULT_MODULES_TEXT
    )]
    pub modules: Vec<String>,
    /// This node's name (downward API), for labels and Events.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// When the bucket has no bundle, compile one here (needs the dev image: headers and gcc).
    #[arg(long, env = "NVIDIA_INSTALLER_ALLOW_COMPILATION")]
    pub allow_compilation: bool,
    /// What --allow-compilation builds from.
    #[command(flatten)]
    pub source: DriverSourceArgs,
    /// Stage for real, then print the kernel operations install would perform, in order, without
    /// performing them (no module loaded, no device node, no ready marker, no node update).
    #[arg(long, env = "NVIDIA_INSTALLER_DRY_RUN")]
    pub dry_run: bool,
    /// When another driver version is loaded: refuse (manual), or go through the upgrade
    /// controller (controller; needs --node-name).
    #[arg(long, env = "NVIDIA_INSTALLER_UPGRADE_MODE", value_enum, default_value = "manual")]
    pub upgrade_mode: UpgradeMode,
    /// Replace a loaded driver of another version now, without a reboot: wait (--unload-wait)
    /// until nothing holds it, unload it, install this one, and load the old one again if this one
    /// fails. For a node drained by hand; the upgrade controller orders the same switch itself.
    #[arg(long, env = "NVIDIA_INSTALLER_SWITCH")]
    pub switch: bool,
    /// In an ordered switch: how long to wait for processes to let go of the old driver.
    #[arg(long, env = "NVIDIA_INSTALLER_UNLOAD_WAIT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub unload_wait: Duration,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Wait for exactly this driver version.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: Option<String>,
    /// Give up after this long (e.g. 10m).
    #[arg(long, env = "NVIDIA_WAIT_TIMEOUT", value_parser = humantime::parse_duration, default_value = DEFAULT_WAIT_TIMEOUT_TEXT)]
    pub timeout: Duration,
}

impl From<&WaitArgs> for nvidia_contract::WaitInvocation {
    fn from(args: &WaitArgs) -> Self {
        Self {
            host_root: args.host.host_root.display().to_string(),
            driver_root: args.host.driver_root.clone(),
            timeout: args.timeout,
            driver_version: args.driver_version.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Judge readiness for this driver version.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: Option<String>,
    /// Keep running and print the state whenever it changes.
    #[arg(long, env = "NVIDIA_INSTALLER_STATUS_WATCH")]
    pub watch: bool,
    /// How often --watch looks.
    #[arg(long, env = "NVIDIA_INSTALLER_STATUS_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub interval: Duration,
    /// With --watch: serve the node's metrics (Prometheus text) at GET /metrics on this address,
    /// plain HTTP (e.g. 0.0.0.0:9402).
    #[arg(long, env = "NVIDIA_INSTALLER_METRICS_LISTEN", requires = "watch")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Write the node's metrics to this file at every look (node-exporter's textfile collector:
    /// a `*.prom` file in its directory).
    #[arg(long, env = "NVIDIA_INSTALLER_METRICS_TEXTFILE")]
    pub metrics_textfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Bundles to keep besides current.
    #[arg(long, env = "NVIDIA_INSTALLER_GC_KEEP", default_value_t = 1)]
    pub keep: usize,
}

/// A flag's value, or `None` when it is unset or empty (the chart passes empty values for
/// settings left to their defaults).
pub fn given<T: Clone + AsRef<std::ffi::OsStr>>(value: &Option<T>) -> Option<T> {
    value.clone().filter(|v| !v.as_ref().is_empty())
}

/// A duration of whole seconds, at least one (a Lease's duration is written in seconds).
fn whole_seconds(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() || duration.subsec_nanos() != 0 {
        return Err(format!("{text}: whole seconds, at least 1s"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;
    use nvidia_contract::WaitInvocation;

    use super::*;

    fn parse_wait(invocation: &WaitInvocation) -> WaitArgs {
        let argv = std::iter::once(nvidia_contract::INSTALLER_BINARY.to_owned()).chain(invocation.args());
        match Cli::try_parse_from(argv).expect("the rendered wait parses").command {
            Command::Wait(args) => args,
            other => panic!("parsed as {other:?}"),
        }
    }

    /// What the webhook renders is what `wait` parses, field by field.
    #[test]
    fn the_injected_wait_invocation_round_trips() {
        for (timeout, pin) in [
            (nvidia_contract::DEFAULT_WAIT_TIMEOUT, None),
            (Duration::from_secs(90), Some("550.54.14")),
            (Duration::from_millis(1500), Some("535.261.03")),
            (Duration::from_secs(3 * 3600 + 1), None),
        ] {
            let invocation = WaitInvocation::for_pod(nvidia_contract::DRIVER_ROOT, timeout, pin);
            assert_eq!(WaitInvocation::from(&parse_wait(&invocation)), invocation);
        }
    }

    #[test]
    fn defaults_come_from_the_contract() {
        let args = match Cli::try_parse_from(["nvidia-installer", "wait"]).expect("parses").command {
            Command::Wait(args) => args,
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(args.timeout, nvidia_contract::DEFAULT_WAIT_TIMEOUT);
        assert_eq!(args.host.driver_root, nvidia_contract::DRIVER_ROOT);
        let install = Cli::try_parse_from(["nvidia-installer", "install", "--driver-version", "1", "--bucket", "b"])
            .expect("parses");
        let Command::Install(install) = install.command else { panic!("not install") };
        assert_eq!(install.modules, nvidia_contract::DEFAULT_MODULES);
    }

    #[test]
    fn a_lease_duration_is_whole_seconds() {
        assert_eq!(whole_seconds("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(whole_seconds("1m"), Ok(Duration::from_secs(60)));
        assert!(whole_seconds("0s").is_err());
        assert!(whole_seconds("1500ms").is_err());
    }
}
