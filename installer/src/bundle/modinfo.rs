//! What a kernel module says about itself: `vermagic`, `depends` and `name` from its `.modinfo`
//! strings.

use std::path::Path;

use object::read::ReadCache;
use object::{Object, ObjectSection};

use crate::{Error, Result};

/// Fields of a module's `.modinfo` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub vermagic: String,
    pub depends: Vec<String>,
    pub name: Option<String>,
}

/// The largest `.modinfo` section read (the real ones are a few kilobytes).
const MAX_MODINFO_BYTES: u64 = 1 << 20;

/// Read `vermagic`, `depends` and `name` from a `.ko` file's `.modinfo` section: the ELF headers
/// and that section only, not the whole file (an `nvidia.ko` is tens of megabytes).
pub fn modinfo(path: &Path) -> Result<ModInfo> {
    let refused = |reason: String| Error::Module {
        module: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| refused(format!("not an ELF kernel module: {e}")))?;
    let section = elf
        .section_by_name(".modinfo")
        .ok_or_else(|| refused("no .modinfo section: not a kernel module".to_owned()))?;
    if section.size() > MAX_MODINFO_BYTES {
        return Err(refused(format!("a .modinfo section of {} bytes", section.size())));
    }
    let data = section.data().map_err(|e| refused(format!("reading its .modinfo section: {e}")))?;
    let field = |key: &str| -> Option<String> {
        data.split(|&b| b == 0)
            .find_map(|entry| entry.strip_prefix(key.as_bytes())?.strip_prefix(b"="))
            .map(|value| String::from_utf8_lossy(value).into_owned())
    };
    let vermagic = field("vermagic").ok_or_else(|| refused("no vermagic: not a kernel module".to_owned()))?;
    let depends = field("depends")
        .map(|d| d.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(ModInfo { vermagic, depends, name: field("name") })
}

/// Whether a module file carries an appended signature (`~Module signature appended~` at its end).
pub fn is_signed(path: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    const MARKER: &[u8] = b"~Module signature appended~\n";
    let mut file = std::fs::File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let len = file.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    if len < MARKER.len() as u64 {
        return Ok(false);
    }
    let mut tail = vec![0u8; MARKER.len()];
    file.seek(SeekFrom::End(-(MARKER.len() as i64)))
        .and_then(|_| file.read_exact(&mut tail))
        .map_err(|e| Error::io("reading", path, e))?;
    Ok(tail == MARKER)
}

/// The kernel release a vermagic string was built for (its first word).
pub fn vermagic_release(vermagic: &str) -> &str {
    vermagic.split_whitespace().next().unwrap_or_default()
}
