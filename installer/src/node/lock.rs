//! One installer at a time per host: an exclusive `flock` on `<driver root>/.lock`. The kernel
//! drops it when the process dies, so a killed installer never leaves the host locked.

use std::fs::{File, OpenOptions, TryLockError};
use std::time::{Duration, Instant};

use tracing::info;

use crate::{Error, Result};
use nvidia_contract::layout::Layout;

/// Held while it lives.
#[derive(Debug)]
pub struct HostLock {
    _file: File,
}

impl HostLock {
    /// Wait for the lock, logging once when another installer holds it.
    pub async fn acquire(layout: &Layout) -> Result<Self> {
        let path = layout.lock();
        std::fs::create_dir_all(layout.root()).map_err(|e| Error::io("creating", layout.root(), e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("opening the lock", &path, e))?;
        let started = Instant::now();
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    if told {
                        info!(waited_ms = started.elapsed().as_millis() as u64, "lock acquired");
                    }
                    return Ok(Self { _file: file });
                }
                Err(TryLockError::WouldBlock) => {
                    if !told {
                        info!(lock = %path.display(), "another installer is working on this host; waiting for it");
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(TryLockError::Error(e)) => return Err(Error::io("locking", &path, e)),
            }
        }
    }
}
