//! Which modules to load and in what order, and loading them through the kernel seam.
//!
//! The plan reads files only: every `depends` of a bundled module comes first, from the bundle when
//! it has it, else from the kernel's own modules through `modules.dep`.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use nvidia_contract::layout::Layout;
use tracing::{info, warn};

use crate::bundle::modinfo;
use crate::node::kernel::Kernel;
use crate::node::stage::Staged;
use crate::{Error, Result};

/// Load order when more are asked for.
const ORDER: [&str; 5] = ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem"];

/// Module names as the kernel lists them (`nvidia_uvm`).
pub(crate) fn kernel_name(name: &str) -> String {
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

pub(crate) struct Planner<'a> {
    layout: &'a Layout,
    kernel_release: &'a str,
    staged: &'a Staged,
    loaded: BTreeSet<String>,
    plan: Vec<ModuleLoad>,
    /// List an in-tree dependency whose `modules.dep` cannot be read instead of failing.
    pub(crate) unresolved_in_tree_ok: bool,
}

impl<'a> Planner<'a> {
    pub(crate) fn new(layout: &'a Layout, kernel_release: &'a str, staged: &'a Staged) -> Self {
        let loaded = loaded_modules(layout);
        Self { layout, kernel_release, staged, loaded, plan: Vec::new(), unresolved_in_tree_ok: false }
    }

    pub(crate) fn plan(mut self, modules: &[String]) -> Result<Vec<ModuleLoad>> {
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
        let info = modinfo::modinfo(&path)?;
        let built_for = modinfo::vermagic_release(&info.vermagic);
        if built_for != self.kernel_release {
            return Err(fail(format!("built for kernel {built_for}, but this node runs {}", self.kernel_release)));
        }
        if signatures_enforced(self.layout) && !modinfo::is_signed(&path)? {
            return Err(fail(
                "the kernel requires signed modules (module.sig_enforce, or Secure Boot's lockdown), and this one is unsigned: \
                 build the bundle with compile --module-signing-key/--module-signing-cert and enroll the certificate on the nodes \
                 (mokutil --import, or the platform's key database)"
                    .to_owned(),
            ));
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
pub(crate) struct Loader<'a> {
    pub(crate) layout: &'a Layout,
    pub(crate) kernel: &'a dyn Kernel,
    pub(crate) loaded_now: Vec<String>,
}

impl Loader<'_> {
    pub(crate) fn load_all(&mut self, plan: &[ModuleLoad]) -> Result<()> {
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
    pub(crate) fn roll_back(&mut self) {
        while let Some(name) = self.loaded_now.pop() {
            match self.kernel.unload(&name) {
                Ok(()) => info!(module = %name, "unloaded after the failure"),
                Err(e) => warn!(module = %name, error = %e, "could not unload after the failure"),
            }
        }
    }
}

/// Whether the kernel refuses unsigned modules (`module.sig_enforce`, which Secure Boot's lockdown
/// turns on).
pub fn signatures_enforced(layout: &Layout) -> bool {
    let enforced = std::fs::read_to_string(layout.host("/sys/module/module/parameters/sig_enforce"))
        .is_ok_and(|v| v.trim() == "Y");
    let locked = std::fs::read_to_string(layout.host("/sys/kernel/security/lockdown"))
        .is_ok_and(|v| v.contains("[integrity]") || v.contains("[confidentiality]"));
    enforced || locked
}

fn explain_load_error(error: &io::Error) -> String {
    use nix::libc;
    match error.raw_os_error() {
        Some(libc::ENODEV) => {
            "the kernel found no NVIDIA GPU for it (No such device; dmesg says NVRM: No NVIDIA GPU found)".to_owned()
        }
        Some(libc::ENOENT) => {
            "a symbol or a firmware file it needs was not found: a module it depends on is not loaded, or its firmware is not where the kernel looks (see dmesg: \"Unknown symbol\" or \"firmware ... not found\")".to_owned()
        }
        Some(libc::ENOEXEC) => "invalid module format: built for another kernel or configuration".to_owned(),
        Some(libc::EPERM) => "not permitted: the installer needs CAP_SYS_MODULE (a privileged container)".to_owned(),
        Some(libc::EKEYREJECTED) | Some(libc::ENOKEY) => {
            "the kernel requires signed modules and rejected this one: it is unsigned, or signed with a key the kernel does not trust; enroll the signing certificate (mokutil --import, or the platform's key database)".to_owned()
        }
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
