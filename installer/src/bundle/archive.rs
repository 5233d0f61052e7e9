//! Safe extraction of bundle archives into a staging directory.
//!
//! Everything that could write outside the staging directory or plant something dangerous on the
//! host is refused: absolute paths, `..`, links leaving the bundle, hard links, device and FIFO
//! entries, setuid/setgid/sticky bits, and entries or totals beyond the limits. Each regular file
//! is hashed as it is read and synced before the caller publishes the directory.
//!
//! Hashing and the filesystem work run on threads of their own ([`Writer`]): the disk takes the
//! bytes while one thread hashes them and the calling thread decompresses and checks what follows.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use crate::bundle::manifest::{FileEntry, check_relative};
use crate::{Error, Result};

/// Caps on what one archive may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entries: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_entries: 20_000, max_file_bytes: 4 << 30, max_total_bytes: 16 << 30 }
    }
}

/// How archive paths map to bundle paths.
#[derive(Debug, Clone)]
pub enum PathMap {
    /// The bundle layout: `bin/`, `lib/`, `lib64`, `modules/`, `firmware/`, `manifest.json`.
    Bundle,
    /// The original system's layout: `bin/`, `lib/`, `lib/modules/<kernel>/…/*.ko`; modules move
    /// to `modules/`, other kernels' modules are skipped.
    Legacy { kernel: String },
}

/// What was extracted.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: BTreeMap<String, FileEntry>,
    pub links: BTreeMap<String, String>,
    /// Kernel releases seen under `lib/modules/` (legacy archives).
    pub module_kernels: BTreeSet<String>,
    pub total_bytes: u64,
}

/// Normalize `a/./b/` to `a/b`.
fn normal(path: &Path) -> PathBuf {
    path.components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// Whether a link at `link` (bundle-relative) pointing at `target` stays inside the bundle.
/// `..` may only lead the target: after a name it would climb out of wherever that name
/// resolves to, which may itself be a link (`a -> .`, then `b -> a/../..` leaves the bundle).
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut named = false;
    for component in target.components() {
        match component {
            Component::Normal(_) => named = true,
            Component::ParentDir if named => return false,
            _ => {}
        }
    }
    let mut depth: Vec<&std::ffi::OsStr> = link
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for component in target.components() {
        match component {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

impl PathMap {
    /// Map an archive path; `Ok(None)` skips the entry.
    fn map(&self, path: &Path, extracted: &mut Extracted) -> std::result::Result<Option<PathBuf>, String> {
        let first = path.components().next().and_then(|c| c.as_os_str().to_str()).unwrap_or_default().to_owned();
        match self {
            Self::Bundle => match first.as_str() {
                "bin" | "lib" | "lib64" | "modules" | "firmware" | "manifest.json" => Ok(Some(path.to_owned())),
                _ => Err(format!(
                    "unexpected top-level entry {first:?} (a bundle holds bin/, lib/, modules/, firmware/, manifest.json)"
                )),
            },
            Self::Legacy { kernel } => {
                if first == "bin" {
                    return Ok(Some(path.to_owned()));
                }
                if first != "lib" {
                    return Ok(None);
                }
                let rest: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
                if rest.get(1) == Some(&"modules") {
                    let Some(release) = rest.get(2) else { return Ok(None) };
                    extracted.module_kernels.insert((*release).to_owned());
                    if release != kernel || path.extension().is_none_or(|e| e != "ko") {
                        return Ok(None);
                    }
                    let name = path.file_name().map(PathBuf::from).unwrap_or_default();
                    return Ok(Some(Path::new("modules").join(name)));
                }
                Ok(Some(path.to_owned()))
            }
        }
    }
}

/// Extract the tar stream `reader` into `dest` (an empty directory).
pub fn extract(reader: impl Read, dest: &Path, map: &PathMap, limits: Limits, source: &str) -> Result<Extracted> {
    let mut writer = Writer::start(dest, source)?;
    let extracted = extract_entries(reader, dest, map, limits, source, &mut writer);
    // Whatever happens, the writer has stopped touching `dest` when this returns.
    let digests = writer.finish();
    let mut extracted = extracted?;
    let mut digests = digests?;
    for (key, file) in &mut extracted.files {
        file.sha256 = digests.remove(key).ok_or_else(|| Error::Archive {
            source_name: source.to_owned(),
            reason: format!("{key} was not hashed"),
        })?;
    }
    Ok(extracted)
}

fn extract_entries(
    reader: impl Read,
    dest: &Path,
    map: &PathMap,
    limits: Limits,
    source: &str,
    writer: &mut Writer,
) -> Result<Extracted> {
    let mut archive = tar::Archive::new(reader);
    let mut extracted = Extracted::default();
    let mut count = 0usize;
    let broken = |reason: String| Error::Archive { source_name: source.to_owned(), reason };
    let entries = archive.entries().map_err(|e| broken(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| broken(format!("reading entry {}: {e}", count + 1)))?;
        count += 1;
        let raw = entry.path().map_err(|e| broken(format!("entry {count}: unreadable path: {e}")))?.into_owned();
        let hostile = |reason: String| Error::Hostile {
            source_name: source.to_owned(),
            entry: raw.display().to_string(),
            reason,
        };
        if count > limits.max_entries {
            return Err(hostile(format!("more than {} entries", limits.max_entries)));
        }
        check_relative(&raw).map_err(&hostile)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink
        ) {
            continue;
        }
        let mode = entry.header().mode().map_err(|e| hostile(format!("unreadable mode: {e}")))?;
        if mode & 0o7000 != 0 {
            return Err(hostile(format!("mode {mode:o} sets setuid, setgid or sticky bits")));
        }
        let rel = normal(&raw);
        if rel.as_os_str().is_empty() {
            continue;
        }
        // A path under a link would write wherever the link points.
        for ancestor in rel.ancestors().skip(1) {
            if extracted.links.contains_key(&ancestor.display().to_string()) {
                return Err(hostile(format!("path goes through the link {}", ancestor.display())));
            }
        }
        match kind {
            tar::EntryType::Directory => {
                if let Some(target) = map.map(&rel, &mut extracted).map_err(&hostile)? {
                    writer.send(Op::Dir(dest.join(&target)))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(|e| hostile(format!("unreadable size: {e}")))?;
                if size > limits.max_file_bytes {
                    return Err(hostile(format!(
                        "{size} bytes exceeds the per-file limit of {}",
                        limits.max_file_bytes
                    )));
                }
                if extracted.total_bytes + size > limits.max_total_bytes {
                    return Err(hostile(format!(
                        "archive exceeds the total limit of {} bytes",
                        limits.max_total_bytes
                    )));
                }
                let Some(target) = map.map(&rel, &mut extracted).map_err(&hostile)? else {
                    continue;
                };
                let key = target.display().to_string();
                if extracted.files.contains_key(&key) || extracted.links.contains_key(&key) {
                    return Err(hostile("duplicate entry".to_owned()));
                }
                let file_mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                writer.send(Op::Create { path: dest.join(&target), mode: file_mode, key: key.clone() })?;
                copy_file(&mut entry, size, writer)?
                    .map_err(|error| broken(format!("entry {}: {error}", raw.display())))?;
                extracted.total_bytes += size;
                // The digest comes from the hashing thread when the extraction is done.
                extracted.files.insert(key, FileEntry { sha256: String::new(), size, mode: file_mode });
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| hostile(format!("unreadable link target: {e}")))?
                    .ok_or_else(|| hostile("link without target".to_owned()))?
                    .into_owned();
                let Some(at) = map.map(&rel, &mut extracted).map_err(&hostile)? else {
                    continue;
                };
                if !link_stays_inside(&at, &target) {
                    return Err(hostile(format!("link to {} points outside the bundle", target.display())));
                }
                let key = at.display().to_string();
                if extracted.files.contains_key(&key) || extracted.links.contains_key(&key) {
                    return Err(hostile("duplicate entry".to_owned()));
                }
                let link = target.display().to_string();
                writer.send(Op::Symlink { path: dest.join(&at), target })?;
                extracted.links.insert(key, link);
            }
            tar::EntryType::Link => return Err(hostile("hard links are not allowed in a bundle".to_owned())),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(hostile("device entries are not allowed in a bundle".to_owned()));
            }
            tar::EntryType::Fifo => return Err(hostile("FIFO entries are not allowed in a bundle".to_owned())),
            other => return Err(hostile(format!("unsupported entry type {other:?}"))),
        }
    }
    Ok(extracted)
}

/// Read one file's `size` bytes from `entry` and hand them to `writer`. The outer error is the
/// writer's; the inner one says the archive ended or broke inside the file.
fn copy_file(entry: &mut impl Read, size: u64, writer: &mut Writer) -> Result<io::Result<()>> {
    let mut read = 0u64;
    loop {
        let mut buffer = writer.buffer();
        let mut len = 0;
        while len < buffer.len() {
            match entry.read(&mut buffer[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Ok(Err(error)),
            }
        }
        if len == 0 {
            break;
        }
        read += len as u64;
        writer.send(Op::Data { buffer, len })?;
    }
    if read != size {
        return Ok(Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{read} of {size} bytes"))));
    }
    writer.send(Op::Close)?;
    Ok(Ok(()))
}

/// What the writer thread does, in the order the archive asks for it.
enum Op {
    Dir(PathBuf),
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// A new regular file, `key` in the bundle; the `Data` that follow are its bytes, up to
    /// `Close`.
    Create {
        path: PathBuf,
        mode: u32,
        key: String,
    },
    Data {
        buffer: Vec<u8>,
        len: usize,
    },
    Close,
}

/// Size of the chunks handed to the writer thread.
const CHUNK: usize = 256 * 1024;
/// Chunks waiting for the hashing thread, and for the writer: enough to ride out a stall of the
/// disk, little memory.
const QUEUED_CHUNKS: usize = 4;

/// The threads that hash each file and perform an extraction's filesystem work, in that order.
/// Chunk buffers come back to be filled again, so a large archive allocates a handful of them.
struct Writer {
    source: String,
    ops: Option<mpsc::SyncSender<Op>>,
    spare: mpsc::Receiver<Vec<u8>>,
    hasher: Option<JoinHandle<BTreeMap<String, String>>>,
    digests: Option<BTreeMap<String, String>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Writer {
    fn start(dest: &Path, source: &str) -> Result<Self> {
        let (ops, queued) = mpsc::sync_channel(QUEUED_CHUNKS);
        let (hashed, to_write) = mpsc::sync_channel(QUEUED_CHUNKS);
        let (returned, spare) = mpsc::sync_channel(2 * QUEUED_CHUNKS + 3);
        let starting = |e| Error::io("starting the extraction threads for", dest, e);
        let thread = std::thread::Builder::new()
            .name("stage-writer".to_owned())
            .spawn(move || perform(to_write, returned))
            .map_err(starting)?;
        // Should this fail, the writer ends: its queue closes with the hasher never started.
        let hasher = std::thread::Builder::new()
            .name("stage-hasher".to_owned())
            .spawn(move || hash(queued, hashed))
            .map_err(starting)?;
        Ok(Self {
            source: source.to_owned(),
            ops: Some(ops),
            spare,
            hasher: Some(hasher),
            digests: None,
            thread: Some(thread),
        })
    }

    fn buffer(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_else(|_| vec![0; CHUNK])
    }

    /// Queue `op`; if the writer has stopped, its error.
    fn send(&mut self, op: Op) -> Result<()> {
        let sent = self.ops.as_ref().is_some_and(|ops| ops.send(op).is_ok());
        if sent {
            return Ok(());
        }
        match self.join() {
            Err(error) => Err(error),
            Ok(()) => Err(Error::Archive {
                source_name: self.source.clone(),
                reason: "the extraction's writer thread stopped".to_owned(),
            }),
        }
    }

    /// Wait until everything queued is hashed and written (or the writer failed); the digest of
    /// every file by its key.
    fn finish(mut self) -> Result<BTreeMap<String, String>> {
        self.join()?;
        Ok(self.digests.take().unwrap_or_default())
    }

    /// Close the queue and wait for both threads, whatever happened to either.
    fn join(&mut self) -> Result<()> {
        self.ops = None;
        let panicked = |thread: &str| Error::Archive {
            source_name: self.source.clone(),
            reason: format!("the extraction's {thread} thread panicked"),
        };
        let hashed = match self.hasher.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(digests)) => {
                self.digests = Some(digests);
                Ok(())
            }
            Some(Err(_)) => Err(panicked("hashing")),
        };
        let written = match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(panicked("writer")),
        };
        written.and(hashed)
    }
}

impl Drop for Writer {
    /// Even when the extraction unwinds, nothing touches the staging directory afterwards.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

/// The hashing thread: the sha256 of each file's bytes, on their way to the writer. It stops
/// when the extraction is done or the writer has stopped.
fn hash(ops: mpsc::Receiver<Op>, writer: mpsc::SyncSender<Op>) -> BTreeMap<String, String> {
    let mut digests = BTreeMap::new();
    let mut file: Option<(String, Sha256)> = None;
    for op in ops {
        match &op {
            Op::Create { key, .. } => file = Some((key.clone(), Sha256::new())),
            Op::Data { buffer, len } => {
                if let Some((_, hasher)) = file.as_mut() {
                    hasher.update(&buffer[..*len]);
                }
            }
            Op::Close => {
                if let Some((key, hasher)) = file.take() {
                    digests.insert(key, hex::encode(hasher.finalize()));
                }
            }
            Op::Dir(_) | Op::Symlink { .. } => {}
        }
        if writer.send(op).is_err() {
            break;
        }
    }
    digests
}

/// The writer thread: perform `ops` until the extraction is done or something fails.
fn perform(ops: mpsc::Receiver<Op>, returned: mpsc::SyncSender<Vec<u8>>) -> Result<()> {
    struct Open {
        file: File,
        path: PathBuf,
        written: u64,
        flushed: u64,
    }
    let mut open: Option<Open> = None;
    for op in ops {
        match op {
            Op::Dir(path) => std::fs::create_dir_all(&path).map_err(|e| Error::io("creating", &path, e))?,
            Op::Symlink { path, target } => {
                create_parent(&path)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|e| Error::io("linking", &path, e))?;
            }
            Op::Create { path, mode, .. } => {
                create_parent(&path)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                    .open(&path)
                    .map_err(|e| Error::io("creating", &path, e))?;
                open = Some(Open { file, path, written: 0, flushed: 0 });
            }
            Op::Data { buffer, len } => {
                let Some(file) = open.as_mut() else { continue };
                file.file.write_all(&buffer[..len]).map_err(|e| Error::io("writing", &file.path, e))?;
                file.written += len as u64;
                if file.written - file.flushed >= WRITEBACK_CHUNK {
                    start_writeback(&file.file, file.flushed, file.written);
                    file.flushed = file.written;
                }
                // The extraction allocates a new one when none is back in time.
                let _ = returned.try_send(buffer);
            }
            Op::Close => {
                // Synced with the whole tree before publishing (sync_tree): the kernel writes back
                // meanwhile.
                if let Some(file) = open.take() {
                    start_writeback(&file.file, file.flushed, file.written);
                }
            }
        }
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    Ok(())
}

/// Written bytes are handed to the disk in chunks of this size as the extraction goes on.
const WRITEBACK_CHUNK: u64 = 8 << 20;

/// Start writing `from..to` of `file` back to disk now, without waiting: the extraction goes on
/// while the disk works, and the fsync before publishing finds little left to do. (On Linux,
/// `POSIX_FADV_DONTNEED` starts writeback of dirty pages; the pages stay cached until clean.)
/// Advice only: a filesystem that ignores it loses nothing but the overlap.
fn start_writeback(file: &File, from: u64, to: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else { return };
    if len > 0 {
        let _ = nix::fcntl::posix_fadvise(file, offset, len, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside() {
        assert!(link_stays_inside(Path::new("lib/libcuda.so"), Path::new("libcuda.so.1")));
        assert!(link_stays_inside(Path::new("lib64"), Path::new("lib")));
        assert!(link_stays_inside(Path::new("bin/x"), Path::new("../lib/y")));
        assert!(!link_stays_inside(Path::new("bin/x"), Path::new("../../etc/passwd")));
        assert!(!link_stays_inside(Path::new("lib64"), Path::new("/usr/lib")));
        // Through another link: with `lib/a -> .`, `lib/a/../..` is the bundle's parent.
        assert!(link_stays_inside(Path::new("lib/a"), Path::new(".")));
        assert!(!link_stays_inside(Path::new("lib/b"), Path::new("a/../..")));
        assert!(!link_stays_inside(Path::new("lib/c"), Path::new("../lib64/../..")));
        assert!(link_stays_inside(Path::new("lib/d"), Path::new("./../bin/./x")));
    }
}
