//! Packing a bundle directory (`bin/`, `lib/`, `modules/`) into the `tar.zst` that is published:
//! the manifest lists every file with its digest and every module with its vermagic, and the
//! archive is reproducible (sorted entries, zero times and owners).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::bundle::manifest::{self, ArchiveEntry, FileEntry, Manifest, Module};
use crate::bundle::modinfo;
use crate::bundle::sha256_file;
use crate::{Error, Result};

/// What describes the bundle besides its files.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub driver_version: String,
    pub kernel_release: String,
    pub flavor: String,
    pub gardenlinux_version: Option<String>,
}

/// Describe the files under `dir`.
pub fn describe(dir: &Path, info: &BundleInfo) -> Result<Manifest> {
    use nvidia_contract::{NameKind, names};
    names::check(NameKind::DriverVersion, &info.driver_version)?;
    names::check(NameKind::KernelRelease, &info.kernel_release)?;
    names::check(NameKind::Flavor, &info.flavor)?;
    if let Some(version) = &info.gardenlinux_version {
        names::check(NameKind::GardenlinuxVersion, version)?;
    }
    let mut files = BTreeMap::new();
    let mut links = BTreeMap::new();
    let mut modules = Vec::new();
    for top in ["bin", "lib", "modules", "firmware"] {
        walk(dir, &dir.join(top), &mut files, &mut links)?;
    }
    for path in files.keys().filter(|p| p.starts_with("modules/") && p.ends_with(".ko")) {
        let module = modinfo::modinfo(&dir.join(path))?;
        let built_for = modinfo::vermagic_release(&module.vermagic);
        if built_for != info.kernel_release {
            return Err(Error::Module {
                module: path.clone(),
                path: dir.join(path),
                reason: format!("vermagic says kernel {built_for}, the bundle is for {}", info.kernel_release),
            });
        }
        let name = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        modules.push(Module { name, path: path.clone(), vermagic: module.vermagic, depends: module.depends });
    }
    Ok(Manifest {
        schema_version: manifest::SCHEMA_VERSION,
        driver_version: info.driver_version.clone(),
        kernel_release: info.kernel_release.clone(),
        flavor: info.flavor.clone(),
        gardenlinux_version: info.gardenlinux_version.clone(),
        modules,
        files,
        links,
        archive: None,
    })
}

fn walk(
    root: &Path,
    dir: &Path,
    files: &mut BTreeMap<String, FileEntry>,
    links: &mut BTreeMap<String, String>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    let mut entries: Vec<_> = entries.collect::<std::io::Result<_>>().map_err(|e| Error::io("reading", dir, e))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let relative = path.strip_prefix(root).unwrap_or(&path).display().to_string();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| Error::io("reading", &path, e))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(|e| Error::io("reading", &path, e))?;
            links.insert(relative, target.display().to_string());
        } else if meta.is_dir() {
            walk(root, &path, files, links)?;
        } else if meta.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
            files.insert(relative, FileEntry { sha256: sha256_file(&path)?, size: meta.len(), mode });
        } else {
            return Err(Error::io("packing", &path, std::io::Error::other("neither a file, a directory nor a link")));
        }
    }
    Ok(())
}

/// Write `manifest` and the files it lists from `dir` as a zstd tar to `out`; returns the
/// manifest with the archive's digest and size (the copy that goes beside it in the bucket).
pub fn pack(dir: &Path, manifest: &Manifest, out: &Path, level: i32) -> Result<Manifest> {
    let file = File::create(out).map_err(|e| Error::io("creating", out, e))?;
    let hashing = HashingWriter { inner: BufWriter::new(file), hasher: Sha256::new(), bytes: 0 };
    let mut encoder =
        zstd::stream::write::Encoder::new(hashing, level).map_err(|e| Error::io("compressing", out, e))?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let _ = encoder.multithread(workers);
    let mut tar = tar::Builder::new(encoder);
    tar.mode(tar::HeaderMode::Deterministic);
    let fail = |e: std::io::Error| Error::io("writing", out, e);
    let inner = manifest.without_archive().to_json();
    append(&mut tar, manifest::FILE_NAME, tar::EntryType::Regular, 0o644, &inner[..], inner.len() as u64)
        .map_err(fail)?;
    // Directories first, so extraction needs no implied parents.
    let mut dirs = std::collections::BTreeSet::new();
    for path in manifest.files.keys().chain(manifest.links.keys()) {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.display().to_string());
            parent = p.parent();
        }
    }
    for d in &dirs {
        append(&mut tar, &format!("{d}/"), tar::EntryType::Directory, 0o755, &[][..], 0).map_err(fail)?;
    }
    for (path, entry) in &manifest.files {
        let source = dir.join(path);
        let reader = File::open(&source).map_err(|e| Error::io("reading", &source, e))?;
        append(&mut tar, path, tar::EntryType::Regular, entry.mode, reader, entry.size).map_err(fail)?;
    }
    for (path, target) in &manifest.links {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_size(0);
        header.set_mtime(0);
        tar.append_link(&mut header, path, target).map_err(fail)?;
    }
    let encoder = tar.into_inner().map_err(fail)?;
    let mut hashing = encoder.finish().map_err(fail)?;
    hashing.inner.flush().map_err(fail)?;
    hashing.inner.get_ref().sync_all().map_err(fail)?;
    Ok(Manifest {
        archive: Some(ArchiveEntry { sha256: hex::encode(hashing.hasher.finalize()), size: hashing.bytes }),
        ..manifest.clone()
    })
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: impl std::io::Read,
    size: u64,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    tar.append_data(&mut header, path, data)
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Read the manifest stored first inside a bundle archive.
pub fn read_inner_manifest(archive: &Path) -> Result<Manifest> {
    let file = File::open(archive).map_err(|e| Error::io("reading", archive, e))?;
    let decoder = zstd::stream::read::Decoder::new(file).map_err(|e| Error::io("decompressing", archive, e))?;
    let mut tar = tar::Archive::new(decoder);
    let source = archive.display().to_string();
    let broken = |e: std::io::Error| Error::Archive { source_name: source.clone(), reason: e.to_string() };
    for entry in tar.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        if entry.path().map_err(broken)?.as_os_str() == manifest::FILE_NAME {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(broken)?;
            return Manifest::parse(&bytes, &format!("{source}!{}", manifest::FILE_NAME));
        }
    }
    Err(Error::Archive { source_name: source, reason: "has no manifest.json".to_owned() })
}
