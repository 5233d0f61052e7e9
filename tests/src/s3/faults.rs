//! Faults queued by tests and applied by the server to the requests they match.

use std::sync::{Arc, Mutex, MutexGuard};

use hyper::{Method, StatusCode};

/// What the server does to a request that a queued fault matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 503 with the S3 error code `SlowDown`; the request is not served.
    SlowDown,
    /// 500 with the S3 error code `InternalError`; the request is not served.
    InternalError,
    /// 403 with the S3 error code `AccessDenied`; the request is not served.
    AccessDenied,
    /// 404 with the S3 error code `NoSuchKey`; the request is not served.
    NoSuchKey,
    /// The connection is closed without any response.
    Reset,
    /// The request is served, its real status and headers are sent, then only the first `after`
    /// bytes of the body, then the connection is dropped. A body no longer than `after` is sent
    /// whole.
    CutBody { after: u64 },
}

impl Fault {
    /// The status and S3 error code of a fault answered with an error response.
    pub fn error(&self) -> Option<(StatusCode, &'static str)> {
        match self {
            Self::SlowDown => Some((StatusCode::SERVICE_UNAVAILABLE, "SlowDown")),
            Self::InternalError => Some((StatusCode::INTERNAL_SERVER_ERROR, "InternalError")),
            Self::AccessDenied => Some((StatusCode::FORBIDDEN, "AccessDenied")),
            Self::NoSuchKey => Some((StatusCode::NOT_FOUND, "NoSuchKey")),
            Self::Reset | Self::CutBody { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Rule {
    method: Method,
    key_contains: String,
    /// Match only paths that end with `key_contains`.
    suffix: bool,
    fault: Fault,
    remaining: usize,
}

/// The queue of faults, shared by the server and the tests. Rules are tried in the order they
/// were queued; the first that matches a request applies to it and is used up after its count.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Rule>>>,
}

impl Faults {
    /// Applies `fault` once, to the next request with `method` whose path (`/bucket/key`,
    /// percent-decoded) contains `key_contains`.
    pub fn inject(&self, method: Method, key_contains: &str, fault: Fault) {
        self.inject_times(method, key_contains, fault, 1);
    }

    /// Applies `fault` to the next `times` matching requests.
    pub fn inject_times(&self, method: Method, key_contains: &str, fault: Fault, times: usize) {
        if times > 0 {
            self.lock().push(Rule {
                method,
                key_contains: key_contains.to_owned(),
                suffix: false,
                fault,
                remaining: times,
            });
        }
    }

    /// Applies `fault` to the next `times` requests whose path ends with `key_suffix` (so an
    /// archive can be targeted apart from its `….manifest.json`).
    pub fn inject_suffix_times(&self, method: Method, key_suffix: &str, fault: Fault, times: usize) {
        if times > 0 {
            self.lock().push(Rule {
                method,
                key_contains: key_suffix.to_owned(),
                suffix: true,
                fault,
                remaining: times,
            });
        }
    }

    /// How many applications are still queued, over all rules.
    pub fn pending(&self) -> usize {
        self.lock().iter().map(|rule| rule.remaining).sum()
    }

    /// Drops every queued fault.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The fault for a request, used up by this call.
    pub(crate) fn take(&self, method: &Method, path: &str) -> Option<Fault> {
        let mut rules = self.lock();
        let index = rules.iter().position(|rule| {
            rule.method == method
                && if rule.suffix { path.ends_with(&rule.key_contains) } else { path.contains(&rule.key_contains) }
        })?;
        let rule = &mut rules[index];
        let fault = rule.fault.clone();
        rule.remaining -= 1;
        if rule.remaining == 0 {
            rules.remove(index);
        }
        Some(fault)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_method_and_key_and_are_used_up_in_order() {
        let faults = Faults::default();
        faults.inject_times(Method::GET, "bundle", Fault::SlowDown, 2);
        faults.inject(Method::GET, "bundle", Fault::Reset);
        assert_eq!(faults.pending(), 3);

        assert_eq!(faults.take(&Method::HEAD, "/b/bundle.tar"), None);
        assert_eq!(faults.take(&Method::GET, "/b/other"), None);
        assert_eq!(faults.take(&Method::GET, "/b/bundle.tar"), Some(Fault::SlowDown));
        assert_eq!(faults.take(&Method::GET, "/b/bundle.tar"), Some(Fault::SlowDown));
        assert_eq!(faults.take(&Method::GET, "/b/bundle.tar"), Some(Fault::Reset));
        assert_eq!(faults.take(&Method::GET, "/b/bundle.tar"), None);
        assert_eq!(faults.pending(), 0);

        faults.inject_suffix_times(Method::GET, ".tar.zst", Fault::InternalError, 1);
        assert_eq!(faults.take(&Method::GET, "/b/x.tar.zst.manifest.json"), None);
        assert_eq!(faults.take(&Method::GET, "/b/x.tar.zst"), Some(Fault::InternalError));
    }

    #[test]
    fn clear_drops_everything() {
        let faults = Faults::default();
        faults.inject(Method::PUT, "", Fault::InternalError);
        faults.inject_times(Method::GET, "x", Fault::AccessDenied, 0);
        assert_eq!(faults.pending(), 1);
        faults.clear();
        assert_eq!(faults.take(&Method::PUT, "/b/k"), None);
    }
}
