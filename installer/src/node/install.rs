//! `install`: stage, load the modules, create the device nodes, run `nvidia-smi`, then mark the
//! node ready. Failure anywhere leaves no ready marker, unloads what this run loaded, records
//! the reason for `wait`, and reports `driver-ready=false` with an Event.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvidia_contract::layout::Layout;
use tracing::{info, warn};

use crate::node::api::{Report, Reporter};
use crate::node::devices::{make_device_nodes, node_specs};
use crate::node::kernel::Kernel;
use crate::node::lock::HostLock;
use crate::node::modules::{Loader, ModuleLoad, Planner, plan_loads};
use crate::node::ready::{self, LastError, ReadyMarker};
use crate::node::stage::{self, StageRequest, Staged};
use crate::node::{firmware, gpus, holders, metrics};
use crate::upgrade::State;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub stage: StageRequest,
    pub modules: Vec<String>,
    /// `allowCompilation`: when the bucket has no bundle, build one here with this request.
    pub compile: Option<crate::compiler::compile::CompileRequest>,
    /// What happens when another driver version is loaded.
    pub upgrade: Upgrade,
}

/// How a node with another driver version loaded moves to the wanted one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Upgrade {
    /// Refuse: the node must be drained and the old driver unloaded (or the node rebooted) by hand.
    #[default]
    Manual,
    /// Through the upgrade controller: stage beside the loaded driver and ask for an upgrade;
    /// perform the switch when the node's `order` (its upgrade state and target, as read from its
    /// Node) says so. Wait up to `unload_wait` for the old driver to be left alone.
    /// `recheck`: the order came from the Node (the controller's): read it again just before
    /// unloading, and go on only if it still stands (not for a switch asked on the command line).
    Controller { order: Option<(State, Option<String>)>, unload_wait: Duration, recheck: bool },
}

/// How often it looks meanwhile.
const UNLOAD_POLL: Duration = Duration::from_secs(2);

/// What a run did that its record keeps for the node's metrics.
#[derive(Debug, Clone, Default)]
struct RunFacts {
    /// How long the stage step took.
    stage: Option<Duration>,
    /// The last upgrade state this run recorded on the Node or read there, with its target (none:
    /// the Node has no upgrade state).
    upgrade: Option<(State, String)>,
    /// While a switch has not unloaded anything yet: the loaded driver, still serving.
    untouched: Option<String>,
}

/// Record `state` on the Node (see [`Reporter::upgrade_state`]) and in the run's facts.
async fn set_state(
    reporter: &Reporter,
    facts: &mut RunFacts,
    state: State,
    target: &str,
    reason: Option<&str>,
) -> Result<()> {
    reporter.upgrade_state(state, target, reason).await?;
    facts.upgrade = Some((state, target.to_owned()));
    Ok(())
}

/// Install, report the outcome, and record the run for the node's metrics (`last-run.json`).
pub async fn install(
    layout: &Layout,
    request: &InstallRequest,
    kernel: &dyn Kernel,
    reporter: &Reporter,
) -> Result<ReadyMarker> {
    let started = Instant::now();
    // The order read at the start, until the run records (or reads) another state.
    let order = match &request.upgrade {
        Upgrade::Controller { order: Some((state, target)), .. } => Some((*state, target.clone().unwrap_or_default())),
        _ => None,
    };
    let mut facts = RunFacts { upgrade: order, ..RunFacts::default() };
    let result = install_reported(layout, request, kernel, reporter, &mut facts).await;
    let versions = (request.stage.driver_version.as_str(), request.stage.kernel_release.as_str());
    let mut record =
        metrics::run_record(result.is_ok(), started.elapsed(), versions, request.stage.transfer.throttle.stats());
    record.stage_duration_seconds = facts.stage.map(|d| d.as_secs_f64());
    record.upgrade =
        facts.upgrade.map(|(state, target)| metrics::UpgradeSeen { state: state.as_str().to_owned(), target });
    if let Err(error) = metrics::record_run(layout, record) {
        warn!(%error, "recording the run for the node's metrics");
    }
    result
}

async fn install_reported(
    layout: &Layout,
    request: &InstallRequest,
    kernel: &dyn Kernel,
    reporter: &Reporter,
    facts: &mut RunFacts,
) -> Result<ReadyMarker> {
    let driver = request.stage.driver_version.clone();
    let result = install_locked(layout, request, kernel, reporter, facts).await;
    if let Err(Error::KeptLoaded { loaded, wanted, state, reason }) = &result {
        // The loaded driver keeps serving its pods; the node stays ready for it.
        warn!(%loaded, %wanted, %reason, "keeping the loaded driver");
        if let Some(state) = state {
            // The controller acts on `failed` (it uncordons): the write must land, or this run
            // fails and the kubelet runs it again.
            set_state(reporter, facts, *state, wanted, Some(reason)).await?;
        }
        reporter
            .report(Report {
                ready: true,
                driver_version: loaded.clone(),
                reason: if *state == Some(State::Failed) { "DriverUpgradeFailed" } else { "DriverUpdatePending" }
                    .to_owned(),
                message: reason.clone(),
            })
            .await;
        return match ready::check(layout, Some(loaded)) {
            ready::Readiness::Ready(marker) => Ok(marker),
            ready::Readiness::NotReady(_) => result,
        };
    }
    match &result {
        Ok(marker) => {
            ready::clear_last_error(layout);
            // The wanted driver serves: whatever upgrade the node was in is over (the switch it
            // ordered, a reboot that installed it directly, or a rollback to the loaded driver), and
            // the controller uncordons what it cordoned.
            if matches!(&request.upgrade, Upgrade::Controller { order: Some((state, _)), .. }
                if state.out_of_service() || *state == State::UpgradeRequired)
            {
                // Without `done` the node stays cordoned: fail, and the kubelet runs this again.
                set_state(reporter, facts, State::Done, &marker.driver_version, None).await?;
            }
            reporter
                .report(Report {
                    ready: true,
                    driver_version: driver,
                    reason: "DriverReady".to_owned(),
                    message: format!(
                        "NVIDIA driver {} ready for kernel {}{}",
                        marker.driver_version,
                        marker.kernel_release,
                        marker.signed_by.as_ref().map(|k| format!(" (bundle signed by key {k})")).unwrap_or_default()
                    ),
                })
                .await;
        }
        Err(Error::OtherVersionLoaded { loaded, .. }) => {
            // The loaded driver keeps serving its pods; the node stays ready for it.
            let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
            warn!(%message, "driver update pending");
            reporter
                .report(Report {
                    ready: true,
                    driver_version: loaded.clone(),
                    reason: "DriverUpdatePending".to_owned(),
                    message,
                })
                .await;
        }
        Err(error) if facts.untouched.is_some() => {
            // Nothing was unloaded: the loaded driver keeps serving (if it did), its marker stays,
            // and the state is left as the controller set it. The run fails, so the kubelet runs it
            // again.
            let loaded = facts.untouched.clone().unwrap_or_default();
            let message = format!("driver {driver} was not installed: {error}; driver {loaded} stays loaded");
            warn!(%message, "nothing unloaded");
            // For `wait` and `status` (a ready marker, kept, still comes first).
            let failure =
                LastError { reason: error.to_string(), driver_version: driver.clone(), at: ready::now_rfc3339() };
            if let Err(e) = ready::write_last_error(layout, &failure) {
                warn!(error = %e, "could not record the failure for wait");
            }
            reporter
                .report(Report {
                    ready: matches!(ready::check(layout, Some(&loaded)), ready::Readiness::Ready(_)),
                    driver_version: loaded,
                    reason: "DriverUpdatePending".to_owned(),
                    message,
                })
                .await;
        }
        Err(error) => {
            let reason = error.to_string();
            // No driver works on this node now: it stays cordoned (`installing`, the reason
            // recorded) while the kubelet runs install again, rather than `failed`, which would
            // uncordon it.
            if let Upgrade::Controller { order: Some((state, _)), .. } = &request.upgrade
                && state.out_of_service()
            {
                // `installing`: a state the node side writes (the node guard lets it write no other).
                let kept = format!("{reason}; no driver is loaded, so the node stays cordoned until one is");
                if let Err(e) = set_state(reporter, facts, State::Installing, &driver, Some(&kept)).await {
                    warn!(error = %e, "could not record the failure on the node");
                }
            }
            if let Err(e) = ready::remove_marker(layout) {
                warn!(error = %e, "could not remove the ready marker");
            }
            let failure =
                LastError { reason: reason.clone(), driver_version: driver.clone(), at: ready::now_rfc3339() };
            if let Err(e) = ready::write_last_error(layout, &failure) {
                warn!(error = %e, "could not record the failure for wait");
            }
            reporter
                .report(Report {
                    ready: false,
                    driver_version: driver,
                    reason: "DriverInstallFailed".to_owned(),
                    message: reason,
                })
                .await;
        }
    }
    result
}

async fn install_locked(
    layout: &Layout,
    request: &InstallRequest,
    kernel: &dyn Kernel,
    reporter: &Reporter,
    facts: &mut RunFacts,
) -> Result<ReadyMarker> {
    let _lock = HostLock::acquire(layout).await?;
    let wanted = &request.stage.driver_version;
    // Another driver loaded: whatever fails before a switch unloads it (staging the new one, say)
    // leaves it, its marker and the Node's upgrade state as they are.
    facts.untouched = crate::node::status::loaded_version(layout).filter(|loaded| loaded != wanted);
    // A marker from an earlier boot describes modules that are gone.
    if let Some(marker) = ready::read_marker(layout)
        && marker.boot_id.is_some()
        && marker.boot_id != layout.boot_id()
    {
        info!(driver = %marker.driver_version, "removing the ready marker of an earlier boot");
        ready::remove_marker(layout)?;
    }
    let staged: Staged = match (stage::stage_locked(layout, &request.stage).await, &request.compile) {
        (Err(Error::NotFound { bucket, tried }), Some(compile)) => {
            info!(bucket = %bucket, tried = ?tried, "no bundle in the bucket; compiling one on this node (allowCompilation)");
            let work = layout.root().join("compile");
            let compile = compile.clone();
            let built = tokio::task::spawn_blocking(move || crate::compiler::compile::compile(&compile, &work))
                .await
                .map_err(|e| Error::Stopped { what: "the compile step", reason: e.to_string() })??;
            stage::stage_archive_locked(layout, &request.stage, &built.output).await?
        }
        (result, _) => result?,
    };
    facts.stage = Some(staged.duration);
    if let Some(loaded) = other_loaded(layout, &staged, wanted) {
        return match &request.upgrade {
            Upgrade::Manual => Err(Error::OtherVersionLoaded { loaded, wanted: wanted.clone() }),
            Upgrade::Controller { order, unload_wait, recheck } => {
                let for_wanted = |target: &Option<String>| target.as_deref() == Some(wanted.as_str());
                match order {
                    // The node is drained and the switch ordered: it goes to the wanted driver,
                    // also when a second `helm upgrade` moved the target since the order.
                    Some((State::Unloading | State::Installing | State::Validating, _)) => {
                        switch(layout, request, (kernel, reporter, facts), &loaded, (*unload_wait, *recheck)).await
                    }
                    Some((State::Failed, target)) if for_wanted(target) => Err(Error::KeptLoaded {
                        loaded,
                        wanted: wanted.clone(),
                        state: None,
                        reason: format!(
                            "the last upgrade to {wanted} failed (the node's {} annotation says why); remove the node's {} label to try again",
                            nvidia_contract::UPGRADE_REASON_ANNOTATION,
                            nvidia_contract::UPGRADE_STATE_LABEL
                        ),
                    }),
                    Some((state, target)) if for_wanted(target) && *state != State::Done => Err(Error::KeptLoaded {
                        loaded,
                        wanted: wanted.clone(),
                        state: None,
                        reason: format!("the upgrade to {wanted} is under way ({state})"),
                    }),
                    // The controller holds the node for another target (a second `helm upgrade`
                    // mid-rollout): same state, the new target.
                    Some((state, _)) if state.out_of_service() => Err(Error::KeptLoaded {
                        wanted: wanted.clone(),
                        state: Some(*state),
                        reason: format!("the upgrade under way ({state}) now goes to {wanted}"),
                        loaded,
                    }),
                    _ => Err(Error::KeptLoaded {
                        wanted: wanted.clone(),
                        state: Some(State::UpgradeRequired),
                        reason: format!(
                            "driver {wanted} is staged beside the loaded {loaded}, which keeps serving until the upgrade controller drains the node"
                        ),
                        loaded,
                    }),
                }
            }
        };
    }
    load_staged(layout, request, kernel, &staged)
}

/// Load a staged bundle's modules, make the device nodes, run `nvidia-smi` and write the ready
/// marker; on failure, undo what this did.
fn load_staged(layout: &Layout, request: &InstallRequest, kernel: &dyn Kernel, staged: &Staged) -> Result<ReadyMarker> {
    let wanted = &request.stage.driver_version;
    let kernel_release = &request.stage.kernel_release;
    gpus::check_bundle(&gpus::nvidia_gpus(layout), &staged.manifest.flavor, wanted)?;
    // A marker for another driver or kernel no longer describes this node.
    if ready::read_marker(layout).is_some_and(|m| &m.driver_version != wanted || &m.kernel_release != kernel_release) {
        ready::remove_marker(layout)?;
    }
    let plan = plan_loads(layout, kernel_release, staged, &request.modules)?;
    firmware::prepare(layout, &staged.bundle, &staged.manifest)?;
    let mut loader = Loader { layout, kernel, loaded_now: Vec::new() };
    let mut nodes_made = Vec::new();
    let ready = loader.load_all(&plan).and_then(|()| {
        make_device_nodes(layout, kernel, &request.modules, &mut nodes_made)?;
        run_smi(layout, kernel, staged)?;
        let marker = ReadyMarker {
            driver_version: wanted.clone(),
            kernel_release: kernel_release.clone(),
            sha256: staged.manifest.archive.as_ref().map(|a| a.sha256.clone()).unwrap_or_default(),
            ready_at: ready::now_rfc3339(),
            boot_id: layout.boot_id(),
            bundle: Layout::bundle_relative(kernel_release, wanted).display().to_string(),
            signed_by: staged.signed_by.map(|k| k.to_string()),
        };
        ready::write_marker(layout, &marker)?;
        Ok(marker)
    });
    match ready {
        Ok(marker) => {
            info!(driver = %marker.driver_version, kernel = %marker.kernel_release, "driver ready");
            Ok(marker)
        }
        Err(error) => {
            // Leave the node as this run found it: no device nodes of its own, no modules it loaded.
            for path in nodes_made.iter().rev() {
                match std::fs::remove_file(path) {
                    Ok(()) => info!(device = %path.display(), "removed after the failure"),
                    Err(e) => warn!(device = %path.display(), error = %e, "could not remove after the failure"),
                }
            }
            loader.roll_back();
            Err(error)
        }
    }
}

/// Another driver version that is ready (staging held the new one back) or loaded.
fn other_loaded(layout: &Layout, staged: &Staged, wanted: &str) -> Option<String> {
    let loaded = staged.held_back_by.clone().or_else(|| crate::node::status::loaded_version(layout));
    loaded.filter(|loaded| loaded != wanted)
}

/// Another driver version is ready or loaded: the node must be drained and the old driver
/// unloaded first.
fn refuse_other_loaded(layout: &Layout, staged: &Staged, wanted: &str) -> Result<()> {
    match other_loaded(layout, staged, wanted) {
        Some(loaded) => Err(Error::OtherVersionLoaded { loaded, wanted: wanted.to_owned() }),
        None => Ok(()),
    }
}

/// The switch the upgrade controller ordered (the node is cordoned and drained): wait until
/// nothing holds the loaded driver, unload it, load the wanted one from the cache and validate it;
/// when that fails, load the old one again from the cache. The old driver is never given up
/// while something uses it, and the node ends with a working driver unless the old one cannot be
/// loaded again either.
async fn switch(
    layout: &Layout,
    request: &InstallRequest,
    (kernel, reporter, facts): (&dyn Kernel, &Reporter, &mut RunFacts),
    loaded: &str,
    (unload_wait, recheck): (Duration, bool),
) -> Result<ReadyMarker> {
    let wanted = &request.stage.driver_version;
    let kept = |state: Option<State>, reason: String| Error::KeptLoaded {
        loaded: loaded.to_owned(),
        wanted: wanted.clone(),
        state,
        reason,
    };
    let started = Instant::now();
    let mut said = String::new();
    while let Some(holding) = holders::in_use(layout) {
        if started.elapsed() >= unload_wait {
            return Err(kept(
                Some(State::Failed),
                format!(
                    "driver {loaded} is still in use after {}: {holding}",
                    humantime::format_duration(Duration::from_secs(unload_wait.as_secs()))
                ),
            ));
        }
        if holding != said {
            info!(%holding, "waiting for the loaded driver to be left alone before unloading it");
            said = holding;
        }
        tokio::time::sleep(UNLOAD_POLL.min(unload_wait)).await;
    }
    if recheck && reporter.reads_orders() {
        confirm_order(reporter, facts, wanted).await.map_err(|withdrawn| match withdrawn {
            Withdrawn::To(now) => kept(None, format!("the order to switch was withdrawn while waiting ({now})")),
            Withdrawn::Failed(error) => error,
        })?;
    } else {
        set_state(reporter, facts, State::Installing, wanted, None).await?;
    }
    info!(%loaded, %wanted, "unloading the old driver");
    facts.untouched = None;
    ready::remove_marker(layout)?;
    let mut previous = request.clone();
    previous.stage.driver_version = loaded.to_owned();
    previous.upgrade = Upgrade::Manual;
    for module in holders::unload_order(&holders::nvidia_modules(layout)) {
        if let Err(error) = kernel.unload(&module) {
            let restored = restore(layout, &previous, kernel).await;
            let reason = format!("unloading {module} of driver {loaded}: {error}");
            return match restored {
                Ok(_) => Err(kept(Some(State::Failed), format!("{reason}; driver {loaded} is loaded again"))),
                Err(again) => {
                    Err(Error::Upgrade { reason: format!("{reason}; loading {loaded} again failed too: {again}") })
                }
            };
        }
        info!(module = %module, "unloaded");
    }
    let attempt = match stage::stage_locked(layout, &request.stage).await {
        Ok(staged) => {
            if let Err(error) = set_state(reporter, facts, State::Validating, wanted, None).await {
                warn!(%error, "could not record the upgrade state; going on");
            }
            load_staged(layout, request, kernel, &staged)
        }
        Err(error) => Err(error),
    };
    match attempt {
        Ok(marker) => Ok(marker),
        Err(error) => {
            warn!(%error, %loaded, "the new driver failed; going back to the old one");
            match restore(layout, &previous, kernel).await {
                Ok(_) => Err(kept(
                    Some(State::Failed),
                    format!("driver {wanted} failed: {error}; driver {loaded} is loaded again from the cache"),
                )),
                Err(again) => Err(Error::Upgrade {
                    reason: format!("driver {wanted} failed: {error}; loading {loaded} again failed too: {again}"),
                }),
            }
        }
    }
}

/// Why a switch did not start.
enum Withdrawn {
    /// What the Node says now: the controller gave it up (`failed`), or its state was removed.
    To(String),
    Failed(Error),
}

/// Writes of `installing` refused because the Node changed meanwhile, before giving up the run.
const CONFIRM_ATTEMPTS: u32 = 5;

/// Read the node's order again and record `installing` only while it still stands: the write
/// carries the resourceVersion read, so a controller that gave the node up in between (or any other
/// change to the Node) makes it fail, and the order is read again.
async fn confirm_order(reporter: &Reporter, facts: &mut RunFacts, wanted: &str) -> std::result::Result<(), Withdrawn> {
    for _ in 0..CONFIRM_ATTEMPTS {
        let Some(order) = reporter.upgrade_order_at().await.map_err(Withdrawn::Failed)? else {
            facts.upgrade = None;
            return Err(Withdrawn::To("the Node has no upgrade state now".to_owned()));
        };
        if !matches!(order.state, State::Unloading | State::Installing | State::Validating) {
            facts.upgrade = Some((order.state, order.target.unwrap_or_default()));
            return Err(Withdrawn::To(format!("the node is now {}", order.state)));
        }
        let written = reporter
            .upgrade_state_at(State::Installing, wanted, None, order.version.as_deref())
            .await
            .map_err(Withdrawn::Failed)?;
        if written {
            facts.upgrade = Some((State::Installing, wanted.to_owned()));
            return Ok(());
        }
    }
    Err(Withdrawn::Failed(Error::Upgrade {
        reason: format!(
            "the Node changed {CONFIRM_ATTEMPTS} times while recording `installing`; nothing was unloaded, trying again"
        ),
    }))
}

/// Load `previous` (the driver that was loaded) again from the cache.
async fn restore(layout: &Layout, previous: &InstallRequest, kernel: &dyn Kernel) -> Result<ReadyMarker> {
    let staged = stage::stage_locked(layout, &previous.stage).await?;
    load_staged(layout, previous, kernel, &staged)
}

/// What `install` would do on this host, in order, without doing it (`install --dry-run`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub staged: Staged,
    /// Making the bundle's GPU firmware findable, before the modules load.
    pub firmware: firmware::Step,
    pub modules: Vec<ModuleLoad>,
    /// `mknod` operations, described: the major comes from `/proc/devices` once the module loaded.
    pub device_nodes: Vec<String>,
    /// The bundle's `nvidia-smi` and its library directory, as host paths.
    pub smi: (String, String),
    pub marker: PathBuf,
}

/// Stage for real (download, verify, extract, switch `current`), then plan the kernel steps
/// without performing them: no module is loaded, no device node made, no marker written.
pub async fn dry_run(layout: &Layout, request: &InstallRequest) -> Result<Plan> {
    let _lock = HostLock::acquire(layout).await?;
    let wanted = &request.stage.driver_version;
    let staged = stage::stage_locked(layout, &request.stage).await?;
    refuse_other_loaded(layout, &staged, wanted)?;
    let mut planner = Planner::new(layout, &request.stage.kernel_release, &staged);
    // Planned away from the node (a temp host root without the kernel's modules), an in-tree
    // dependency is listed as the node will resolve it rather than failing the plan.
    planner.unresolved_in_tree_ok = true;
    let modules = planner.plan(&request.modules)?;
    let firmware = firmware::plan(layout, &staged.bundle, &staged.manifest)?;
    let dev = layout.host("/dev");
    let device_nodes = node_specs(&request.modules)
        .into_iter()
        .map(|spec| {
            let (name, minor) = match spec.minor {
                Some(minor) => (spec.name.to_owned(), minor.to_string()),
                None => (format!("{}<N>", spec.name), "<N>, one per GPU in /proc/driver/nvidia/gpus".to_owned()),
            };
            format!("{} c <major of {:?} in /proc/devices> {minor}", in_host(layout, &dev.join(name)), spec.major_of[0])
        })
        .collect();
    let smi = (in_host(layout, &staged.bundle.join("bin/nvidia-smi")), in_host(layout, &staged.bundle.join("lib")));
    Ok(Plan { staged, firmware, modules, device_nodes, smi, marker: layout.ready() })
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut step = 0;
        let mut line = |f: &mut std::fmt::Formatter<'_>, text: String| {
            step += 1;
            writeln!(f, "{step:>3}. {text}")
        };
        if self.firmware != firmware::Step::None {
            line(f, self.firmware.to_string())?;
        }
        for module in &self.modules {
            let from = if module.in_tree { "the kernel's own modules" } else { "the bundle" };
            if module.loaded {
                line(f, format!("skip {}: already loaded", module.name))?;
            } else if module.in_tree && module.path.ends_with("modules.dep") {
                line(
                    f,
                    format!(
                        "finit_module {} and the modules it depends on, as listed in {} (from {from}; not readable here)",
                        module.name,
                        module.path.display()
                    ),
                )?;
            } else {
                line(f, format!("finit_module {} ({}, from {from})", module.path.display(), module.name))?;
            }
        }
        for node in &self.device_nodes {
            line(f, format!("mknod {node}, mode 0666"))?;
        }
        line(f, format!("run {} with LD_LIBRARY_PATH={}; it must exit 0", self.smi.0, self.smi.1))?;
        line(f, format!("write the ready marker {}", self.marker.display()))?;
        line(f, "label the node driver-ready=true and driver-version, and record a DriverReady Event".to_owned())?;
        writeln!(
            f,
            "On failure at any step: remove the device nodes this run created, unload what it loaded (newest first), remove the ready marker, label driver-ready=false."
        )
    }
}

/// A path of the host as the host sees it (without the host root).
fn in_host(layout: &Layout, path: &Path) -> String {
    let relative = path.strip_prefix(layout.host_root()).unwrap_or(path);
    format!("/{}", relative.display())
}

fn run_smi(layout: &Layout, kernel: &dyn Kernel, staged: &Staged) -> Result<()> {
    let in_host = |path: &Path| in_host(layout, path);
    let smi = staged.bundle.join("bin/nvidia-smi");
    if !smi.is_file() {
        return Err(Error::Smi { path: smi, reason: "not in the bundle".to_owned() });
    }
    let output = kernel
        .run(&in_host(&smi), &[], &in_host(&staged.bundle.join("lib")))
        .map_err(|e| Error::Smi { path: smi.clone(), reason: e.to_string() })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let tail: String =
            text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        return Err(Error::Smi { path: smi, reason: format!("{}: {tail}", output.status) });
    }
    info!(output = %text.lines().take(12).collect::<Vec<_>>().join("\n"), "nvidia-smi succeeded");
    Ok(())
}
