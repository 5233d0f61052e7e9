//! Command line of `nvidia-installer`. Every flag also reads an environment variable.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::archive::Limits;
use crate::layout::{DRIVER_ROOT, Layout};
use crate::s3::{S3Options, Transfer};
use crate::{Error, Result};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
    /// Garden Linux version, e.g. 1877.3.
    #[arg(long, env = "GARDENLINUX_VERSION")]
    pub gardenlinux_version: String,
    /// Kernel release; default: the running kernel.
    #[arg(long, env = "KERNEL_RELEASE")]
    pub kernel_release: Option<String>,
}

/// The bucket. Credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the default chain.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    #[arg(long, env = "NVIDIA_INSTALLER_BUCKET")]
    pub bucket: String,
    /// Endpoint of an S3-compatible store (path-style addressing).
    #[arg(long, env = "NVIDIA_INSTALLER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Extra CA certificates (PEM) to trust for the endpoint.
    #[arg(long, env = "NVIDIA_INSTALLER_S3_CA_FILE")]
    pub s3_ca_file: Option<PathBuf>,
    /// Bytes per ranged GET.
    #[arg(long, env = "NVIDIA_INSTALLER_PART_SIZE", default_value_t = 8 << 20)]
    pub part_size: u64,
    /// Ranged GETs in flight.
    #[arg(long, env = "NVIDIA_INSTALLER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
}

impl S3Args {
    pub fn options(&self) -> S3Options {
        S3Options {
            bucket: self.bucket.clone(),
            endpoint: self.s3_endpoint.clone().filter(|s| !s.is_empty()),
            region: self.region.clone().filter(|s| !s.is_empty()),
            ca_file: self.s3_ca_file.clone(),
            access_key_id: None,
            secret_access_key: None,
        }
    }

    pub fn transfer(&self) -> Transfer {
        Transfer { part_size: self.part_size, concurrency: self.concurrency, ..Transfer::default() }
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
        default_value = "nvidia,nvidia-uvm,nvidia-modeset"
    )]
    pub modules: Vec<String>,
    /// This node's name (downward API), for labels and Events.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Wait for exactly this driver version.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: Option<String>,
    /// Give up after this long (e.g. 10m).
    #[arg(long, env = "NVIDIA_WAIT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10m")]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Judge readiness for this driver version.
    #[arg(long, env = "NVIDIA_DRIVER_VERSION")]
    pub driver_version: Option<String>,
    /// Keep running and print the state whenever it changes (checked at this interval).
    #[arg(long, env = "NVIDIA_INSTALLER_STATUS_WATCH", value_parser = humantime::parse_duration)]
    pub watch: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub host: HostArgs,
    /// Bundles to keep besides current.
    #[arg(long, env = "NVIDIA_INSTALLER_GC_KEEP", default_value_t = 1)]
    pub keep: usize,
}

/// Resolve the kernel release: the flag, else the running kernel.
pub fn kernel_release(layout: &Layout, flag: Option<&str>) -> Result<String> {
    match flag.filter(|k| !k.is_empty()) {
        Some(k) => Ok(k.to_owned()),
        None => crate::layout::running_kernel(layout)
            .ok_or_else(|| Error::Config("cannot read the running kernel release; pass --kernel-release".to_owned())),
    }
}

/// The stage request the flags describe.
pub fn stage_request(args: &StageArgs) -> Result<crate::stage::StageRequest> {
    let layout = args.host.layout();
    for (flag, value) in
        [("--driver-version", &args.bundle.driver_version), ("--gardenlinux-version", &args.bundle.gardenlinux_version)]
    {
        if !valid_component(value) {
            return Err(Error::Config(format!(
                "{flag} {value:?} is not a plain version (letters, digits, '.', '-', '_')"
            )));
        }
    }
    let kernel_release = kernel_release(&layout, args.bundle.kernel_release.as_deref())?;
    if !valid_component(&kernel_release) {
        return Err(Error::Config(format!("kernel release {kernel_release:?} is not a plain name")));
    }
    Ok(crate::stage::StageRequest {
        gardenlinux_version: args.bundle.gardenlinux_version.clone(),
        kernel_release,
        driver_version: args.bundle.driver_version.clone(),
        s3: args.s3.options(),
        transfer: args.s3.transfer(),
        limits: Limits::default(),
    })
}

/// Versions and releases become path components and object keys.
pub fn valid_component(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && !value.starts_with(['.', '-'])
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}
