//! What one client can make the server hold, bounded by configuration.
//!
//! - connections: at most [`Limits::max_connections`] at once; a new connection beyond that takes
//!   the place of the one that has had nothing in flight the longest (a connection that never
//!   finished its handshake or request head first), so slow clients cannot lock others out;
//! - time: a TLS handshake within [`Limits::handshake_timeout`], an HTTP/1 request head within
//!   [`Limits::header_timeout`], a whole request body within [`Limits::body_timeout`], and a
//!   connection with nothing in flight for [`Limits::idle_timeout`] is closed;
//! - HTTP/2: at most [`Limits::max_streams`] concurrent streams per connection, with small flow
//!   control windows (a client cannot push more than they allow before the server reads);
//! - request heads: an HTTP/2 header list of at most [`HEADER_BYTES`], an HTTP/1 read buffer (head
//!   and body pieces) of at most [`HTTP1_BUFFER_BYTES`], so that every connection's fixed cost is
//!   known;
//! - memory: request bodies are buffered as they arrive against one budget for the whole server
//!   ([`Limits::max_buffered_bytes`]), one per client address ([`Limits::max_peer_bytes`]) and
//!   one per connection ([`Limits::max_connection_bytes`]); a request that would exceed any is
//!   answered 503 at once, the rest of its bytes unread. A declared `Content-Length` alone holds
//!   nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The server's bounds (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_streams: u32,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_buffered_bytes: usize,
    pub max_peer_bytes: usize,
    pub max_connection_bytes: usize,
}

/// The largest HTTP/2 header list.
pub const HEADER_BYTES: usize = 16 * 1024;
/// The HTTP/1 read buffer, which holds a request head and then the body's pieces: 64 KiB keeps a
/// 1 MB review to a few dozen reads (16 KiB made it four times slower) and 512 connections' heads
/// to 32 MiB.
pub const HTTP1_BUFFER_BYTES: usize = 64 * 1024;

impl Default for Limits {
    /// Sized for the chart's 128Mi memory limit: 512 connections at about 100 KiB each at worst
    /// (TLS buffers, a full HTTP/1 buffer or a header list per stream, HTTP/2 state), plus 32 MiB of request bodies
    /// in all, 16 MiB per client address, 8 MiB per connection (two full-size reviews).
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_streams: 4,
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_buffered_bytes: 32 << 20,
            max_peer_bytes: 16 << 20,
            max_connection_bytes: 8 << 20,
        }
    }
}

/// The budgets a request's client shares: its address's and its connection's.
#[derive(Debug, Clone)]
pub struct ClientBudgets {
    pub peer: Budget,
    pub connection: Budget,
}

/// Budgets count in units of this many bytes.
const UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

/// A budget of buffered bytes shared by requests (the server's, or one connection's).
#[derive(Debug, Clone)]
pub struct Budget(Arc<Semaphore>);

impl Budget {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(Semaphore::new(units(bytes) as usize)))
    }

    /// A budget shared with others holding the same semaphore.
    pub fn from_shared(semaphore: Arc<Semaphore>) -> Self {
        Self(semaphore)
    }

    /// A handle that does not keep the budget alive.
    pub fn downgrade(&self) -> std::sync::Weak<Semaphore> {
        Arc::downgrade(&self.0)
    }

    /// Bytes still free.
    pub fn available(&self) -> usize {
        self.0.available_permits() * UNIT
    }
}

/// Bytes one request holds against the server's budget and its connection's; given back when
/// the request is done.
#[derive(Debug, Default)]
pub struct Held {
    bytes: usize,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Held {
    /// Take `bytes` more from every budget, or nothing (the caller refuses the request).
    pub fn take(&mut self, bytes: usize, budgets: &[&Budget]) -> bool {
        let want = units(self.bytes + bytes) - units(self.bytes);
        if want == 0 {
            self.bytes += bytes;
            return true;
        }
        let mut taken = Vec::with_capacity(budgets.len());
        for budget in budgets {
            match budget.0.clone().try_acquire_many_owned(want) {
                Ok(permit) => taken.push(permit),
                Err(_) => return false,
            }
        }
        self.permits.extend(taken);
        self.bytes += bytes;
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_shared_and_given_back() {
        let server = Budget::new(10 * UNIT);
        let connection = Budget::new(4 * UNIT);
        let mut first = Held::default();
        assert!(first.take(3 * UNIT, &[&server, &connection]));
        assert!(first.take(10, &[&server, &connection]), "a partial unit rounds up");
        assert_eq!((server.available(), connection.available()), (6 * UNIT, 0));
        let mut second = Held::default();
        assert!(!second.take(1, &[&server, &connection]), "the connection's budget is spent");
        assert_eq!(server.available(), 6 * UNIT, "a refused take holds nothing");
        let other_connection = Budget::new(8 * UNIT);
        assert!(second.take(6 * UNIT, &[&server, &other_connection]));
        assert!(!Held::default().take(1, &[&server, &other_connection]), "the server's budget is spent");
        drop(first);
        assert_eq!((server.available(), connection.available()), (4 * UNIT, 4 * UNIT));
        assert_eq!(second.bytes(), 6 * UNIT);
    }
}
