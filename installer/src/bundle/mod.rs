//! The bundle format shared by the node agent and the compiler instance: its manifest, the checks
//! every archive entry passes on extraction, packing a directory into a bundle, and what a kernel
//! module says about itself.

pub mod archive;
pub mod manifest;
pub mod modinfo;
pub mod pack;
pub mod signature;

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Whether what an archive held (`extracted`) is exactly what `manifest` lists: every file with
/// its sha256 and size, no file it does not list (besides `manifest.json`), the same links.
pub fn matches_manifest(extracted: &archive::Extracted, manifest: &manifest::Manifest, source: &str) -> Result<()> {
    let mut files = extracted.files.clone();
    files.remove(manifest::FILE_NAME);
    for (path, entry) in &manifest.files {
        let got = files.remove(path).ok_or_else(|| Error::Manifest {
            source_name: source.to_owned(),
            reason: format!("{path} is listed but not in the archive"),
        })?;
        if got.sha256 != entry.sha256 || got.size != entry.size {
            return Err(Error::Checksum {
                what: format!("{source}: {path}"),
                expected: entry.sha256.clone(),
                actual: got.sha256,
            });
        }
    }
    if let Some(extra) = files.keys().next() {
        return Err(Error::Manifest {
            source_name: source.to_owned(),
            reason: format!("{extra} is in the archive but not in the manifest"),
        });
    }
    if extracted.links != manifest.links {
        return Err(Error::Manifest {
            source_name: source.to_owned(),
            reason: "the archive's links differ from the manifest's".to_owned(),
        });
    }
    Ok(())
}

/// Check a packed bundle as a node will: extract it (every entry through the archive checks)
/// into a scratch directory beside it and compare it with its own manifest; nothing is kept.
/// Returns that manifest.
pub fn verify_packed(path: &Path) -> Result<manifest::Manifest> {
    let source = path.display().to_string();
    let inner = pack::read_inner_manifest(path)?;
    let scratch = path.with_file_name(format!(
        ".{}.verify-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("bundle"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| Error::io("creating", &scratch, e))?;
    let checked = (|| {
        let file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
        let decoder = zstd::Decoder::new(file)
            .map_err(|e| Error::Archive { source_name: source.clone(), reason: e.to_string() })?;
        let extracted =
            archive::extract(decoder, &scratch, &archive::PathMap::Bundle, archive::Limits::default(), &source)?;
        matches_manifest(&extracted, &inner, &source)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    checked.map(|()| inner)
}

/// Hash a file on disk (hex sha256).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}
