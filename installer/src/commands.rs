//! One function per command: resolve the request the flags describe (filling in what the host
//! knows: its Garden Linux version, its running kernel), run it, print the outcome.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nvidia_contract::NameKind;
use nvidia_contract::layout::Layout;
use nvidia_contract::names;
use tracing::{info, warn};

use crate::bundle::archive::Limits;
use crate::bundle::manifest::ArchiveEntry;
use crate::bundle::pack::{self, BundleInfo};
use crate::bundle::signature::{PublicKey, SecretKey};
use crate::cli::{
    CompileArgs, DevServeArgs, DriverSourceArgs, GcArgs, InstallArgs, ModulusArgs, PackArgs, PublishArgs, StageArgs,
    StatusArgs, UpgradeControllerArgs, UpgradeMode, WaitArgs, given,
};
use crate::compiler::compile::{self, CompileRequest, Flavor};
use crate::compiler::fifo::{self, Pipes};
use crate::compiler::publish;
use crate::node::install::{self, InstallRequest, Upgrade};
use crate::node::kernel::HostKernel;
use crate::node::stage::{self, StageRequest, Trust};
use crate::node::{api::Reporter, gc, gpus, metrics, ready, status};
use crate::s3::Bucket;
use crate::{Error, Result};

pub async fn stage(args: &StageArgs) -> Result<()> {
    let request = stage_request(args)?;
    let staged = stage::stage(&args.host.layout(), &request).await?;
    match &staged.held_back_by {
        Some(ready) => println!(
            "staged {} beside driver {ready}, which stays current until the node is drained and rebooted",
            staged.bundle.display()
        ),
        None => println!("staged {}", staged.bundle.display()),
    }
    Ok(())
}

pub async fn install(args: &InstallArgs) -> Result<()> {
    let mut stage = stage_request(&args.stage)?;
    stage.s3.app_name = given(&args.node_name);
    let layout = args.stage.host.layout();
    stage.flavors = gpus::flavors_for(&gpus::nvidia_gpus(&layout), args.source.flavor)?;
    let mut compile = allow_compilation_request(args, &stage)?;
    if compile.is_some() && stage.trust.as_ref().is_some_and(|t| !t.allow_unsigned) {
        return Err(Error::Usage(
            "--allow-compilation builds unsigned bundles on the node, and trusted keys are configured: pass --allow-unsigned too (nvidiaInstaller.allowUnsigned), or publish signed bundles and drop allowCompilation".to_owned(),
        ));
    }
    if let Some(compile) = compile.as_mut()
        && compile.flavor == Flavor::Auto
        && stage.flavors.as_deref() == Some(&["proprietary".to_owned()])
    {
        // The branch's default could be the open modules, which this node's GPUs cannot run.
        compile.flavor = Flavor::Proprietary;
    }
    let mut request = InstallRequest { stage, modules: args.modules.clone(), compile, upgrade: Upgrade::Manual };
    if args.dry_run {
        let plan = install::dry_run(&layout, &request).await?;
        println!("staged {}", plan.staged.bundle.display());
        println!("dry run: install would now perform, in this order (nothing below was done):");
        print!("{plan}");
        return Ok(());
    }
    let reporter = Reporter::for_node(args.node_name.as_deref()).await?;
    if args.switch {
        let order = Some((crate::upgrade::State::Unloading, Some(request.stage.driver_version.clone())));
        request.upgrade = Upgrade::Controller { order, unload_wait: args.unload_wait, recheck: false };
    } else if args.upgrade_mode == UpgradeMode::Controller {
        request.upgrade = Upgrade::Controller {
            order: reporter.upgrade_order().await?,
            unload_wait: args.unload_wait,
            recheck: true,
        };
    }
    let kernel = HostKernel { host_root: args.stage.host.host_root.clone() };
    let marker = install::install(&layout, &request, &kernel, &reporter).await?;
    if args.switch && marker.driver_version != request.stage.driver_version {
        return Err(Error::Upgrade {
            reason: format!(
                "driver {} was not installed; driver {} is loaded and serving (the log above says why)",
                request.stage.driver_version, marker.driver_version
            ),
        });
    }
    println!("NVIDIA driver {} ready for kernel {}", marker.driver_version, marker.kernel_release);
    Ok(())
}

pub async fn wait(args: &WaitArgs) -> Result<()> {
    let pin = given(&args.driver_version);
    if let Some(pin) = &pin {
        names::check(NameKind::DriverVersion, pin)?;
    }
    let marker = ready::wait(&args.host.layout(), pin.as_deref(), args.timeout).await?;
    println!(
        "NVIDIA driver {} is ready (kernel {}, since {})",
        marker.driver_version, marker.kernel_release, marker.ready_at
    );
    Ok(())
}

pub async fn status(args: &StatusArgs) -> Result<()> {
    let layout = args.host.layout();
    let pin = given(&args.driver_version);
    if let Some(listen) = args.metrics_listen {
        let (layout, pin) = (layout.clone(), pin.clone());
        tokio::spawn(async move {
            if let Err(error) = metrics::serve(listen, layout, pin).await {
                tracing::error!(%error, "the metrics endpoint stopped");
            }
        });
    }
    let mut last = String::new();
    loop {
        let state = status::status(&layout, pin.as_deref());
        if let Some(path) = &args.metrics_textfile {
            let text = metrics::render(&state, metrics::read_record(&layout).as_ref());
            if let Err(error) = metrics::write_textfile(path, &text) {
                warn!(%error, "writing the metrics textfile");
            }
        }
        let text = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::Encode { what: "the status", reason: e.to_string() })?;
        if text != last {
            println!("{text}");
            last = text;
        }
        if !args.watch {
            return match state.reason {
                Some(reason) if !state.ready => Err(Error::NotReady(reason)),
                _ => Ok(()),
            };
        }
        tokio::time::sleep(args.interval.max(Duration::from_millis(100))).await;
    }
}

pub async fn gc(args: &GcArgs) -> Result<()> {
    for removed in gc::gc(&args.host.layout(), args.keep).await? {
        println!("removed {}", removed.display());
    }
    Ok(())
}

pub fn pack(args: &PackArgs) -> Result<()> {
    let info = BundleInfo {
        driver_version: args.driver_version.clone(),
        kernel_release: args.kernel_release.clone(),
        flavor: args.flavor.clone(),
        gardenlinux_version: given(&args.gardenlinux_version),
    };
    let manifest = pack::describe(&args.dir, &info)?;
    let packed = pack::pack(&args.dir, &manifest, &args.output, args.level)?;
    let archive = packed.archive.unwrap_or(ArchiveEntry { sha256: String::new(), size: 0 });
    println!(
        "packed {} ({} files, {} bytes, sha256 {})",
        args.output.display(),
        packed.files.len(),
        archive.size,
        archive.sha256
    );
    Ok(())
}

pub async fn publish(args: &PublishArgs) -> Result<()> {
    let bucket = Bucket::connect(&args.s3.options()).await?;
    let key = signing_key(&args.signing_key)?;
    let published = publish::publish(
        &bucket,
        &args.bundle,
        &args.gardenlinux_version,
        args.force,
        key.as_ref(),
        &args.s3.transfer(),
    )
    .await?;
    report_published(&bucket, &published);
    Ok(())
}

fn report_published(bucket: &Bucket, published: &publish::Published) {
    let verb = if published.unchanged { "already published, unchanged:" } else { "published" };
    println!("{verb} s3://{}/{} and {}", bucket.name, published.archive_key, published.manifest_key);
}

pub fn compile(args: &CompileArgs) -> Result<()> {
    let request = compile_request(args)?;
    let work = work_dir_beside(&request.output)?;
    let compiled = compile::compile(&request, &work)?;
    println!("built {} (build log {})", compiled.output.display(), compiled.log.display());
    Ok(())
}

pub async fn dev_serve(args: DevServeArgs) -> Result<()> {
    let pipes = Pipes::new(&args.cmd_dir);
    tokio::task::spawn_blocking(move || fifo::serve(&pipes, &args.work_dir))
        .await
        .map_err(|e| Error::Stopped { what: "dev-serve", reason: e.to_string() })?
}

/// Send the compile request to `dev-serve`, wait for the build, publish it when asked, then stay
/// idle when asked (a DaemonSet container that exits is restarted and would build again).
pub async fn modulus(args: &ModulusArgs) -> Result<()> {
    let request = compile_request(&args.compile)?;
    // Read before any build: a broken key must not cost a build and a restart loop.
    let key = signing_key(&args.signing_key)?;
    let publish_to = if args.publish {
        let gardenlinux = request
            .gardenlinux_version
            .clone()
            .ok_or_else(|| Error::Usage("--publish needs --gardenlinux-version".to_owned()))?;
        let bucket = given(&args.bucket).ok_or_else(|| Error::Usage("--publish needs --bucket".to_owned()))?;
        Some((gardenlinux, bucket))
    } else {
        None
    };
    if let Some((gardenlinux, bucket)) = &publish_to
        && !args.force
        && let Some(published) =
            already_published(&request, gardenlinux, &args.endpoint.options(bucket), key.as_ref()).await?
    {
        // A restarted compiler pod finds its work done: no build, no publish.
        info!(key = %published, "the bundle is already published; nothing to build");
        println!("already published s3://{bucket}/{published}; nothing to build");
        return stay_if_asked(args.stay).await;
    }
    let pipes = Pipes::new(&args.cmd_dir);
    let (dev_wait, timeout) = (args.dev_wait, args.timeout);
    let sent = request.clone();
    let answer = tokio::task::spawn_blocking(move || fifo::request(&pipes, &sent, dev_wait, timeout))
        .await
        .map_err(|e| Error::Stopped { what: "modulus", reason: e.to_string() })??;
    if answer.code != 0 {
        return Err(Error::DevContainer(format!(
            "the build failed (exit code {}):\n{}",
            answer.code,
            answer.log.trim_end()
        )));
    }
    println!("{}", answer.log.trim_end());
    if let Some((gardenlinux, bucket)) = publish_to {
        let bucket = Bucket::connect(&args.endpoint.options(&bucket)).await?;
        let published =
            publish::publish(&bucket, &request.output, &gardenlinux, args.force, key.as_ref(), &Default::default())
                .await?;
        report_published(&bucket, &published);
    }
    stay_if_asked(args.stay).await
}

async fn stay_if_asked(stay: bool) -> Result<()> {
    if stay {
        info!("done; staying idle (the compiler node pool can be scaled down)");
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// The manifest key of the bundle `request` would publish, when the bucket has it already; `None`
/// when it has not, or when what the dev container builds is not known here (no driver version
/// given; headers named without their kernel release).
async fn already_published(
    request: &CompileRequest,
    gardenlinux: &str,
    options: &crate::s3::S3Options,
    signing: Option<&SecretKey>,
) -> Result<Option<String>> {
    let Some(driver) = &request.driver_version else { return Ok(None) };
    let kernel = match (&request.kernel_release, &request.kernel_headers) {
        (Some(kernel), _) => kernel.clone(),
        (None, None) => match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            Ok(text) => text.trim().to_owned(),
            Err(_) => return Ok(None),
        },
        (None, Some(_)) => return Ok(None),
    };
    // A build of one flavor is there when that flavor's keys are. `auto` on a `.run` is the
    // branch's default (proprietary below 560); on module sources, whatever the plain keys hold.
    let flavor = match request.flavor {
        Flavor::Open => Some("open"),
        Flavor::Proprietary => Some("proprietary"),
        Flavor::Auto if request.driver_source.ends_with(".run") => {
            let major: u32 = driver.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
            Some(if major < 560 { "proprietary" } else { "open" })
        }
        Flavor::Auto => None,
    };
    let keys = match flavor {
        Some(flavor) => nvidia_contract::BundleKeys::flavored(gardenlinux, &kernel, driver, flavor)?,
        None => nvidia_contract::BundleKeys::new(gardenlinux, &kernel, driver)?,
    };
    let bucket = Bucket::connect(options).await?;
    let transfer = crate::s3::Transfer::default();
    let Some(stored) = crate::s3::get_small(&bucket.client, &bucket.name, &keys.manifest, 16 << 20, &transfer).await?
    else {
        return Ok(None);
    };
    if let Some(signing) = signing {
        // Published, but not (yet) signed with this key: sign the stored bytes, no build.
        let signed =
            publish::signed_with(&bucket.client, &bucket.name, &keys.manifest, &stored, Some(signing), &transfer)
                .await?;
        if !signed {
            publish::sign_published(&bucket, &keys.manifest, &stored, signing).await?;
        }
    }
    Ok(Some(keys.manifest))
}

/// The stage request the flags describe: the Garden Linux version from the host's
/// `/etc/os-release` and the running kernel unless given; every name checked against the
/// contract's rule.
pub fn stage_request(args: &StageArgs) -> Result<StageRequest> {
    let layout = args.host.layout();
    let gardenlinux_version = match given(&args.bundle.gardenlinux_version) {
        Some(version) => version,
        None => os_release_version(&layout).ok_or_else(|| {
            Error::Usage("no --gardenlinux-version, and the host's /etc/os-release names none".to_owned())
        })?,
    };
    let kernel_release = kernel_release(&layout, args.bundle.kernel_release.as_deref())?;
    names::check(NameKind::DriverVersion, &args.bundle.driver_version)?;
    names::check(NameKind::GardenlinuxVersion, &gardenlinux_version)?;
    names::check(NameKind::KernelRelease, &kernel_release)?;
    Ok(StageRequest {
        gardenlinux_version,
        kernel_release,
        driver_version: args.bundle.driver_version.clone(),
        s3: args.s3.options(),
        transfer: args.s3.transfer(),
        limits: Limits::default(),
        flavors: gpus::flavors_for(&gpus::nvidia_gpus(&layout), Flavor::Auto)?,
        trust: trust(&args.bundle.trusted_keys, args.bundle.allow_unsigned)?,
    })
}

/// The trusted keys the flags name; `None` when there are none.
pub fn trust(keys: &[String], allow_unsigned: bool) -> Result<Option<Trust>> {
    let keys: Vec<PublicKey> = keys
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .map(|k| PublicKey::parse(k).map_err(|reason| Error::Signature { what: format!("trusted key {k:?}"), reason }))
        .collect::<Result<_>>()?;
    Ok((!keys.is_empty()).then_some(Trust { keys, allow_unsigned }))
}

/// The signing key a flag names.
fn signing_key(path: &Option<PathBuf>) -> Result<Option<SecretKey>> {
    given(path).map(|p| SecretKey::read(&p)).transpose()
}

/// The kernel release: the flag, else the running kernel.
pub fn kernel_release(layout: &Layout, flag: Option<&str>) -> Result<String> {
    match flag.filter(|k| !k.is_empty()) {
        Some(k) => Ok(k.to_owned()),
        None => nvidia_contract::layout::running_kernel(layout)
            .ok_or_else(|| Error::Usage("cannot read the running kernel release; pass --kernel-release".to_owned())),
    }
}

/// `GARDENLINUX_VERSION` (Garden Linux) or `VERSION_ID` from the host's `/etc/os-release`.
pub fn os_release_version(layout: &Layout) -> Option<String> {
    let text = std::fs::read_to_string(layout.host("/etc/os-release")).ok()?;
    let value = |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('=')).map(|v| v.trim().trim_matches('"').to_owned())
    };
    value("GARDENLINUX_VERSION").or_else(|| value("VERSION_ID")).filter(|v| !v.is_empty())
}

/// The compile request of `compile` and `modulus`.
pub fn compile_request(args: &CompileArgs) -> Result<CompileRequest> {
    let driver_version = given(&args.driver_version);
    if let Some(version) = &driver_version {
        names::check(NameKind::DriverVersion, version)?;
    }
    let gardenlinux_version = given(&args.gardenlinux_version);
    if let Some(version) = &gardenlinux_version {
        names::check(NameKind::GardenlinuxVersion, version)?;
    }
    let kernel_release = given(&args.kernel_release);
    if let Some(release) = &kernel_release {
        names::check(NameKind::KernelRelease, release)?;
    }
    Ok(CompileRequest {
        output: given(&args.output).unwrap_or_else(|| args.out_dir.join("nvidia-bundle.tar.zst")),
        kernel_release,
        driver_version,
        gardenlinux_version,
        jobs: args.jobs,
        ..from_source(&args.source, "compile")?
    })
}

/// The compile request `install --allow-compilation` falls back to when the bucket has none.
pub fn allow_compilation_request(args: &InstallArgs, stage: &StageRequest) -> Result<Option<CompileRequest>> {
    if !args.allow_compilation {
        return Ok(None);
    }
    let layout = args.stage.host.layout();
    Ok(Some(CompileRequest {
        kernel_release: Some(stage.kernel_release.clone()),
        output: layout.root().join(format!("compile/nvidia-{}-{}.tar.zst", stage.driver_version, stage.kernel_release)),
        driver_version: Some(stage.driver_version.clone()),
        gardenlinux_version: Some(stage.gardenlinux_version.clone()),
        ..from_source(&args.source, "--allow-compilation")?
    }))
}

/// The source part of a compile request; `output` and the names are filled in by the caller.
fn from_source(source: &DriverSourceArgs, needed_by: &str) -> Result<CompileRequest> {
    let driver_source = given(&source.driver_source)
        .ok_or_else(|| Error::Usage(format!("{needed_by} needs --driver-source (NVIDIA_DRIVER_SOURCE)")))?;
    Ok(CompileRequest {
        driver_source,
        driver_sha256: given(&source.driver_sha256),
        userspace: given(&source.userspace),
        kernel_headers: given(&source.kernel_headers),
        kernel_release: None,
        flavor: source.flavor,
        patches: given(&source.patches),
        firmware: given(&source.firmware),
        allow_http: source.allow_http,
        module_signing: match (given(&source.module_signing_key), given(&source.module_signing_cert)) {
            (Some(key), Some(certificate)) => Some(compile::ModuleSigning { key, certificate }),
            (None, None) => None,
            _ => {
                return Err(Error::Usage("--module-signing-key and --module-signing-cert go together".to_owned()));
            }
        },
        output: PathBuf::new(),
        driver_version: None,
        gardenlinux_version: None,
        jobs: 0,
    })
}

/// A work directory beside the output (same filesystem); it keeps the build log.
fn work_dir_beside(output: &Path) -> Result<PathBuf> {
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = parent.join(format!(".nvidia-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
    Ok(dir)
}

/// A name for this controller process in the Lease: the pod's (or the host's), made unique to
/// this process, so that two processes never both take the Lease for their own.
fn controller_identity(base: Option<&str>) -> String {
    let base = base
        .filter(|b| !b.is_empty())
        .map(str::to_owned)
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_else(|| "upgrade-controller".to_owned());
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{base}_{}_{:x}", std::process::id(), started.as_nanos() & 0xffff_ffff)
}

pub async fn upgrade_controller(args: &UpgradeControllerArgs) -> Result<()> {
    let installer_labels = args
        .installer_labels
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| Error::Usage(format!("--installer-labels: {pair:?} is not key=value")))
        })
        .collect::<Result<Vec<_>>>()?;
    if installer_labels.is_empty() {
        return Err(Error::Usage("--installer-labels: the installer pods' labels are needed".to_owned()));
    }
    let config = crate::upgrade::controller::Config {
        namespace: args.namespace.clone(),
        installer_labels,
        gpu_resources: args.gpu_resources.iter().map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()).collect(),
        policy: crate::upgrade::plan::Policy {
            max_unavailable: args.max_unavailable,
            drain_timeout: args.drain_timeout,
            on_drain_timeout: args.on_drain_timeout,
            switch_timeout: args.switch_timeout,
        },
        interval: args.interval,
        lease: crate::upgrade::lease::LeaseConfig {
            name: args.lease_name.clone(),
            identity: controller_identity(args.identity.as_deref()),
            duration: args.lease_duration,
        },
        metrics_listen: args.metrics_listen,
    };
    let no_client = |e: String| Error::Node { node: String::new(), reason: format!("no Kubernetes client: {e}") };
    let mut kube_config = kube::Config::infer().await.map_err(|e| no_client(e.to_string()))?;
    // A refused eviction (429 from a PodDisruptionBudget) is asked again next round; the client's
    // own retries would hold the whole round for minutes.
    kube_config.default_retry = false;
    let client = kube::Client::try_from(kube_config).map_err(|e| no_client(e.to_string()))?;
    crate::upgrade::controller::run(client, config, async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    })
    .await
}
