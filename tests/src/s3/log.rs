//! The log of requests the server received, for tests to read.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hyper::Method;

use super::faults::Fault;

/// One request as the server saw and answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Numbers the connections in the order they were accepted, from 1.
    pub connection: u64,
    pub method: Method,
    /// The percent-decoded path, `/bucket/key` for path-style requests.
    pub path: String,
    pub query: Option<String>,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    /// When the request arrived.
    pub received: std::time::Instant,
    /// The `User-Agent` header (the installer names its node in it: `app/<node>`).
    pub user_agent: Option<String>,
    /// The status sent; `None` while the response is not ready or when the connection was reset.
    pub status: Option<u16>,
    /// Response body bytes handed to the connection so far.
    pub bytes_sent: u64,
    pub fault: Option<Fault>,
    /// The bandwidth cap in bytes per second that paced this response.
    pub bandwidth_limit: Option<u64>,
}

/// Entries are shared with the response bodies, which keep counting bytes while they stream.
pub(crate) type SharedEntry = Arc<Mutex<LogEntry>>;

pub(crate) fn lock(entry: &SharedEntry) -> MutexGuard<'_, LogEntry> {
    entry.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The request log, shared by the server and the tests.
#[derive(Debug, Clone, Default)]
pub struct RequestLog {
    entries: Arc<Mutex<Vec<SharedEntry>>>,
}

impl RequestLog {
    /// A snapshot of every entry since the start or the last [`clear`](Self::clear), in arrival order.
    pub fn entries(&self) -> Vec<LogEntry> {
        self.lock().iter().map(|entry| lock(entry).clone()).collect()
    }

    /// The entries with `method` whose path contains `key_contains`.
    pub fn matching(&self, method: &Method, key_contains: &str) -> Vec<LogEntry> {
        self.entries().into_iter().filter(|entry| entry.method == method && entry.path.contains(key_contains)).collect()
    }

    /// Response body bytes sent over all entries.
    pub fn bytes_sent(&self) -> u64 {
        self.lock().iter().map(|entry| lock(entry).bytes_sent).sum()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn push(&self, entry: LogEntry) -> SharedEntry {
        let entry = Arc::new(Mutex::new(entry));
        self.lock().push(Arc::clone(&entry));
        entry
    }

    fn lock(&self) -> MutexGuard<'_, Vec<SharedEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
