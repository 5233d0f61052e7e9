//! The thin seam to the kernel: load and unload a module, make a character device node, run a
//! program on the host. [`HostKernel`] does it for real; tests record what is asked of it.
//! Everything else (reading `/proc` and `/sys`, choosing what to load) lives outside the seam.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What the installer needs from the kernel.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// `finit_module(2)` of the file at `module` (a path in this process's view).
    fn load(&self, module: &Path, params: &str) -> io::Result<()>;
    /// `delete_module(2)`.
    fn unload(&self, name: &str) -> io::Result<()>;
    /// `mknod(2)` a character device with mode 0666.
    fn mknod(&self, path: &Path, major: u64, minor: u64) -> io::Result<()>;
    /// Run `program` (a path on the host) with `LD_LIBRARY_PATH=library_dir` (also a host path).
    fn run(&self, program: &str, args: &[&str], library_dir: &str) -> io::Result<Output>;
}

/// The real kernel. Programs run inside the host root (`chroot`) unless it is `/`.
#[derive(Debug, Clone)]
pub struct HostKernel {
    pub host_root: PathBuf,
}

impl Kernel for HostKernel {
    fn load(&self, module: &Path, params: &str) -> io::Result<()> {
        let file = std::fs::File::open(module)?;
        let params = CString::new(params).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut flags = nix::kmod::ModuleInitFlags::empty();
        if module.extension().is_some_and(|e| e == "xz" || e == "zst" || e == "gz") {
            // Compressed in-tree modules: the kernel decompresses them itself.
            flags |= nix::kmod::ModuleInitFlags::from_bits_retain(4);
        }
        nix::kmod::finit_module(&file, &params, flags).map_err(io::Error::from)
    }

    fn unload(&self, name: &str) -> io::Result<()> {
        let name = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        nix::kmod::delete_module(&name, nix::kmod::DeleteModuleFlags::O_NONBLOCK).map_err(io::Error::from)
    }

    fn mknod(&self, path: &Path, major: u64, minor: u64) -> io::Result<()> {
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        mknod(path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(major, minor)).map_err(io::Error::from)?;
        // The umask may have narrowed the mode.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
    }

    fn run(&self, program: &str, args: &[&str], library_dir: &str) -> io::Result<Output> {
        let mut command = if self.host_root == Path::new("/") {
            Command::new(program)
        } else {
            let mut command = Command::new("chroot");
            command.arg(&self.host_root).arg(program);
            command
        };
        command.args(args).env("LD_LIBRARY_PATH", library_dir).output()
    }
}
