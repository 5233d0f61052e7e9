//! The bundle format shared by the node agent and the compiler instance: its manifest, the checks
//! every archive entry passes on extraction, packing a directory into a bundle, and what a kernel
//! module says about itself.

pub mod archive;
pub mod manifest;
pub mod modinfo;
pub mod pack;

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Hash a file on disk (hex sha256).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io("reading", path, e))?;
    Ok(hex::encode(hasher.finalize()))
}
