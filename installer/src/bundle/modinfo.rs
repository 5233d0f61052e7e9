//! What a kernel module says about itself: `vermagic`, `depends` and `name` from its `.modinfo`
//! strings.

use std::path::Path;

use crate::{Error, Result};

/// Fields of a module's `.modinfo` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub vermagic: String,
    pub depends: Vec<String>,
    pub name: Option<String>,
}

/// Read `vermagic`, `depends` and `name` from a `.ko` file's modinfo strings.
pub fn modinfo(path: &Path) -> Result<ModInfo> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    let field = |key: &str| -> Option<String> {
        let needle = format!("{key}=");
        let needle = needle.as_bytes();
        let mut from = 0;
        while let Some(at) = find(&bytes[from..], needle).map(|i| i + from) {
            if at == 0 || bytes[at - 1] == 0 {
                let start = at + needle.len();
                let end = bytes[start..].iter().position(|&b| b == 0).map_or(bytes.len(), |i| start + i);
                return Some(String::from_utf8_lossy(&bytes[start..end]).into_owned());
            }
            from = at + 1;
        }
        None
    };
    let vermagic = field("vermagic").ok_or_else(|| Error::Module {
        module: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        path: path.to_owned(),
        reason: "no vermagic: not a kernel module".to_owned(),
    })?;
    let depends = field("depends")
        .map(|d| d.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(ModInfo { vermagic, depends, name: field("name") })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
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
