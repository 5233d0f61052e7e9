//! What keeps the loaded driver in use: processes with a `/dev/nvidia*` file open (the host's
//! `/proc/<pid>/fd`), and module reference counts that the NVIDIA modules' own dependents do not
//! explain. The old modules are unloaded only when this finds nothing.

use std::path::Path;

use nvidia_contract::layout::Layout;

/// A process holding an NVIDIA device file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub command: String,
    pub device: String,
}

/// A loaded module as `/proc/modules` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedModule {
    pub name: String,
    pub refcount: u32,
    pub used_by: Vec<String>,
}

/// The NVIDIA modules loaded now (`nvidia`, `nvidia_*`), from `/proc/modules`.
pub fn nvidia_modules(layout: &Layout) -> Vec<LoadedModule> {
    let text = std::fs::read_to_string(layout.host("/proc/modules")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?.to_owned();
            let _size = fields.next();
            let refcount = fields.next()?.parse().ok()?;
            let used_by = fields
                .next()
                .unwrap_or("-")
                .split(',')
                .filter(|s| !s.is_empty() && *s != "-")
                .map(str::to_owned)
                .collect();
            (name == "nvidia" || name.starts_with("nvidia_")).then_some(LoadedModule { name, refcount, used_by })
        })
        .collect()
}

/// The order to unload `modules` in: each after every module that uses it.
pub fn unload_order(modules: &[LoadedModule]) -> Vec<String> {
    let mut left: Vec<&LoadedModule> = modules.iter().collect();
    let mut order = Vec::new();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|m| {
            let still_used =
                m.used_by.iter().any(|user| modules.iter().any(|o| &o.name == user) && !order.contains(user));
            if still_used {
                true
            } else {
                order.push(m.name.clone());
                false
            }
        });
        if left.len() == before {
            // A cycle cannot happen in the kernel; take the rest as listed.
            order.extend(left.drain(..).map(|m| m.name.clone()));
        }
    }
    order
}

/// Processes with an NVIDIA device file open, from the host's `/proc`.
pub fn device_holders(layout: &Layout) -> Vec<Holder> {
    let proc_dir = layout.host("/proc");
    let Ok(entries) = std::fs::read_dir(&proc_dir) else { return Vec::new() };
    let mut holders = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let device = fds.flatten().find_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            target.starts_with("/dev/nvidia").then_some(target)
        });
        if let Some(device) = device {
            holders.push(Holder { pid, command: comm(&entry.path()), device });
        }
    }
    holders.sort_by_key(|h| h.pid);
    holders
}

fn comm(process: &Path) -> String {
    std::fs::read_to_string(process.join("comm")).map(|c| c.trim().to_owned()).unwrap_or_else(|_| "?".to_owned())
}

/// What keeps the driver in use, in words; `None` when nothing does.
pub fn in_use(layout: &Layout) -> Option<String> {
    let holders = device_holders(layout);
    if !holders.is_empty() {
        let named: Vec<String> = holders
            .iter()
            .take(5)
            .map(|h| format!("process {} ({}) has {} open", h.pid, h.command, h.device))
            .collect();
        let more = holders.len().saturating_sub(5);
        return Some(format!(
            "{}{}",
            named.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        ));
    }
    let modules = nvidia_modules(layout);
    let busy: Vec<String> = modules
        .iter()
        .filter(|m| {
            let by_nvidia = m.used_by.iter().filter(|u| modules.iter().any(|o| &o.name == *u)).count() as u32;
            m.refcount > by_nvidia
        })
        .map(|m| {
            format!(
                "module {} is in use (reference count {}, used by {})",
                m.name,
                m.refcount,
                if m.used_by.is_empty() { "-".to_owned() } else { m.used_by.join(",") }
            )
        })
        .collect();
    (!busy.is_empty()).then(|| busy.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(modules: &str) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        std::fs::write(dir.path().join("proc/modules"), modules).expect("modules");
        let layout = Layout::new(dir.path(), "/opt/nvidia-installer");
        (dir, layout)
    }

    const LOADED: &str = "nvidia_modeset 1 0 - Live 0x0\nnvidia_uvm 1 0 - Live 0x0\nnvidia 1 2 nvidia_uvm,nvidia_modeset, Live 0x0\ndrm 1 3 - Live 0x0\n";

    #[test]
    fn users_are_unloaded_before_what_they_use() {
        let (_dir, layout) = host(LOADED);
        let modules = nvidia_modules(&layout);
        assert_eq!(modules.len(), 3, "drm is not ours");
        let order = unload_order(&modules);
        assert_eq!(order.last().map(String::as_str), Some("nvidia"));
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn idle_modules_are_not_in_use_and_a_process_with_a_device_open_is_named() {
        let (dir, layout) = host(LOADED);
        assert_eq!(in_use(&layout), None, "nvidia's references are its own modules");
        let process = dir.path().join("proc/4242");
        std::fs::create_dir_all(process.join("fd")).expect("fd");
        std::fs::write(process.join("comm"), "python3\n").expect("comm");
        std::os::unix::fs::symlink("/dev/nvidia0", process.join("fd/7")).expect("fd link");
        std::os::unix::fs::symlink("/dev/null", process.join("fd/0")).expect("fd link");
        let said = in_use(&layout).expect("in use");
        assert!(said.contains("process 4242 (python3) has /dev/nvidia0 open"), "{said}");
    }

    #[test]
    fn a_reference_without_a_process_is_named_by_module() {
        let (_dir, layout) = host("nvidia_uvm 1 1 - Live 0x0\nnvidia 1 1 nvidia_uvm, Live 0x0\n");
        let said = in_use(&layout).expect("in use");
        assert!(said.contains("module nvidia_uvm is in use (reference count 1"), "{said}");
    }
}
