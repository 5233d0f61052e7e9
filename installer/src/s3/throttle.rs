//! Pacing requests to a bucket that pushes back: adaptive concurrency, full-jitter backoff, and a
//! deadline instead of an attempt count for throttling.
//!
//! S3 answers bursts (a new node pool of a thousand nodes staging the same bundle) with `503
//! SlowDown` per prefix, other stores with `429` and often `Retry-After`. Every stager then
//! retrying on a fixed schedule keeps the burst going; so each stager here
//! - starts with few requests in flight and grows (slow start), halves on throttling and grows by
//!   one per window of successes after that (additive increase, multiplicative decrease);
//! - pauses all its requests for a random time between zero and a ceiling that doubles with each
//!   throttling answer and halves only after several successes (full jitter on a shared level, so
//!   that a stager's many small requests do not each start their backoff from scratch), at least
//!   what `Retry-After` asks;
//! - counts throttling against a deadline, not against the attempts a broken object gets: a
//!   throttled stage keeps trying until the deadline, a failing one gives up after a few attempts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The longest wait between two attempts, whatever the attempt count.
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// The longest `Retry-After` honoured; a server asking for more is asked again after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Concurrency is halved at most once per this long: the answers to requests sent before the
/// first cut arrive after it and say nothing new.
const CUT_COOLDOWN: Duration = Duration::from_millis(500);
/// Successes that lower the backoff level by one: fewer than this many successes per throttling
/// answer keep the level rising, so a crowd of stagers settles where about one request in this
/// many is refused.
const SUCCESSES_PER_LEVEL: usize = 4;
/// The highest backoff level (the ceiling is then [`MAX_BACKOFF`] anyway).
const MAX_LEVEL: u32 = 16;

/// The shared state of one stage's requests (cloned `Transfer`s share it).
#[derive(Debug)]
pub struct Throttle {
    max: usize,
    deadline: Instant,
    state: Mutex<State>,
    freed: Notify,
    retries: AtomicU64,
    throttled: AtomicU64,
    received: AtomicU64,
}

#[derive(Debug)]
struct State {
    limit: usize,
    in_flight: usize,
    /// Successes since the limit last grew.
    successes: usize,
    /// Until the first throttling answer the limit grows by one per success (doubling per round).
    slow_start: bool,
    last_cut: Option<Instant>,
    /// The backoff level: the pause after the next throttling answer is drawn from
    /// `[0, backoff · 2^level]`.
    level: u32,
    /// Successes since the level was last lowered or raised.
    calm: usize,
    /// No request is sent before this (a pause after throttling).
    resume_at: Option<Instant>,
}

/// Counts for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// Attempts repeated after a transient failure or throttling.
    pub retries: u64,
    /// Answers that asked to slow down (503 SlowDown, 429, 503).
    pub throttled: u64,
    /// Requests allowed in flight now.
    pub limit: usize,
    /// Object bytes downloaded.
    pub received_bytes: u64,
}

impl Throttle {
    /// At most `max` requests in flight; throttling is retried until `patience` from now.
    pub fn new(max: usize, patience: Duration) -> Arc<Self> {
        let max = max.max(1);
        let now = Instant::now();
        Arc::new(Self {
            max,
            deadline: now.checked_add(patience).unwrap_or(now + Duration::from_secs(86_400 * 365)),
            state: Mutex::new(State {
                limit: max.min(2),
                in_flight: 0,
                successes: 0,
                slow_start: true,
                last_cut: None,
                level: 0,
                calm: 0,
                resume_at: None,
            }),
            freed: Notify::new(),
            retries: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait for the end of a pause and for room under the current limit; the request is in flight
    /// while the permit lives.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let freed = self.freed.notified();
            let pause = {
                let mut state = self.state();
                match state.resume_at.filter(|at| *at > Instant::now()) {
                    Some(at) => Some(at),
                    None if state.in_flight < state.limit => {
                        state.in_flight += 1;
                        return Permit(Arc::clone(self));
                    }
                    None => None,
                }
            };
            match pause {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => freed.await,
            }
        }
    }

    /// A request got through: grow the limit, and lower the backoff level now and then.
    pub fn succeeded(&self) {
        let mut state = self.state();
        state.calm += 1;
        if state.calm >= SUCCESSES_PER_LEVEL && state.level > 0 {
            state.level -= 1;
            state.calm = 0;
        }
        state.successes += 1;
        let window = if state.slow_start { 1 } else { state.limit };
        if state.successes >= window && state.limit < self.max {
            state.limit += 1;
            state.successes = 0;
            drop(state);
            self.freed.notify_waiters();
        }
    }

    /// The server asked to slow down (for at least `asked`, from `Retry-After`): halve the limit
    /// (once per cooldown), raise the backoff level and pause every request for a random part of
    /// `base · 2^level`. Returns the pause.
    pub fn slow_down(&self, base: Duration, asked: Option<Duration>) -> Duration {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state();
        state.slow_start = false;
        state.successes = 0;
        state.calm = 0;
        state.level = (state.level + 1).min(MAX_LEVEL);
        let now = Instant::now();
        if state.last_cut.is_none_or(|cut| now.duration_since(cut) >= CUT_COOLDOWN) {
            state.limit = (state.limit / 2).max(1);
            state.last_cut = Some(now);
        }
        let pause = full_jitter(base, state.level).max(asked.unwrap_or_default());
        state.resume_at = Some(state.resume_at.map_or(now + pause, |at| at.max(now + pause)));
        pause
    }

    /// Whether a wait of `delay` from now still ends before the deadline.
    pub fn can_wait(&self, delay: Duration) -> bool {
        Instant::now() + delay < self.deadline
    }

    /// `bytes` of an object arrived.
    pub fn received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ThrottleStats {
        ThrottleStats {
            retries: self.retries.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            limit: self.state().limit,
            received_bytes: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A request in flight; dropping it makes room for the next.
#[derive(Debug)]
pub struct Permit(Arc<Throttle>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.state().in_flight -= 1;
        self.0.freed.notify_waiters();
    }
}

/// Full jitter: a uniformly random wait between zero and `base · 2^attempt` (at most
/// [`MAX_BACKOFF`]), so that stagers throttled together do not come back together.
pub fn full_jitter(base: Duration, attempt: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(16)).min(MAX_BACKOFF);
    Duration::from_micros(fastrand::u64(0..=ceiling.as_micros() as u64))
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 7231), capped at [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(std::time::SystemTime::now()).unwrap_or_default()
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_doubles_then_throttling_halves_and_growth_is_additive() {
        let throttle = Throttle::new(32, Duration::from_secs(60));
        assert_eq!(throttle.stats().limit, 2);
        for _ in 0..6 {
            throttle.succeeded();
        }
        assert_eq!(throttle.stats().limit, 8, "one more per success while slow-starting");
        throttle.slow_down(Duration::ZERO, None);
        assert_eq!(throttle.stats().limit, 4);
        throttle.slow_down(Duration::ZERO, None);
        assert_eq!(throttle.stats().limit, 4, "a second answer within the cooldown cuts nothing more");
        for _ in 0..3 {
            throttle.succeeded();
        }
        assert_eq!(throttle.stats().limit, 4, "after throttling: one more per window of `limit` successes");
        throttle.succeeded();
        assert_eq!(throttle.stats().limit, 5);
        assert_eq!(throttle.stats().throttled, 2);
    }

    #[test]
    fn the_limit_stays_between_one_and_the_configured_maximum() {
        let throttle = Throttle::new(3, Duration::from_secs(60));
        for _ in 0..100 {
            throttle.succeeded();
        }
        assert_eq!(throttle.stats().limit, 3);
        let throttle = Throttle::new(3, Duration::from_secs(60));
        for _ in 0..10 {
            throttle.state().last_cut = None;
            throttle.slow_down(Duration::ZERO, None);
        }
        assert_eq!(throttle.stats().limit, 1);
    }

    #[tokio::test]
    async fn permits_block_beyond_the_limit_and_free_on_drop() {
        let throttle = Throttle::new(4, Duration::from_secs(60));
        let first = throttle.acquire().await;
        let _second = throttle.acquire().await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), throttle.acquire()).await;
        assert!(blocked.is_err(), "a third request waits while the limit is 2");
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), throttle.acquire()).await;
        assert!(third.is_ok(), "dropping a permit lets the next request go");
    }

    #[test]
    fn the_backoff_level_rises_per_refusal_and_falls_per_several_successes() {
        let throttle = Throttle::new(8, Duration::from_secs(60));
        for _ in 0..3 {
            throttle.slow_down(Duration::ZERO, None);
        }
        assert_eq!(throttle.state().level, 3);
        for _ in 0..SUCCESSES_PER_LEVEL - 1 {
            throttle.succeeded();
        }
        assert_eq!(throttle.state().level, 3, "a few successes are not calm yet");
        throttle.succeeded();
        assert_eq!(throttle.state().level, 2);
        let pause = throttle.slow_down(Duration::from_millis(1), Some(Duration::from_millis(300)));
        assert!(pause >= Duration::from_millis(300), "Retry-After is a floor: {pause:?}");
    }

    #[tokio::test]
    async fn a_pause_holds_back_every_request() {
        let throttle = Throttle::new(8, Duration::from_secs(60));
        throttle.slow_down(Duration::ZERO, Some(Duration::from_millis(200)));
        let started = Instant::now();
        let _permit = throttle.acquire().await;
        assert!(started.elapsed() >= Duration::from_millis(190), "{:?}", started.elapsed());
    }

    #[test]
    fn full_jitter_stays_under_its_ceiling_and_spreads() {
        let base = Duration::from_millis(100);
        let waits: Vec<Duration> = (0..2000).map(|_| full_jitter(base, 3)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(800)));
        let short = waits.iter().filter(|w| **w < Duration::from_millis(400)).count();
        assert!((700..1300).contains(&short), "about half below the middle, got {short} of 2000");
        assert!(full_jitter(base, 40) <= MAX_BACKOFF);
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 100000 "), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO), "a date past");
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let wait = parse_retry_after(&soon).expect("a date parses");
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "{wait:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn the_deadline_bounds_waiting() {
        let throttle = Throttle::new(2, Duration::from_secs(10));
        assert!(throttle.can_wait(Duration::from_secs(1)));
        assert!(!throttle.can_wait(Duration::from_secs(11)));
    }
}
