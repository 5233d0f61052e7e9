//! `stage`: download, verify and extract a bundle into the host cache, then switch `current`.
//!
//! One streaming pipeline: parallel ranged GETs (in order, bounded memory) → sha256 of the
//! archive → zstd or gzip → tar extraction into a staging directory on the cache's filesystem →
//! fsync → verification against the manifest → one rename into `cache/<kernel>/<driver>/` → an
//! atomic switch of `current`. A crash at any moment leaves the previous state or the new complete
//! bundle; the next run removes staging leftovers.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::bundle::archive::{self, Limits, PathMap};
use crate::bundle::manifest::{self, ArchiveEntry, Manifest, Module};
use crate::bundle::signature::{self, KeyId, PublicKey};
use crate::node::lock::HostLock;
use crate::node::{cache, ready};
use crate::s3::{self, BundleKeys, S3Options, Transfer};
use crate::{Error, Result};
use crate::{bundle, durable};
use nvidia_contract::layout::Layout;

/// What to stage.
#[derive(Debug, Clone)]
pub struct StageRequest {
    pub gardenlinux_version: String,
    pub kernel_release: String,
    pub driver_version: String,
    pub s3: S3Options,
    pub transfer: Transfer,
    pub limits: Limits,
    /// The kernel-module flavors that can drive this node's GPUs, best first
    /// ([`gpus::flavors_for`](crate::node::gpus::flavors_for)); `None`: any.
    pub flavors: Option<Vec<String>>,
    /// Whose signatures a bundle must carry; `None`: signatures are not checked.
    pub trust: Option<Trust>,
}

/// The keys bundles must be signed with ([`signature`]).
#[derive(Debug, Clone)]
pub struct Trust {
    pub keys: Vec<PublicKey>,
    /// Accept bundles without a signature (and the original system's, which have none).
    pub allow_unsigned: bool,
}

/// The signature file kept beside a staged bundle's manifest.
pub const SIGNATURE_FILE: &str = "manifest.json.sig";

/// What staging did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub bundle: PathBuf,
    pub manifest: Manifest,
    /// `None` for a cache hit, else the key it came from.
    pub downloaded_from: Option<String>,
    /// `current` now points at this bundle. When false, `held_back_by` names the ready driver.
    pub current: bool,
    pub held_back_by: Option<String>,
    /// The trusted key whose signature the bundle carries.
    pub signed_by: Option<KeyId>,
    /// How long staging took (download, verify, extract, or the cache check of a hit).
    pub duration: Duration,
}

/// Stage the bundle, holding the host lock throughout.
pub async fn stage(layout: &Layout, request: &StageRequest) -> Result<Staged> {
    let _lock = HostLock::acquire(layout).await?;
    stage_locked(layout, request).await
}

/// Stage while the caller holds the host lock.
pub async fn stage_locked(layout: &Layout, request: &StageRequest) -> Result<Staged> {
    let started = Instant::now();
    clean_leftovers(layout)?;
    let bundle = layout.bundle(&request.kernel_release, &request.driver_version);
    let (manifest, downloaded_from, signed_by) = match reuse_cached(&bundle, request).await {
        Ok((manifest, signed_by)) => {
            info!(bundle = %bundle.display(), "cache hit: bundle already staged and verified");
            (manifest, None, signed_by)
        }
        Err(reason) => {
            if std::fs::symlink_metadata(&bundle).is_ok() {
                warn!(bundle = %bundle.display(), %reason, "cached bundle is incomplete or modified; staging it again");
                remove_bundle(&bundle)?;
            }
            let (manifest, key, signed_by) = download_and_publish(layout, request, &bundle).await?;
            (manifest, Some(key), signed_by)
        }
    };
    let (current, held_back_by) = switch_current(layout, request)?;
    info!(
        bundle = %bundle.display(),
        current,
        held_back_by = held_back_by.as_deref().unwrap_or(""),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "staged"
    );
    Ok(Staged { bundle, manifest, downloaded_from, current, held_back_by, signed_by, duration: started.elapsed() })
}

/// The cached bundle, when it can be used again: whole ([`cache::cached`]: checked once), of a
/// flavor that drives this node's GPUs, and signed as the trusted keys ask. A whole bundle whose
/// kept signature no longer satisfies them (keys turned on, or rotated) is checked against the
/// bucket's signature before anything is replaced: its bytes may well be the signed ones. `Err`
/// says why the bundle must be staged again.
async fn reuse_cached(bundle: &Path, request: &StageRequest) -> std::result::Result<(Manifest, Option<KeyId>), String> {
    let manifest = cache::cached(bundle)?;
    if !takes(request, &manifest.flavor) {
        return Err(format!("it holds the {} modules, which cannot drive this node's GPUs", manifest.flavor));
    }
    match cached_signature(bundle, request) {
        Ok(signed_by) => Ok((manifest, signed_by)),
        Err(reason) => match refresh_signature(bundle, request, &manifest.flavor).await {
            Ok(Some(id)) => Ok((manifest, Some(id))),
            Ok(None) => Err(reason),
            Err(error) => Err(format!("{reason}; fetching the bucket's signature: {error}")),
        },
    }
}

/// The bucket's signature for a whole cached bundle's manifest: when it verifies over the cached
/// bytes, it is kept beside them and the bundle is used as it is.
async fn refresh_signature(bundle: &Path, request: &StageRequest, flavor: &str) -> Result<Option<KeyId>> {
    let Some(trust) = &request.trust else { return Ok(None) };
    let path = bundle.join(manifest::FILE_NAME);
    let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    let (gl, kernel, driver) = (&request.gardenlinux_version, &request.kernel_release, &request.driver_version);
    let client = s3::client_paced(&request.s3, &request.transfer).await?;
    for keys in [BundleKeys::flavored(gl, kernel, driver, flavor)?, BundleKeys::new(gl, kernel, driver)?] {
        let key = signature::key_of(&keys.manifest);
        let Some(found) = s3::get_small(&client, &request.s3.bucket, &key, 64 << 10, &request.transfer).await? else {
            continue;
        };
        let text = String::from_utf8_lossy(&found).into_owned();
        if let Ok(id) = signature::verify(&trust.keys, &text, &bytes) {
            durable::write_atomic(&bundle.join(SIGNATURE_FILE), text.as_bytes())?;
            info!(bundle = %bundle.display(), signed_by = %id, "the cached bundle carries the bucket's signature now");
            return Ok(Some(id));
        }
    }
    Ok(None)
}

/// With trusted keys, a cached bundle is used again only when the signature kept beside its
/// manifest still verifies (or unsigned bundles are allowed).
fn cached_signature(bundle: &Path, request: &StageRequest) -> std::result::Result<Option<KeyId>, String> {
    let Some(trust) = &request.trust else { return Ok(None) };
    let manifest = std::fs::read(bundle.join(manifest::FILE_NAME)).map_err(|e| e.to_string())?;
    match std::fs::read_to_string(bundle.join(SIGNATURE_FILE)) {
        Ok(text) => signature::verify(&trust.keys, &text, &manifest).map(Some),
        Err(_) if trust.allow_unsigned => Ok(None),
        Err(_) => Err("it carries no signature, and trusted keys are configured".to_owned()),
    }
}

/// Remove a cached bundle that failed its check (a file or link in its place included).
fn remove_bundle(bundle: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(bundle).map_err(|e| Error::io("removing", bundle, e))?;
    let removed = if meta.is_dir() { std::fs::remove_dir_all(bundle) } else { std::fs::remove_file(bundle) };
    removed.map_err(|e| Error::io("removing", bundle, e))
}

/// Remove what a killed run left: staging directories and half-made links.
fn clean_leftovers(layout: &Layout) -> Result<()> {
    let staging = layout.staging();
    if staging.exists() {
        for entry in std::fs::read_dir(&staging).map_err(|e| Error::io("reading", &staging, e))? {
            let path = entry.map_err(|e| Error::io("reading", &staging, e))?.path();
            info!(path = %path.display(), "removing staging leftover");
            std::fs::remove_dir_all(&path).map_err(|e| Error::io("removing", &path, e))?;
        }
    }
    for entry in std::fs::read_dir(layout.root()).map_err(|e| Error::io("reading", layout.root(), e))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".current.tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Where the bundle is in the bucket, and what it should be.
struct Located {
    key: String,
    size: u64,
    etag: Option<String>,
    expected: Option<Manifest>,
    map: PathMap,
    /// The manifest's bytes as stored, and their signature file, kept beside the staged bundle.
    raw_manifest: Option<Vec<u8>>,
    signature: Option<String>,
    signed_by: Option<KeyId>,
}

/// Whether `flavor` is one `request` takes.
fn takes(request: &StageRequest, flavor: &str) -> bool {
    // A bundle mapped from the original system's layout holds its proprietary modules.
    let flavor = if flavor == "legacy" { "proprietary" } else { flavor };
    request.flavors.as_ref().is_none_or(|flavors| flavors.iter().any(|f| f == flavor))
}

/// Find the bundle: the key of each acceptable flavor in order, then the plain key (whatever
/// flavor it holds, when acceptable), then the original system's key (proprietary modules).
async fn locate(client: &aws_sdk_s3::Client, request: &StageRequest) -> Result<Located> {
    let bucket = &request.s3.bucket;
    let (gl, kernel, driver) = (&request.gardenlinux_version, &request.kernel_release, &request.driver_version);
    let plain = BundleKeys::new(gl, kernel, driver)?;
    let mut tried = Vec::new();
    let mut unfit = Vec::new();
    for flavor in request.flavors.iter().flatten() {
        let keys = BundleKeys::flavored(gl, kernel, driver, flavor)?;
        if let Some(located) = locate_keys(client, request, &keys, Some(flavor)).await? {
            return Ok(located);
        }
        tried.push(keys.manifest);
    }
    match locate_keys(client, request, &plain, None).await? {
        Some(located) => {
            let flavor = located.expected.as_ref().map(|m| m.flavor.clone()).unwrap_or_default();
            if takes(request, &flavor) {
                return Ok(located);
            }
            unfit.push(format!("{} holds the {flavor} modules", plain.manifest));
        }
        None => tried.extend([plain.manifest.clone(), plain.archive.clone()]),
    }
    if let Some((size, etag)) = s3::head(client, bucket, &plain.legacy, &request.transfer).await? {
        // The original system built the .run's default, the proprietary modules below the 560 branch.
        if request.trust.as_ref().is_some_and(|t| !t.allow_unsigned) {
            return Err(Error::Signature {
                what: format!("s3://{bucket}/{}", plain.legacy),
                reason: "the original system's bundles carry no signature, and trusted keys are configured: publish a signed bundle, or allow unsigned ones (nvidiaInstaller.allowUnsigned)".to_owned(),
            });
        }
        if takes(request, "proprietary") {
            warn!(bucket, key = %plain.legacy, "using the original system's bundle layout: it has no manifest, so only its integrity in transit is checked");
            return Ok(Located {
                key: plain.legacy,
                size,
                etag,
                expected: None,
                map: PathMap::Legacy { kernel: request.kernel_release.clone() },
                raw_manifest: None,
                signature: None,
                signed_by: None,
            });
        }
        unfit.push(format!("{} holds the original system's (proprietary) modules", plain.legacy));
    } else {
        tried.push(plain.legacy);
    }
    if !unfit.is_empty() {
        return Err(Error::Flavor {
            reason: format!(
                "this node's GPUs need the {} kernel modules of driver {driver}, but in bucket {bucket} {}; tried {}",
                request.flavors.iter().flatten().cloned().collect::<Vec<_>>().join(" or "),
                unfit.join(", "),
                tried.join(", ")
            ),
        });
    }
    Err(Error::NotFound { bucket: bucket.clone(), tried })
}

/// The bundle under `keys` (manifest and archive), checked against the request; `None` when
/// there is no manifest there.
async fn locate_keys(
    client: &aws_sdk_s3::Client,
    request: &StageRequest,
    keys: &BundleKeys,
    flavor: Option<&str>,
) -> Result<Option<Located>> {
    let bucket = &request.s3.bucket;
    let transfer = &request.transfer;
    if let Some(bytes) = s3::get_small(client, bucket, &keys.manifest, 16 << 20, transfer).await? {
        let source = format!("s3://{bucket}/{}", keys.manifest);
        // Before anything else is read: whose manifest this is.
        let (signature, signed_by) = check_signature(client, request, &keys.manifest, &bytes).await?;
        let expected = Manifest::parse(&bytes, &source)?;
        if expected.driver_version != request.driver_version || expected.kernel_release != request.kernel_release {
            return Err(Error::Manifest {
                source_name: source,
                reason: format!(
                    "describes driver {} for kernel {}, not driver {} for kernel {}",
                    expected.driver_version, expected.kernel_release, request.driver_version, request.kernel_release
                ),
            });
        }
        // A manifest (signed or not) is taken only where it belongs: its flavor's keys, its
        // Garden Linux version's prefix.
        if let Some(flavor) = flavor.filter(|f| *f != expected.flavor) {
            return Err(Error::Manifest {
                source_name: source,
                reason: format!("holds the {} modules under the {flavor} keys", expected.flavor),
            });
        }
        if let Some(packed_for) = expected.gardenlinux_version.as_ref().filter(|v| **v != request.gardenlinux_version) {
            return Err(Error::Manifest {
                source_name: source,
                reason: format!("was packed for Garden Linux {packed_for}, not {}", request.gardenlinux_version),
            });
        }
        let Some(archive) = &expected.archive else {
            return Err(Error::Manifest { source_name: source, reason: "has no archive digest".to_owned() });
        };
        let (size, etag) = s3::head(client, bucket, &keys.archive, transfer).await?.ok_or_else(|| {
            Error::s3("HEAD", bucket, &keys.archive, "the manifest exists but the archive does not".into())
        })?;
        if size != archive.size {
            return Err(Error::s3(
                "HEAD",
                bucket,
                &keys.archive,
                format!("{size} bytes, the manifest says {}", archive.size),
            ));
        }
        return Ok(Some(Located {
            key: keys.archive.clone(),
            size,
            etag,
            expected: Some(expected),
            map: PathMap::Bundle,
            raw_manifest: Some(bytes),
            signature,
            signed_by,
        }));
    }
    Ok(None)
}

/// With trusted keys: the manifest's signature (`<manifest key>.sig`) must verify with one of them,
/// or be absent where unsigned bundles are allowed. Returns the signature file and its key.
async fn check_signature(
    client: &aws_sdk_s3::Client,
    request: &StageRequest,
    manifest_key: &str,
    manifest: &[u8],
) -> Result<(Option<String>, Option<KeyId>)> {
    let Some(trust) = &request.trust else { return Ok((None, None)) };
    let bucket = &request.s3.bucket;
    let key = signature::key_of(manifest_key);
    let refuse = |reason: String| Error::Signature { what: format!("s3://{bucket}/{manifest_key}"), reason };
    match s3::get_small(client, bucket, &key, 64 << 10, &request.transfer).await? {
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let id = signature::verify(&trust.keys, &text, manifest).map_err(refuse)?;
            info!(bucket, key = manifest_key, signed_by = %id, "manifest signature verified");
            Ok((Some(text), Some(id)))
        }
        None if trust.allow_unsigned => {
            warn!(
                bucket,
                key = manifest_key,
                "the bundle is not signed; using it because unsigned bundles are allowed"
            );
            Ok((None, None))
        }
        None => Err(refuse(format!("not signed (no {key}), and trusted keys are configured"))),
    }
}

async fn download_and_publish(
    layout: &Layout,
    request: &StageRequest,
    bundle: &Path,
) -> Result<(Manifest, String, Option<KeyId>)> {
    request.transfer.jitter_start().await;
    let client = s3::client_paced(&request.s3, &request.transfer).await?;
    let located = locate(&client, request).await?;
    let bucket = request.s3.bucket.clone();
    let source = format!("s3://{bucket}/{}", located.key);
    info!(source = %source, bytes = located.size, "downloading bundle");

    let staging = new_staging(layout, request)?;
    let (key, size, etag) = (&located.key, located.size, located.etag.as_deref());
    let feed = |sender, buffers| async move {
        s3::download(&client, &request.s3.bucket, key, size, etag, &request.transfer, sender, &buffers).await
    };
    let started = std::time::Instant::now();
    let result = pipeline(feed, request.limits, &located, &staging, &source)
        .await
        .and_then(|(extracted, sha256)| verify_and_complete(request, &located, &staging, extracted, sha256, &source));
    let extracted_ms = started.elapsed().as_millis() as u64;
    let manifest = publish_staged(layout, &staging, bundle, result)?;
    info!(
        bundle = %bundle.display(),
        extracted_ms,
        synced_ms = started.elapsed().as_millis() as u64 - extracted_ms,
        "downloaded, verified and published"
    );
    Ok((manifest, located.key, located.signed_by))
}

fn new_staging(layout: &Layout, request: &StageRequest) -> Result<PathBuf> {
    let staging =
        layout.staging().join(format!("{}-{}-{:08x}", request.driver_version, std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&staging).map_err(|e| Error::io("creating", &staging, e))?;
    Ok(staging)
}

/// Move a verified staging directory into the cache with one rename (or clean it up on failure).
fn publish_staged(layout: &Layout, staging: &Path, bundle: &Path, verified: Result<Manifest>) -> Result<Manifest> {
    let manifest = match verified {
        Ok(manifest) => manifest,
        Err(error) => {
            let _ = std::fs::remove_dir_all(staging);
            return Err(error);
        }
    };
    durable::sync_tree(staging)?;
    let parent = bundle
        .parent()
        .ok_or_else(|| Error::io("publishing into", bundle, std::io::Error::other("no parent directory")))?;
    std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    std::fs::rename(staging, bundle).map_err(|e| Error::io("publishing into", bundle, e))?;
    durable::sync_dir(parent)?;
    durable::sync_dir(&layout.staging())?;
    Ok(manifest)
}

/// Stage a bundle archive built on this host (`install --allow-compilation`), with the same
/// extraction, verification and switch as a download. The caller holds the host lock.
pub async fn stage_archive_locked(layout: &Layout, request: &StageRequest, archive_path: &Path) -> Result<Staged> {
    let started = Instant::now();
    clean_leftovers(layout)?;
    let inner = crate::bundle::pack::read_inner_manifest(archive_path)?;
    if inner.driver_version != request.driver_version || inner.kernel_release != request.kernel_release {
        return Err(Error::Manifest {
            source_name: archive_path.display().to_string(),
            reason: format!("was built for driver {} and kernel {}", inner.driver_version, inner.kernel_release),
        });
    }
    let size = std::fs::metadata(archive_path).map_err(|e| Error::io("reading", archive_path, e))?.len();
    let expected =
        Manifest { archive: Some(ArchiveEntry { sha256: bundle::sha256_file(archive_path)?, size }), ..inner };
    // Built on this node (allowCompilation): its own work, not a bucket's.
    let located = Located {
        key: archive_path.display().to_string(),
        size,
        etag: None,
        expected: Some(expected),
        map: PathMap::Bundle,
        raw_manifest: None,
        signature: None,
        signed_by: None,
    };
    let source = archive_path.display().to_string();
    let bundle = layout.bundle(&request.kernel_release, &request.driver_version);
    if bundle.exists() {
        std::fs::remove_dir_all(&bundle).map_err(|e| Error::io("removing", &bundle, e))?;
    }
    let staging = new_staging(layout, request)?;
    let path = archive_path.to_owned();
    let feed = |sender: mpsc::Sender<Bytes>, buffers: s3::PartBuffers| async move {
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| Error::io("reading", &path, e))?;
        let mut sent = 0u64;
        loop {
            let mut buffer = buffers.take();
            buffer.clear();
            buffer.reserve(1 << 20);
            let n = tokio::io::AsyncReadExt::read_buf(&mut file, &mut buffer)
                .await
                .map_err(|e| Error::io("reading", &path, e))?;
            if n == 0 || sender.send(buffer.freeze()).await.is_err() {
                return Ok(sent);
            }
            sent += n as u64;
        }
    };
    let result = pipeline(feed, request.limits, &located, &staging, &source)
        .await
        .and_then(|(extracted, sha256)| verify_and_complete(request, &located, &staging, extracted, sha256, &source));
    let manifest = publish_staged(layout, &staging, &bundle, result)?;
    let (current, held_back_by) = switch_current(layout, request)?;
    Ok(Staged {
        bundle,
        manifest,
        downloaded_from: None,
        current,
        held_back_by,
        signed_by: None,
        duration: started.elapsed(),
    })
}

/// Reads the downloaded parts in order, in place (a `BufRead`: the decoder reads the parts'
/// bytes without another copy), hashes what is read as it goes (the archive's digest), and hands
/// each part's memory back when done with it.
struct PartReader {
    parts: mpsc::Receiver<Bytes>,
    buffers: s3::PartBuffers,
    current: Bytes,
    at: usize,
    bytes: u64,
    digest: Sha256,
}

impl PartReader {
    fn new(parts: mpsc::Receiver<Bytes>, buffers: s3::PartBuffers) -> Self {
        Self { parts, buffers, current: Bytes::new(), at: 0, bytes: 0, digest: Sha256::new() }
    }
}

impl std::io::BufRead for PartReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.at == self.current.len() {
            let Some(next) = self.parts.blocking_recv() else { return Ok(&[]) };
            self.buffers.give_back(std::mem::replace(&mut self.current, next));
            self.at = 0;
        }
        Ok(&self.current[self.at..])
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.current.len() - self.at);
        self.digest.update(&self.current[self.at..self.at + n]);
        self.at += n;
        self.bytes += n as u64;
    }
}

impl Read for PartReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let available = std::io::BufRead::fill_buf(self)?;
        let n = out.len().min(available.len());
        out[..n].copy_from_slice(&available[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

async fn pipeline<F, Fut>(
    feed: F,
    limits: Limits,
    located: &Located,
    staging: &Path,
    source: &str,
) -> Result<(archive::Extracted, String)>
where
    F: FnOnce(mpsc::Sender<Bytes>, s3::PartBuffers) -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    // feed -> extraction, which hashes the archive as its decoder reads it. Parts waiting here
    // are few: the feed keeps its own (bounded) parts in flight.
    let (sender, receiver) = mpsc::channel::<Bytes>(1);
    let map = located.map.clone();
    let dest = staging.to_owned();
    let source_name = source.to_owned();
    let gzip = located.key.ends_with(".gz");
    let buffers = s3::PartBuffers::default();
    let parts = buffers.clone();
    let extraction = tokio::task::spawn_blocking(move || -> Result<(archive::Extracted, u64, String)> {
        let mut reader = PartReader::new(receiver, parts);
        let broken = |e: std::io::Error| Error::Archive { source_name: source_name.clone(), reason: e.to_string() };
        let extracted = if gzip {
            let mut decoder = flate2::bufread::GzDecoder::new(&mut reader);
            let extracted = archive::extract(&mut decoder, &dest, &map, limits, &source_name)?;
            std::io::copy(&mut decoder, &mut std::io::sink()).map_err(broken)?;
            extracted
        } else {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(&mut reader).map_err(broken)?;
            let extracted = archive::extract(&mut decoder, &dest, &map, limits, &source_name)?;
            std::io::copy(&mut decoder, &mut std::io::sink()).map_err(broken)?;
            extracted
        };
        // Whatever follows the compressed stream still counts towards the digest.
        std::io::copy(&mut reader, &mut std::io::sink()).map_err(broken)?;
        Ok((extracted, reader.bytes, hex::encode(reader.digest.finalize())))
    });
    let downloaded = feed(sender, buffers).await;
    let extracted =
        extraction.await.map_err(|e| Error::Archive { source_name: source.to_owned(), reason: e.to_string() })?;
    // A download failure explains a broken stream better than the decoder's complaint.
    let downloaded = downloaded?;
    let (extracted, read, digest) = extracted?;
    if downloaded != located.size || read != located.size {
        return Err(Error::Archive {
            source_name: source.to_owned(),
            reason: format!("read {read} of {} bytes", located.size),
        });
    }
    Ok((extracted, digest))
}

/// Check the extraction against the manifest (or build one for a legacy archive), and write the
/// bundle's `manifest.json` and `lib64` link.
fn verify_and_complete(
    request: &StageRequest,
    located: &Located,
    staging: &Path,
    extracted: archive::Extracted,
    sha256: String,
    source: &str,
) -> Result<Manifest> {
    let manifest = match &located.expected {
        Some(expected) => {
            let archive = expected.archive.as_ref().ok_or_else(|| Error::Manifest {
                source_name: source.to_owned(),
                reason: "has no archive digest".to_owned(),
            })?;
            if archive.sha256 != sha256 {
                return Err(Error::Checksum {
                    what: source.to_owned(),
                    expected: archive.sha256.clone(),
                    actual: sha256,
                });
            }
            let inner = staging.join(manifest::FILE_NAME);
            let inside = Manifest::read(&inner)?;
            if inside != expected.without_archive() {
                return Err(Error::Manifest {
                    source_name: source.to_owned(),
                    reason: "the manifest inside the archive differs from the one beside it in the bucket".to_owned(),
                });
            }
            bundle::matches_manifest(&extracted, expected, source)?;
            expected.clone()
        }
        None => legacy_manifest(request, staging, extracted, sha256, located.size, source)?,
    };
    let lib64 = staging.join("lib64");
    if !lib64.exists() && staging.join("lib").is_dir() {
        std::os::unix::fs::symlink("lib", &lib64).map_err(|e| Error::io("linking", &lib64, e))?;
    }
    // The manifest as it was stored (and signed), so that a cache hit can check its signature.
    let bytes = located.raw_manifest.clone().unwrap_or_else(|| manifest.to_json());
    durable::write_atomic(&staging.join(manifest::FILE_NAME), &bytes)?;
    if let Some(signature) = &located.signature {
        durable::write_atomic(&staging.join(SIGNATURE_FILE), signature.as_bytes())?;
    }
    Ok(manifest)
}

fn legacy_manifest(
    request: &StageRequest,
    staging: &Path,
    extracted: archive::Extracted,
    sha256: String,
    size: u64,
    source: &str,
) -> Result<Manifest> {
    let mut modules = Vec::new();
    for (path, _) in extracted.files.iter().filter(|(p, _)| p.starts_with("modules/")) {
        let info = crate::bundle::modinfo::modinfo(&staging.join(path))?;
        let name = Path::new(path).file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
        modules.push(Module { name, path: path.clone(), vermagic: info.vermagic, depends: info.depends });
    }
    if modules.is_empty() {
        let seen: Vec<&String> = extracted.module_kernels.iter().collect();
        return Err(Error::Archive {
            source_name: source.to_owned(),
            reason: format!("has no modules for kernel {} (it has lib/modules/ for {seen:?})", request.kernel_release),
        });
    }
    Ok(Manifest {
        schema_version: manifest::SCHEMA_VERSION,
        driver_version: request.driver_version.clone(),
        kernel_release: request.kernel_release.clone(),
        flavor: "legacy".to_owned(),
        gardenlinux_version: Some(request.gardenlinux_version.clone()),
        modules,
        files: extracted.files,
        links: extracted.links.into_iter().collect::<BTreeMap<_, _>>(),
        archive: Some(ArchiveEntry { sha256, size }),
    })
}

/// Point `current` at the requested bundle, unless another driver version is marked ready on
/// this boot: loaded modules can't be swapped under running pods.
fn switch_current(layout: &Layout, request: &StageRequest) -> Result<(bool, Option<String>)> {
    if let ready::Readiness::Ready(marker) = ready::check(layout, None)
        && (marker.driver_version != request.driver_version || marker.kernel_release != request.kernel_release)
    {
        return Ok((false, Some(marker.driver_version)));
    }
    let target = Layout::bundle_relative(&request.kernel_release, &request.driver_version);
    let current = layout.current();
    if std::fs::read_link(&current).ok().as_deref() == Some(target.as_path()) {
        return Ok((true, None));
    }
    let tmp = layout.root().join(format!(".current.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).map_err(|e| Error::io("linking", &tmp, e))?;
    std::fs::rename(&tmp, &current).map_err(|e| Error::io("switching", &current, e))?;
    durable::sync_dir(layout.root())?;
    Ok((true, None))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn reader(parts: &[Bytes]) -> (PartReader, s3::PartBuffers) {
        let (sender, receiver) = mpsc::channel(parts.len().max(1));
        for part in parts {
            sender.try_send(part.clone()).expect("queued");
        }
        let buffers = s3::PartBuffers::default();
        (PartReader::new(receiver, buffers.clone()), buffers)
    }

    #[test]
    fn parts_read_as_one_stream_and_their_memory_comes_back() {
        let first = Bytes::from(b"abc".to_vec());
        let address = first.as_ptr();
        let (mut reader, buffers) = reader(&[first, Bytes::new(), Bytes::from(b"defgh".to_vec())]);
        let mut out = String::new();
        reader.read_to_string(&mut out).expect("read");
        assert_eq!(out, "abcdefgh");
        assert_eq!(reader.bytes, 8);
        assert_eq!(hex::encode(reader.digest.finalize()), hex::encode(Sha256::digest(b"abcdefgh")));
        let mut taken: Vec<_> = std::iter::repeat_with(|| buffers.take()).take(3).collect();
        taken.retain(|b| b.capacity() >= 3);
        assert_eq!(taken.len(), 1, "the first part came back; the last is still being read");
        assert_eq!(taken[0].as_ptr(), address);
    }

    #[test]
    fn the_decoder_reads_a_stream_split_anywhere_in_place() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let compressed = zstd::encode_all(&data[..], 3).expect("compress");
        let parts: Vec<Bytes> = compressed.chunks(777).map(Bytes::copy_from_slice).collect();
        let (mut reader, _) = reader(&parts);
        let mut decoder = zstd::stream::read::Decoder::with_buffer(&mut reader).expect("decoder");
        let mut out = Vec::new();
        decoder.read_to_end(&mut out).expect("decode");
        assert_eq!(out, data);
        assert_eq!(reader.bytes, compressed.len() as u64);
        assert_eq!(reader.digest.finalize().as_slice(), Sha256::digest(&compressed).as_slice());
    }
}
