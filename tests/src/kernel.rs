//! A kernel seam for tests: records every request to the kernel and simulates its effect under a
//! host root, as the kernel would show it in `/proc` and `/sys`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;

use nvidia_installer::node::kernel::Kernel;

/// `ENOENT` (Linux): what a module load that finds no firmware fails with here.
const ENOENT: i32 = 2;
/// `ENOEXEC` (Linux): invalid module format.
const ENOEXEC: i32 = 8;

/// One request to the kernel seam.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Load(String),
    Unload(String),
    Mknod(String, u64, u64),
    Run(String),
}

/// Records every request and simulates its effect under the host root, as the kernel would show
/// it in /proc and /sys. `fail` makes the load of that module fail with that errno, or, named
/// `nvidia-smi`, makes running it exit with that code as it does when it cannot reach the driver.
#[derive(Debug)]
pub struct SimKernel {
    pub root: PathBuf,
    pub calls: Mutex<Vec<Call>>,
    pub fail: Option<(String, i32)>,
    pub gpus: usize,
    /// Firmware `nvidia` requests when it loads (e.g. `nvidia/535.261.03/gsp_tu10x.bin`), looked
    /// up as the kernel's loader does: under the directory `firmware_class.path` names, then
    /// `/lib/firmware`. Missing, the load fails (`ENOENT`), as the GPU's initialisation would.
    pub firmware: Option<String>,
    /// Where each requested firmware file was found.
    pub firmware_found: Mutex<Vec<PathBuf>>,
    /// Loads of modules from this driver version's bundle fail (`ENOEXEC`, as a module built
    /// for another kernel configuration does).
    pub fail_version: Option<String>,
}

impl SimKernel {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            calls: Mutex::new(Vec::new()),
            fail: None,
            gpus: 2,
            firmware: None,
            firmware_found: Mutex::new(Vec::new()),
            fail_version: None,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    /// The firmware loader's search: `firmware_class.path`, then `/lib/firmware` (host paths).
    fn find_firmware(&self, name: &str) -> Option<PathBuf> {
        let parameter =
            std::fs::read_to_string(self.root.join("sys/module/firmware_class/parameters/path")).unwrap_or_default();
        let custom = parameter.trim_end_matches('\n');
        let dirs = (!custom.is_empty()).then(|| custom.to_owned()).into_iter().chain(["/lib/firmware".to_owned()]);
        dirs.map(|dir| self.root.join(dir.trim_start_matches('/')).join(name)).find(|path| path.is_file())
    }

    /// Count `user` in (or out of) `module`'s references and users in `/proc/modules`.
    fn use_module(&self, module: &str, user: &str, add: bool) {
        let path = self.root.join("proc/modules");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let rewritten: String = text
            .lines()
            .map(|line| {
                let mut fields: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                if fields.first().map(String::as_str) == Some(module) && fields.len() >= 4 {
                    let mut users: Vec<String> =
                        fields[3].split(',').filter(|u| !u.is_empty() && *u != "-").map(str::to_owned).collect();
                    users.retain(|u| u != user);
                    if add {
                        users.push(user.to_owned());
                    }
                    fields[2] = users.len().to_string();
                    fields[3] = if users.is_empty() { "-".to_owned() } else { format!("{},", users.join(",")) };
                }
                format!("{}\n", fields.join(" "))
            })
            .collect();
        std::fs::write(path, rewritten).expect("write /proc/modules");
    }

    fn append(&self, path: &str, line: &str) {
        let path = self.root.join(path);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        if path.ends_with("devices") {
            text = text.replacen("\nBlock devices:", &format!("{line}\n\nBlock devices:"), 1).replace("\n\n\n", "\n\n");
        } else {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(path, text).expect("write sim file");
    }
}

impl Kernel for SimKernel {
    fn load(&self, module: &Path, _params: &str) -> io::Result<()> {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .split(".ko")
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        self.calls.lock().expect("calls").push(Call::Load(name.clone()));
        if let Some((failing, errno)) = &self.fail
            && *failing == name
        {
            return Err(io::Error::from_raw_os_error(*errno));
        }
        if let Some(version) = &self.fail_version
            && module.components().any(|c| c.as_os_str() == version.as_str())
        {
            return Err(io::Error::from_raw_os_error(ENOEXEC));
        }
        if name == "nvidia"
            && let Some(firmware) = &self.firmware
        {
            match self.find_firmware(firmware) {
                Some(found) => self.firmware_found.lock().expect("found").push(found),
                None => return Err(io::Error::from_raw_os_error(ENOENT)),
            }
        }
        self.append("proc/modules", &format!("{name} 1000 0 - Live 0x0000000000000000"));
        if name.starts_with("nvidia_") {
            self.use_module("nvidia", &name, true);
        }
        if name == "nvidia" {
            let version = module
                .parent()
                .and_then(Path::parent)
                .and_then(|b| b.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            std::fs::create_dir_all(self.root.join("sys/module/nvidia")).expect("sys");
            std::fs::write(self.root.join("sys/module/nvidia/version"), format!("{version}\n")).expect("version");
            self.append("proc/devices", "195 nvidia-frontend");
            for gpu in 0..self.gpus {
                std::fs::create_dir_all(
                    self.root.join(format!("proc/driver/nvidia/gpus/0000:00:{:02x}.0", 0x1e + gpu)),
                )
                .expect("gpus");
            }
        }
        if name == "nvidia_uvm" {
            self.append("proc/devices", "511 nvidia-uvm");
        }
        Ok(())
    }

    fn unload(&self, name: &str) -> io::Result<()> {
        self.calls.lock().expect("calls").push(Call::Unload(name.to_owned()));
        let path = self.root.join("proc/modules");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        // As the kernel refuses: a module still used by another (EBUSY).
        let used = text.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.first() == Some(&name) && fields.get(2).is_some_and(|count| *count != "0")
        });
        if used {
            return Err(io::Error::from_raw_os_error(16));
        }
        if name.starts_with("nvidia_") {
            self.use_module("nvidia", name, false);
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String =
            text.lines().filter(|l| !l.starts_with(&format!("{name} "))).map(|l| format!("{l}\n")).collect();
        if name == "nvidia" {
            let _ = std::fs::remove_dir_all(self.root.join("sys/module/nvidia"));
        }
        std::fs::write(path, kept)
    }

    fn mknod(&self, path: &Path, major: u64, minor: u64) -> io::Result<()> {
        let relative = path.strip_prefix(&self.root).unwrap_or(path).display().to_string();
        self.calls.lock().expect("calls").push(Call::Mknod(relative, major, minor));
        std::fs::write(path, format!("c {major}:{minor}\n"))
    }

    fn run(&self, program: &str, args: &[&str], library_dir: &str) -> io::Result<Output> {
        self.calls.lock().expect("calls").push(Call::Run(program.to_owned()));
        if let Some((failing, code)) = &self.fail
            && failing == "nvidia-smi"
            && program.ends_with("/nvidia-smi")
        {
            return std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!(
                    "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit {code}"
                ))
                .output();
        }
        std::process::Command::new(self.root.join(program.trim_start_matches('/')))
            .args(args)
            .env("LD_LIBRARY_PATH", self.root.join(library_dir.trim_start_matches('/')))
            .output()
    }
}
