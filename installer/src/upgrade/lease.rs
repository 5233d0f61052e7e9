//! One upgrade controller acts at a time: it holds a `coordination.k8s.io/v1` Lease in its own
//! namespace, renewed while it works. A second controller (a pod left running on a partitioned
//! node while its replacement starts, say) stands by; it takes the Lease over only once the Lease
//! has gone unchanged for its whole duration, measured on its own clock (as client-go does), so
//! the holders' clocks need not agree. Every write carries the Lease's resourceVersion: of two
//! that race, one is refused.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

use crate::{Error, Result};

/// Which Lease, who this controller is in it, and how long a Lease not renewed stays its holder's.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

/// The Lease and who this controller is.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The Lease's resourceVersion when first seen unchanged, and when (this process's clock).
    observed: Option<(String, Instant)>,
    /// Until when this controller may act on its last renewal.
    valid_until: Option<Instant>,
    /// Who held it when this controller last stood by (to log changes once).
    standing_by_for: Option<String>,
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, lease: &LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: lease.name.clone(),
            identity: lease.identity.clone(),
            duration: lease.duration,
            observed: None,
            valid_until: None,
            standing_by_for: None,
        }
    }

    /// The Lease's duration as written in it (whole seconds, at least one).
    fn whole_seconds(&self) -> Duration {
        Duration::from_secs(self.duration.as_secs().max(1))
    }

    /// How long a renewal lets this controller act: two thirds of the Lease's duration, so that
    /// it stops well before a standing-by controller may take over (as client-go's renew deadline).
    fn acting_window(&self) -> Duration {
        self.whole_seconds() * 2 / 3
    }

    /// Whether this controller may act now, renewing or taking the Lease when due: renewed once
    /// less than half its acting window is left. A renewal that does not answer within a third of
    /// the duration counts as not holding it.
    pub async fn lead(&mut self) -> Result<bool> {
        if self.remaining() > self.acting_window() / 2 {
            return Ok(true);
        }
        self.valid_until = None;
        let started = Instant::now();
        let held = match tokio::time::timeout(self.whole_seconds() / 3, self.acquire_or_renew()).await {
            Ok(held) => held?,
            Err(_) => {
                warn!(lease = %self.name, "the lease did not answer in time; not acting");
                false
            }
        };
        if held {
            self.valid_until = Some(started + self.acting_window());
        }
        Ok(held && self.remaining() > Duration::ZERO)
    }

    /// How much longer the last renewal covers acting (no request).
    pub fn remaining(&self) -> Duration {
        self.valid_until.map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()))
    }

    async fn acquire_or_renew(&mut self) -> Result<bool> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let seconds = i32::try_from(self.whole_seconds().as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(|e| self.error("reading", e))? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(lease = %self.name, identity = %self.identity, "holding the upgrade controller's lease");
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(e) => Err(self.error("creating", e)),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours && let Some(holder) = &holder {
            let version = lease.metadata.resource_version.clone().unwrap_or_default();
            let theirs = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.duration, Duration::from_secs);
            let unchanged_since = match &self.observed {
                Some((seen, at)) if *seen == version => *at,
                _ => {
                    self.observed = Some((version, Instant::now()));
                    Instant::now()
                }
            };
            if unchanged_since.elapsed() < theirs {
                if self.standing_by_for.as_ref() != Some(holder) {
                    info!(lease = %self.name, %holder, "another upgrade controller holds the lease; standing by");
                    self.standing_by_for = Some(holder.clone());
                }
                return Ok(false);
            }
            info!(lease = %self.name, %holder, "the lease was not renewed in time; taking it over");
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // A replace carrying the resourceVersion read: refused (409) if anyone wrote in between.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if !ours {
                    info!(lease = %self.name, identity = %self.identity, "holding the upgrade controller's lease");
                }
                self.observed = None;
                self.standing_by_for = None;
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error("renewing", e)),
        }
    }

    fn error(&self, what: &str, error: kube::Error) -> Error {
        Error::Upgrade { reason: format!("{what} the upgrade controller's lease {}: {error}", self.name) }
    }
}
