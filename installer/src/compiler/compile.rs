//! `compile`: build the NVIDIA kernel modules for one kernel with the kernel's own build system,
//! check their vermagic, add the user-space files, and pack the bundle.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::bundle::manifest::Manifest;
use crate::bundle::modinfo;
use crate::bundle::pack::{self, BundleInfo};
use crate::bundle::sha256_file;
use crate::{Error, Result};

/// Which kernel modules: NVIDIA's open modules or the proprietary ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    Open,
    Proprietary,
    /// Proprietary below the 560 branch, open from 560 on (the original system's rule); for a
    /// module source directory, whatever it is.
    Auto,
}

/// What to build. Serialized as the request the coordinator sends to the dev container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompileRequest {
    /// A `.run` installer, a directory or a tarball of the module sources, or an http(s) URL of one.
    pub driver_source: String,
    pub driver_sha256: Option<String>,
    /// Directory with `bin/` and `lib/`; default: the `.run`'s own files.
    pub userspace: Option<PathBuf>,
    /// Kernel build tree, e.g. `/lib/modules/<release>/build` or `/usr/src/linux-headers-<release>`;
    /// default `/lib/modules/<running kernel>/build` where the build runs.
    pub kernel_headers: Option<PathBuf>,
    /// Default: read from the headers.
    pub kernel_release: Option<String>,
    pub flavor: Flavor,
    /// `*.patch` files applied in name order (`patch -p1` in the module source directory).
    pub patches: Option<PathBuf>,
    /// GPU firmware for this driver version (`gsp_*.bin`), for sources that ship it apart from the
    /// `.run` (e.g. Debian's `firmware-nvidia-gsp`): the directory holding the files, or a
    /// firmware root holding `nvidia/<version>/`. Default: the `.run`'s own `firmware/`.
    #[serde(default)]
    pub firmware: Option<PathBuf>,
    /// Download an `http://` driver source (unencrypted, unauthenticated: only with a digest).
    #[serde(default)]
    pub allow_http: bool,
    /// Sign the built modules (for kernels that enforce module signatures, Secure Boot) with this
    /// private key and X.509 certificate, using the kernel's own `scripts/sign-file`.
    #[serde(default)]
    pub module_signing: Option<ModuleSigning>,
    pub output: PathBuf,
    /// Default: read from the sources.
    pub driver_version: Option<String>,
    pub gardenlinux_version: Option<String>,
    /// Parallel make jobs; 0 = one per core.
    pub jobs: usize,
}

/// The key and certificate `sign-file` signs modules with (PEM; the certificate may be DER).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleSigning {
    pub key: PathBuf,
    pub certificate: PathBuf,
}

/// A finished build.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub manifest: Manifest,
    pub output: PathBuf,
    pub log: PathBuf,
}

const MODULES: [&str; 5] = ["nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm", "nvidia-peermem"];

/// Build the bundle described by `request`, working under `work`.
pub fn compile(request: &CompileRequest, work: &Path) -> Result<Compiled> {
    let started = Instant::now();
    std::fs::create_dir_all(work).map_err(|e| Error::io("creating", work, e))?;
    let source = fetch(request, work)?;
    let prepared = prepare(&source, request, work)?;
    let headers = match (&request.kernel_headers, &request.kernel_release) {
        (Some(path), _) => path.clone(),
        (None, Some(release)) => PathBuf::from(format!("/lib/modules/{release}/build")),
        (None, None) => {
            let osrelease = Path::new("/proc/sys/kernel/osrelease");
            let release = std::fs::read_to_string(osrelease).map_err(|e| Error::io("reading", osrelease, e))?;
            PathBuf::from(format!("/lib/modules/{}/build", release.trim()))
        }
    };
    let (sysout, syssrc) = header_trees(&headers)?;
    let kernel_release = match &request.kernel_release {
        Some(k) => k.clone(),
        None => read_release(&sysout)?,
    };
    let driver_version = match (&request.driver_version, &prepared.version) {
        (Some(v), _) | (None, Some(v)) => v.clone(),
        (None, None) => {
            return Err(Error::DriverSource {
                source_name: request.driver_source.clone(),
                reason: "cannot tell the driver version from the sources; pass --driver-version".to_owned(),
            });
        }
    };
    if let Some(dir) = &request.patches {
        apply_patches(&prepared.modules_dir, dir)?;
    }
    let log = work.join(format!("build-{kernel_release}.log"));
    build(&prepared.modules_dir, &sysout, &syssrc, &kernel_release, request.jobs, &log)?;

    let bundle = work.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(bundle.join("modules")).map_err(|e| Error::io("creating", &bundle, e))?;
    for name in MODULES {
        let built = prepared.modules_dir.join(format!("{name}.ko"));
        if !built.is_file() {
            if name == "nvidia" {
                return Err(Error::Module {
                    module: name.into(),
                    path: built,
                    reason: "the build produced no nvidia.ko".into(),
                });
            }
            continue;
        }
        let target = bundle.join("modules").join(format!("{name}.ko"));
        strip(&built, &target)?;
        // Signed after stripping: the signature is appended to the final bytes.
        if let Some(signing) = &request.module_signing {
            sign_module(&sysout, signing, &target)?;
        }
        let vermagic = modinfo::modinfo(&target)?.vermagic;
        if modinfo::vermagic_release(&vermagic) != kernel_release {
            return Err(Error::Module {
                module: name.into(),
                path: target,
                reason: format!("vermagic {vermagic:?} does not match kernel {kernel_release}"),
            });
        }
    }
    match (&request.userspace, &prepared.run_dir) {
        (Some(dir), _) => copy_userspace(dir, &bundle)?,
        (None, Some(run)) => userspace_from_run(run, &driver_version, &bundle)?,
        (None, None) => {
            return Err(Error::DriverSource {
                source_name: request.driver_source.clone(),
                reason: "no user-space files: pass --userspace DIR (with bin/ and lib/)".to_owned(),
            });
        }
    }
    copy_firmware(request.firmware.as_deref(), prepared.run_dir.as_deref(), &driver_version, &bundle)?;
    let info = BundleInfo {
        driver_version,
        kernel_release,
        flavor: match prepared.flavor {
            Flavor::Proprietary => "proprietary",
            _ => "open",
        }
        .into(),
        gardenlinux_version: request.gardenlinux_version.clone(),
    };
    let manifest = pack::describe(&bundle, &info)?;
    let packed = pack::pack(&bundle, &manifest, &request.output, 9)?;
    info!(
        output = %request.output.display(),
        modules = packed.modules.len(),
        files = packed.files.len(),
        elapsed_s = started.elapsed().as_secs(),
        "bundle built"
    );
    Ok(Compiled { manifest: packed, output: request.output.clone(), log })
}

/// A local path to the source, downloaded and checked when it is a URL.
fn fetch(request: &CompileRequest, work: &Path) -> Result<PathBuf> {
    let source = &request.driver_source;
    let (path, downloaded) = if source.starts_with("http://") || source.starts_with("https://") {
        if request.driver_sha256.is_none() {
            warn!(url = %source, "no --driver-sha256: the download is not verified; set it to pin the exact installer");
        }
        let name = source.rsplit('/').next().and_then(|n| n.split('?').next()).filter(|n| !n.is_empty());
        let target = work.join(name.unwrap_or("driver-source"));
        if source.starts_with("http://") && request.allow_http && request.driver_sha256.is_none() {
            return Err(Error::DriverSource {
                source_name: source.clone(),
                reason: "an http:// download needs --driver-sha256: nothing else would tell a tampered file".to_owned(),
            });
        }
        let sha256 = crate::compiler::download::download(source, &target, request.allow_http)?;
        (target, Some(sha256))
    } else {
        (PathBuf::from(source), None)
    };
    if let Some(expected) = &request.driver_sha256
        && path.is_file()
    {
        let actual = match downloaded {
            Some(sha256) => sha256,
            None => sha256_file(&path)?,
        };
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(Error::Checksum { what: path.display().to_string(), expected: expected.clone(), actual });
        }
    }
    if !path.exists() {
        return Err(Error::io("reading the driver source", &path, std::io::ErrorKind::NotFound.into()));
    }
    Ok(path)
}

struct Prepared {
    modules_dir: PathBuf,
    run_dir: Option<PathBuf>,
    version: Option<String>,
    flavor: Flavor,
}

/// Unpack the source into `work` and find the module source directory (the one with `Kbuild`
/// and `conftest.sh`).
fn prepare(source: &Path, request: &CompileRequest, work: &Path) -> Result<Prepared> {
    let tree = work.join("src");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree).map_err(|e| Error::io("creating", &tree, e))?;
    let name = source.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".run") {
        let run = tree.join("run");
        run_tool(
            Command::new("sh").arg(source).arg("-x").arg("--target").arg(&run),
            &format!("extracting {}", source.display()),
        )?;
        let version = run_version(&run);
        let flavor = match request.flavor {
            Flavor::Auto => {
                match version.as_deref().and_then(|v| v.split('.').next()).and_then(|m| m.parse::<u32>().ok()) {
                    Some(major) if major < 560 => Flavor::Proprietary,
                    _ => Flavor::Open,
                }
            }
            chosen => chosen,
        };
        let modules_dir = run.join(if flavor == Flavor::Open { "kernel-open" } else { "kernel" });
        return Ok(Prepared { modules_dir, run_dir: Some(run), version, flavor });
    }
    if source.is_dir() {
        run_tool(
            Command::new("cp").arg("-a").arg(format!("{}/.", source.display())).arg(&tree),
            "copying the module sources",
        )?;
    } else {
        run_tool(
            Command::new("tar").arg("-xf").arg(source).arg("-C").arg(&tree),
            &format!("extracting {}", source.display()),
        )?;
    }
    let modules_dir = find_module_dir(&tree, 5).ok_or_else(|| Error::DriverSource {
        source_name: source.display().to_string(),
        reason: "holds no kernel module sources (no directory with Kbuild and conftest.sh)".to_owned(),
    })?;
    let detected = if proprietary_license(&modules_dir) { Flavor::Proprietary } else { Flavor::Open };
    if request.flavor != Flavor::Auto && request.flavor != detected {
        return Err(Error::DriverSource {
            source_name: source.display().to_string(),
            reason: format!("holds the {detected:?} modules, not {:?}", request.flavor),
        });
    }
    let version = std::fs::read_to_string(modules_dir.join("Kbuild")).ok().and_then(|k| {
        let at = k.find("NV_VERSION_STRING=\\\"")? + "NV_VERSION_STRING=\\\"".len();
        k[at..].split('\\').next().map(str::to_owned)
    });
    Ok(Prepared { modules_dir, run_dir: None, version, flavor: detected })
}

fn find_module_dir(dir: &Path, depth: usize) -> Option<PathBuf> {
    if dir.join("Kbuild").is_file() && dir.join("conftest.sh").is_file() {
        return Some(dir.to_owned());
    }
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    entries.sort();
    entries.into_iter().find_map(|d| find_module_dir(&d, depth - 1))
}

/// Both flavors ship prebuilt `*.o_binary` parts; what tells them apart is the license the
/// sources declare: `MODULE_LICENSE("NVIDIA")` for the proprietary modules, "Dual MIT/GPL" for the
/// open ones.
fn proprietary_license(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir.join("nvidia")) else { return false };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .any(|path| std::fs::read_to_string(path).is_ok_and(|text| text.contains("MODULE_LICENSE(\"NVIDIA\")")))
}

fn run_version(run: &Path) -> Option<String> {
    let manifest = std::fs::read_to_string(run.join(".manifest")).ok()?;
    manifest.lines().nth(1).map(|l| l.trim().to_owned())
}

fn run_tool(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().map_err(|e| Error::Tool { what: what.to_owned(), reason: e.to_string() })?;
    if !output.status.success() {
        return Err(Error::Tool {
            what: what.to_owned(),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// The build tree, and the source tree it includes (Debian splits them).
pub fn header_trees(headers: &Path) -> Result<(PathBuf, PathBuf)> {
    let sysout = std::fs::canonicalize(headers).map_err(|e| Error::io("reading the kernel headers", headers, e))?;
    if !sysout.join(".config").is_file() && !sysout.join("include/config/kernel.release").is_file() {
        return Err(Error::KernelHeaders {
            path: sysout,
            reason: "not a configured kernel build tree (no .config)".to_owned(),
        });
    }
    let makefile = std::fs::read_to_string(sysout.join("Makefile")).unwrap_or_default();
    let included = makefile
        .lines()
        .find_map(|l| l.trim().strip_prefix("include "))
        .and_then(|p| p.trim().strip_suffix("/Makefile"))
        .map(PathBuf::from);
    let syssrc = match included.filter(|p| p.is_dir()) {
        Some(source) => source,
        None => match std::fs::canonicalize(sysout.join("source")) {
            Ok(source) if source.is_dir() => source,
            _ => sysout.clone(),
        },
    };
    Ok((sysout, syssrc))
}

/// The release the tree builds for: `UTS_RELEASE` (what vermagic carries; Debian's
/// `kernel.release` holds the upstream version instead), else `include/config/kernel.release`.
fn read_release(sysout: &Path) -> Result<String> {
    let uts = sysout.join("include/generated/utsrelease.h");
    if let Ok(text) = std::fs::read_to_string(&uts)
        && let Some(release) = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("#define UTS_RELEASE"))
            .map(|r| r.trim().trim_matches('"').to_owned())
        && !release.is_empty()
    {
        return Ok(release);
    }
    let path = sysout.join("include/config/kernel.release");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
    Ok(text.trim().to_owned())
}

fn apply_patches(modules_dir: &Path, dir: &Path) -> Result<()> {
    let mut patches: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("reading the patches", dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    for patch in patches {
        let output = Command::new("patch")
            .args(["-p1", "--forward", "--batch", "-d"])
            .arg(modules_dir)
            .arg("-i")
            .arg(&patch)
            .output()
            .map_err(|e| Error::Patch { patch: patch.clone(), reason: format!("cannot run patch: {e}") })?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            return Err(Error::Patch { patch, reason: text.trim().to_owned() });
        }
        info!(patch = %patch.display(), "patch applied");
    }
    Ok(())
}

/// `make modules` with the kernel's build system, log streamed to `log` with progress; on
/// failure the compiler's first error is the message.
fn build(
    modules_dir: &Path,
    sysout: &Path,
    syssrc: &Path,
    kernel_release: &str,
    jobs: usize,
    log: &Path,
) -> Result<()> {
    let jobs = if jobs == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { jobs };
    info!(kernel = kernel_release, jobs, sources = %modules_dir.display(), "building the kernel modules");
    let mut child = Command::new("make")
        .arg("-C")
        .arg(modules_dir)
        .arg(format!("-j{jobs}"))
        .arg(format!("SYSSRC={}", syssrc.display()))
        .arg(format!("SYSOUT={}", sysout.display()))
        .arg("modules")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Build {
            kernel: kernel_release.into(),
            error: format!("cannot run make: {e}"),
            log: log.to_owned(),
        })?;
    let (sender, receiver) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(std::result::Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(sender);
    let mut file = std::fs::File::create(log).map_err(|e| Error::io("writing", log, e))?;
    let mut first_error: Option<String> = None;
    let (mut compiled, mut last) = (0usize, Instant::now());
    for line in receiver {
        let _ = writeln!(file, "{line}");
        if line.contains("CC [M]") {
            compiled += 1;
        }
        if first_error.is_none() && is_compiler_error(&line) {
            first_error = Some(line.trim().to_owned());
            warn!(error = %line.trim(), "compiler error");
        }
        if last.elapsed() >= Duration::from_secs(15) {
            info!(kernel = kernel_release, objects = compiled, "compiling");
            last = Instant::now();
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(|e| Error::Build {
        kernel: kernel_release.into(),
        error: e.to_string(),
        log: log.to_owned(),
    })?;
    if !status.success() {
        let error = first_error.unwrap_or_else(|| {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            format!("make failed ({status}); last lines: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "))
        });
        return Err(Error::Build { kernel: kernel_release.into(), error, log: log.to_owned() });
    }
    info!(kernel = kernel_release, objects = compiled, "modules built");
    Ok(())
}

/// `file.c:12:5: error: …` (or `fatal error`), as gcc and clang print them; not make's echo of a
/// command line that merely mentions `-Werror`.
pub fn is_compiler_error(line: &str) -> bool {
    let line = line.trim_start();
    let Some(at) = line.find(": error:").or_else(|| line.find(": fatal error:")) else { return false };
    let location = &line[..at];
    let mut parts = location.split(':');
    let file = parts.next().unwrap_or_default();
    !file.is_empty()
        && !file.contains(' ')
        && parts.next().is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Append a module signature with the kernel's own `scripts/sign-file` (SHA-256).
fn sign_module(build_tree: &Path, signing: &ModuleSigning, module: &Path) -> Result<()> {
    let sign_file = build_tree.join("scripts/sign-file");
    if !sign_file.is_file() {
        return Err(Error::KernelHeaders {
            path: build_tree.to_owned(),
            reason: "has no scripts/sign-file to sign the modules with".to_owned(),
        });
    }
    run_tool(
        Command::new(&sign_file).arg("sha256").arg(&signing.key).arg(&signing.certificate).arg(module),
        &format!("signing {}", module.display()),
    )?;
    info!(module = %module.display(), certificate = %signing.certificate.display(), "module signed");
    Ok(())
}

fn strip(from: &Path, to: &Path) -> Result<()> {
    let output = Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from).output();
    match output {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => {
            warn!(module = %from.display(), error = %String::from_utf8_lossy(&out.stderr).trim(), "strip failed; the module keeps its debug info");
            std::fs::copy(from, to).map(|_| ()).map_err(|e| Error::io("copying", to, e))
        }
        Err(e) => {
            warn!(error = %e, "strip is not available; the module keeps its debug info");
            std::fs::copy(from, to).map(|_| ()).map_err(|e| Error::io("copying", to, e))
        }
    }
}

fn copy_userspace(dir: &Path, bundle: &Path) -> Result<()> {
    for sub in ["bin", "lib"] {
        let from = dir.join(sub);
        if !from.is_dir() {
            return Err(Error::DriverSource {
                source_name: dir.display().to_string(),
                reason: format!("has no {sub}/"),
            });
        }
        run_tool(
            Command::new("cp").arg("-a").arg(&from).arg(bundle.join(sub)),
            &format!("copying {}", from.display()),
        )?;
    }
    if !bundle.join("bin/nvidia-smi").is_file() {
        return Err(Error::DriverSource {
            source_name: dir.display().to_string(),
            reason: "has no bin/nvidia-smi".to_owned(),
        });
    }
    Ok(())
}

/// The GPU firmware (`gsp_*.bin` and the like) into `firmware/nvidia/<version>/`, where `nvidia.ko`
/// asks for it: from `--firmware` (the files, or a root holding `nvidia/<version>/`), else from
/// the extracted `.run`'s `firmware/`.
fn copy_firmware(given: Option<&Path>, run: Option<&Path>, version: &str, bundle: &Path) -> Result<()> {
    let from = match (given, run) {
        (Some(dir), _) => {
            let nested = dir.join("nvidia").join(version);
            let from = if nested.is_dir() { nested } else { dir.to_owned() };
            if !from.is_dir() {
                return Err(Error::DriverSource {
                    source_name: dir.display().to_string(),
                    reason: "--firmware is not a directory".to_owned(),
                });
            }
            from
        }
        (None, Some(run)) if run.join("firmware").is_dir() => run.join("firmware"),
        _ => {
            warn!(
                "no GPU firmware for this driver: NVIDIA's open modules (and the proprietary ones on GSP GPUs) cannot                  initialise a GPU without nvidia/{version}/gsp_*.bin; pass --firmware DIR"
            );
            return Ok(());
        }
    };
    let target = bundle.join("firmware/nvidia").join(version);
    std::fs::create_dir_all(&target).map_err(|e| Error::io("creating", &target, e))?;
    let mut copied = 0;
    for entry in std::fs::read_dir(&from).map_err(|e| Error::io("reading", &from, e))? {
        let entry = entry.map_err(|e| Error::io("reading", &from, e))?;
        let name = entry.file_name();
        if entry.path().is_file() && name.to_string_lossy().ends_with(".bin") {
            std::fs::copy(entry.path(), target.join(&name)).map_err(|e| Error::io("copying", &entry.path(), e))?;
            copied += 1;
        }
    }
    if copied == 0 {
        return Err(Error::DriverSource {
            source_name: from.display().to_string(),
            reason: format!("holds no firmware (*.bin) for driver {version}"),
        });
    }
    info!(from = %from.display(), files = copied, "GPU firmware added to the bundle");
    Ok(())
}

/// The user-space files of an extracted `.run`: tools into `bin/`, libraries into `lib/` with
/// their soname links.
fn userspace_from_run(run: &Path, version: &str, bundle: &Path) -> Result<()> {
    std::fs::create_dir_all(bundle.join("bin")).map_err(|e| Error::io("creating", bundle, e))?;
    std::fs::create_dir_all(bundle.join("lib")).map_err(|e| Error::io("creating", bundle, e))?;
    for tool in
        ["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server"]
    {
        let from = run.join(tool);
        if from.is_file() {
            std::fs::copy(&from, bundle.join("bin").join(tool)).map_err(|e| Error::io("copying", &from, e))?;
        }
    }
    let suffix = format!(".so.{version}");
    for entry in std::fs::read_dir(run).map_err(|e| Error::io("reading", run, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(&suffix).filter(|s| s.starts_with("lib")) {
            std::fs::copy(entry.path(), bundle.join("lib").join(&name))
                .map_err(|e| Error::io("copying", &entry.path(), e))?;
            let soname = bundle.join("lib").join(format!("{stem}.so.1"));
            let _ = std::os::unix::fs::symlink(&name, soname);
        }
    }
    if !bundle.join("bin/nvidia-smi").is_file() {
        return Err(Error::DriverSource {
            source_name: run.display().to_string(),
            reason: "has no nvidia-smi".to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_compiler_error;

    #[test]
    fn compiler_errors_are_told_from_command_lines() {
        assert!(is_compiler_error(
            "/tmp/x/nvidia/nv-pci.c:223:9: error: too few arguments to function 'pci_resize_resource'"
        ));
        assert!(is_compiler_error("nv.c:1: fatal error: linux/foo.h: No such file or directory"));
        assert!(!is_compiler_error(
            "echo 'cc -Werror=implicit-function-declaration -c x.c'; echo \"nv-pci.c:223:9: error: x\""
        ));
        assert!(!is_compiler_error("make[2]: *** [scripts/Makefile.build:250: nv.o] Error 1"));
    }
}
