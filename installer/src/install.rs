//! `install`: stage, load the modules, create the device nodes, run `nvidia-smi`, then mark the
//! node ready. Failure anywhere leaves no ready marker, unloads what this run loaded, records
//! the reason for `wait`, and reports `driver-ready=false` with an Event.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::kernel::{self, Kernel};
use crate::layout::Layout;
use crate::lock::HostLock;
use crate::node::{Report, Reporter};
use crate::ready::{self, LastError, ReadyMarker};
use crate::stage::{self, StageRequest, Staged};
use crate::{Error, Result};

/// The modules loaded by default, in dependency order.
pub const DEFAULT_MODULES: [&str; 3] = ["nvidia", "nvidia-uvm", "nvidia-modeset"];
/// Load order when more are asked for.
const ORDER: [&str; 5] = ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem"];

#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub stage: StageRequest,
    pub modules: Vec<String>,
    /// `allowCompilation`: when the bucket has no bundle, build one here with this request.
    pub compile: Option<crate::compile::CompileRequest>,
}

/// Install and report the outcome.
pub async fn install(
    layout: &Layout,
    request: &InstallRequest,
    kernel: &dyn Kernel,
    reporter: &Reporter,
) -> Result<ReadyMarker> {
    let driver = request.stage.driver_version.clone();
    let result = install_locked(layout, request, kernel).await;
    match &result {
        Ok(marker) => {
            ready::clear_last_error(layout);
            reporter
                .report(Report {
                    ready: true,
                    driver_version: driver,
                    reason: "DriverReady".to_owned(),
                    message: format!(
                        "NVIDIA driver {} ready for kernel {}",
                        marker.driver_version, marker.kernel_release
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
        Err(error) => {
            let reason = error.to_string();
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

async fn install_locked(layout: &Layout, request: &InstallRequest, kernel: &dyn Kernel) -> Result<ReadyMarker> {
    let _lock = HostLock::acquire(layout).await?;
    let wanted = &request.stage.driver_version;
    let kernel_release = &request.stage.kernel_release;
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
            let built = tokio::task::spawn_blocking(move || crate::compile::compile(&compile, &work))
                .await
                .map_err(|e| Error::Config(format!("the compile step stopped: {e}")))??;
            stage::stage_archive_locked(layout, &request.stage, &built.output).await?
        }
        (result, _) => result?,
    };
    refuse_other_loaded(layout, &staged, wanted)?;
    // A marker for another driver or kernel no longer describes this node.
    if ready::read_marker(layout).is_some_and(|m| &m.driver_version != wanted || &m.kernel_release != kernel_release) {
        ready::remove_marker(layout)?;
    }
    let plan = plan_loads(layout, kernel_release, &staged, &request.modules)?;
    let mut loader = Loader { layout, kernel, loaded_now: Vec::new() };
    let mut nodes_made = Vec::new();
    let ready = loader.load_all(&plan).and_then(|()| {
        make_device_nodes(layout, kernel, &request.modules, &mut nodes_made)?;
        run_smi(layout, kernel, &staged)?;
        let marker = ReadyMarker {
            driver_version: wanted.clone(),
            kernel_release: kernel_release.clone(),
            sha256: staged.manifest.archive.as_ref().map(|a| a.sha256.clone()).unwrap_or_default(),
            ready_at: ready::now_rfc3339(),
            boot_id: layout.boot_id(),
            bundle: Layout::bundle_relative(kernel_release, wanted).display().to_string(),
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

/// Another driver version is ready (staging held the new one back) or loaded: the node must be
/// drained and the old driver unloaded first.
fn refuse_other_loaded(layout: &Layout, staged: &Staged, wanted: &str) -> Result<()> {
    let loaded = staged.held_back_by.clone().or_else(|| crate::status::loaded_version(layout));
    match loaded {
        Some(loaded) if loaded != wanted => Err(Error::OtherVersionLoaded { loaded, wanted: wanted.to_owned() }),
        _ => Ok(()),
    }
}

/// What `install` would do on this host, in order, without doing it (`install --dry-run`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub staged: Staged,
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
    Ok(Plan { staged, modules, device_nodes, smi, marker: layout.ready() })
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut step = 0;
        let mut line = |f: &mut std::fmt::Formatter<'_>, text: String| {
            step += 1;
            writeln!(f, "{step:>3}. {text}")
        };
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

/// Module names as the kernel lists them (`nvidia_uvm`).
fn kernel_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Names in `/proc/modules`.
pub fn loaded_modules(layout: &Layout) -> BTreeSet<String> {
    std::fs::read_to_string(layout.host("/proc/modules"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// One module the install loads, in the order it loads them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleLoad {
    /// The module's name as asked for (`nvidia-uvm`) or as the kernel lists it (`drm`).
    pub name: String,
    pub path: PathBuf,
    /// From the kernel's own `/lib/modules`, not from the bundle.
    pub in_tree: bool,
    /// Already in `/proc/modules` when planned: nothing to do.
    pub loaded: bool,
}

/// The modules to load, dependencies first: every `depends` of a bundled module, from the bundle
/// when it has it, else the kernel's own modules through `modules.dep`. Reads files only.
pub fn plan_loads(
    layout: &Layout,
    kernel_release: &str,
    staged: &Staged,
    modules: &[String],
) -> Result<Vec<ModuleLoad>> {
    Planner::new(layout, kernel_release, staged).plan(modules)
}

struct Planner<'a> {
    layout: &'a Layout,
    kernel_release: &'a str,
    staged: &'a Staged,
    loaded: BTreeSet<String>,
    plan: Vec<ModuleLoad>,
    /// List an in-tree dependency whose `modules.dep` cannot be read instead of failing.
    unresolved_in_tree_ok: bool,
}

impl<'a> Planner<'a> {
    fn new(layout: &'a Layout, kernel_release: &'a str, staged: &'a Staged) -> Self {
        let loaded = loaded_modules(layout);
        Self { layout, kernel_release, staged, loaded, plan: Vec::new(), unresolved_in_tree_ok: false }
    }

    fn plan(mut self, modules: &[String]) -> Result<Vec<ModuleLoad>> {
        let mut wanted: Vec<&str> = ORDER.iter().copied().filter(|m| modules.iter().any(|w| w == m)).collect();
        for extra in modules.iter().filter(|m| !ORDER.contains(&m.as_str())) {
            wanted.push(extra);
        }
        for name in wanted {
            self.bundled(name)?;
        }
        Ok(self.plan)
    }

    fn planned(&self, name: &str) -> bool {
        self.plan.iter().any(|m| kernel_name(&m.name) == kernel_name(name))
    }

    fn push(&mut self, name: &str, path: PathBuf, in_tree: bool) {
        let loaded = self.loaded.contains(&kernel_name(name));
        self.plan.push(ModuleLoad { name: name.to_owned(), path, in_tree, loaded });
    }

    fn bundled(&mut self, name: &str) -> Result<()> {
        if self.planned(name) {
            return Ok(());
        }
        let (bundle, manifest) = (&self.staged.bundle, &self.staged.manifest);
        let entry = manifest.modules.iter().find(|m| m.name == name || kernel_name(&m.name) == kernel_name(name));
        let path = bundle.join(entry.map_or_else(|| format!("modules/{name}.ko"), |m| m.path.clone()));
        if self.loaded.contains(&kernel_name(name)) {
            self.push(name, path, false);
            return Ok(());
        }
        let fail = |reason: String| Error::Module { module: name.to_owned(), path: path.clone(), reason };
        if !path.is_file() {
            return Err(fail("not in the bundle".to_owned()));
        }
        let info = kernel::modinfo(&path)?;
        let built_for = kernel::vermagic_release(&info.vermagic);
        if built_for != self.kernel_release {
            return Err(fail(format!("built for kernel {built_for}, but this node runs {}", self.kernel_release)));
        }
        for dependency in &info.depends {
            self.dependency(dependency)?;
        }
        self.push(name, path, false);
        Ok(())
    }

    /// A dependency: from the bundle when it has it, else the kernel's own modules.
    fn dependency(&mut self, name: &str) -> Result<()> {
        if self.planned(name) {
            return Ok(());
        }
        let (bundle, manifest) = (&self.staged.bundle, &self.staged.manifest);
        if manifest.modules.iter().any(|m| kernel_name(&m.name) == kernel_name(name))
            || bundle.join(format!("modules/{name}.ko")).is_file()
        {
            return self.bundled(name);
        }
        if self.loaded.contains(&kernel_name(name)) {
            let path = self.layout.host(&format!("/lib/modules/{}", self.kernel_release));
            self.push(name, path, true);
            return Ok(());
        }
        let (path, depends) = match in_tree(self.layout, self.kernel_release, name) {
            Err(Error::Io { path, .. }) if self.unresolved_in_tree_ok => {
                // `path` is modules.dep: the module and its own dependencies are found there on the node.
                self.plan.push(ModuleLoad { name: name.to_owned(), path, in_tree: true, loaded: false });
                return Ok(());
            }
            found => found?,
        };
        for dependency in depends {
            self.dependency(&dependency)?;
        }
        self.push(name, path, true);
        Ok(())
    }
}

/// Loads a plan through the kernel seam, remembering what it loaded so a failure can undo it.
struct Loader<'a> {
    layout: &'a Layout,
    kernel: &'a dyn Kernel,
    loaded_now: Vec<String>,
}

impl Loader<'_> {
    fn load_all(&mut self, plan: &[ModuleLoad]) -> Result<()> {
        for module in plan {
            if module.loaded || loaded_modules(self.layout).contains(&kernel_name(&module.name)) {
                info!(module = %module.name, "already loaded");
                continue;
            }
            self.load_file(&module.name, &module.path)?;
        }
        Ok(())
    }

    fn load_file(&mut self, name: &str, path: &Path) -> Result<()> {
        info!(module = name, path = %path.display(), "loading module");
        match self.kernel.load(path, "") {
            Ok(()) => {
                self.loaded_now.push(kernel_name(name));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
            Err(e) => {
                Err(Error::Module { module: name.to_owned(), path: path.to_owned(), reason: explain_load_error(&e) })
            }
        }
    }

    /// Unload, newest first, what this run loaded.
    fn roll_back(&mut self) {
        while let Some(name) = self.loaded_now.pop() {
            match self.kernel.unload(&name) {
                Ok(()) => info!(module = %name, "unloaded after the failure"),
                Err(e) => warn!(module = %name, error = %e, "could not unload after the failure"),
            }
        }
    }
}

fn explain_load_error(error: &io::Error) -> String {
    use nix::libc;
    match error.raw_os_error() {
        Some(libc::ENODEV) => {
            "the kernel found no NVIDIA GPU for it (No such device; dmesg says NVRM: No NVIDIA GPU found)".to_owned()
        }
        Some(libc::ENOENT) => "unknown symbol: a module it depends on is not loaded (see dmesg)".to_owned(),
        Some(libc::ENOEXEC) => "invalid module format: built for another kernel or configuration".to_owned(),
        Some(libc::EPERM) => "not permitted: the installer needs CAP_SYS_MODULE (a privileged container)".to_owned(),
        Some(libc::EKEYREJECTED) => "the kernel requires signed modules and rejected this one".to_owned(),
        _ => error.to_string(),
    }
}

/// Find an in-tree module and its dependencies through `/lib/modules/<k>/modules.dep`.
fn in_tree(layout: &Layout, kernel_release: &str, name: &str) -> Result<(PathBuf, Vec<String>)> {
    let base = layout.host(&format!("/lib/modules/{kernel_release}"));
    let dep = base.join("modules.dep");
    let text = std::fs::read_to_string(&dep).map_err(|e| Error::io("reading", &dep, e))?;
    let wanted = kernel_name(name);
    let module_name = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        kernel_name(file.split(".ko").next().unwrap_or(file))
    };
    for line in text.lines() {
        let Some((path, deps)) = line.split_once(':') else { continue };
        if module_name(path) == wanted {
            let depends = deps.split_whitespace().map(module_name).collect::<Vec<_>>();
            // modules.dep lists every transitive dependency, deepest last: load deepest first.
            return Ok((base.join(path), depends.into_iter().rev().collect()));
        }
    }
    Err(Error::Module {
        module: name.to_owned(),
        path: dep,
        reason: format!("needed by the driver but neither in the bundle nor in the kernel {kernel_release}'s modules"),
    })
}

/// Majors by name from `/proc/devices` (character devices).
pub fn char_majors(layout: &Layout) -> Result<Vec<(u64, String)>> {
    let path = layout.host("/proc/devices");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    let mut majors = Vec::new();
    for line in text.lines() {
        if line.starts_with("Block devices") {
            break;
        }
        if let Some((major, name)) = line.trim().split_once(' ')
            && let Ok(major) = major.parse()
        {
            majors.push((major, name.trim().to_owned()));
        }
    }
    Ok(majors)
}

/// A device node the install makes: its name under `/dev`, the `/proc/devices` names its major
/// is read from, and its minor (`None`: one node per GPU, minor = the GPU's index).
struct NodeSpec {
    name: &'static str,
    major_of: &'static [&'static str],
    minor: Option<u64>,
}

const FRONTEND: &[&str] = &["nvidia-frontend", "nvidia"];
const UVM: &[&str] = &["nvidia-uvm"];

/// `/dev/nvidia<N>` per GPU, `nvidiactl`, and the nodes of the loaded helper modules.
fn node_specs(modules: &[String]) -> Vec<NodeSpec> {
    let mut specs = vec![
        NodeSpec { name: "nvidia", major_of: FRONTEND, minor: None },
        NodeSpec { name: "nvidiactl", major_of: FRONTEND, minor: Some(255) },
    ];
    if modules.iter().any(|m| m == "nvidia-modeset") {
        specs.push(NodeSpec { name: "nvidia-modeset", major_of: FRONTEND, minor: Some(254) });
    }
    if modules.iter().any(|m| m == "nvidia-uvm") {
        specs.push(NodeSpec { name: "nvidia-uvm", major_of: UVM, minor: Some(0) });
        specs.push(NodeSpec { name: "nvidia-uvm-tools", major_of: UVM, minor: Some(1) });
    }
    specs
}

/// Create the device nodes that are missing or wrong; `made` gets each node that did not exist
/// before (a rollback removes those; a replaced wrong node stays replaced).
fn make_device_nodes(layout: &Layout, kernel: &dyn Kernel, modules: &[String], made: &mut Vec<PathBuf>) -> Result<()> {
    let majors = char_majors(layout)?;
    let devices = layout.host("/proc/devices");
    let major = |names: &[&str]| -> Result<u64> {
        majors.iter().find(|(_, n)| names.contains(&n.as_str())).map(|(m, _)| *m).ok_or_else(|| Error::Device {
            path: devices.clone(),
            reason: format!("no {} major number: the module is not registered", names[0]),
        })
    };
    let gpus_dir = layout.host("/proc/driver/nvidia/gpus");
    let gpus = std::fs::read_dir(&gpus_dir).map(|d| d.count() as u64).unwrap_or(0);
    if gpus == 0 {
        return Err(Error::Device { path: gpus_dir, reason: "the driver lists no GPUs".to_owned() });
    }
    let mut nodes: Vec<(String, u64, u64)> = Vec::new();
    for spec in node_specs(modules) {
        let major = major(spec.major_of)?;
        match spec.minor {
            Some(minor) => nodes.push((spec.name.to_owned(), major, minor)),
            None => nodes.extend((0..gpus).map(|i| (format!("{}{i}", spec.name), major, i))),
        }
    }
    let dev = layout.host("/dev");
    for (name, major, minor) in nodes {
        let path = dev.join(&name);
        let existed = std::fs::symlink_metadata(&path).is_ok();
        if let Ok(meta) = std::fs::metadata(&path) {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let rdev = meta.rdev();
            if meta.file_type().is_char_device()
                && nix::sys::stat::major(rdev) == major
                && nix::sys::stat::minor(rdev) == minor
            {
                continue;
            }
            std::fs::remove_file(&path).map_err(|e| Error::io("replacing", &path, e))?;
        }
        kernel.mknod(&path, major, minor).map_err(|e| Error::Device { path: path.clone(), reason: e.to_string() })?;
        info!(device = %path.display(), major, minor, "device node created");
        if !existed {
            made.push(path);
        }
    }
    Ok(())
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
