//! Prometheus metrics of the admission server.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::mutate::SkipReason;

/// Skip reason for reviews that are not pod creations (the webhook answers them unchanged).
pub const NOT_POD_CREATE: &str = "not-pod-create";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// The counters and the latency histogram, plus the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Counter,
    pub injected: Counter,
    pub skipped: Family<ReasonLabel, Counter>,
    pub errors: Family<ReasonLabel, Counter>,
    pub latency: Histogram,
    /// Connections open now.
    pub connections: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused_connections: Counter,
    /// When the serving certificate expires (Unix seconds; 0: unknown), set at each (re)load.
    pub certificate_expiry: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nvidia_webhook");
        let requests = Counter::default();
        let injected = Counter::default();
        let skipped = Family::<ReasonLabel, Counter>::default();
        let errors = Family::<ReasonLabel, Counter>::default();
        // 50 µs .. ~1.6 s
        let latency = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16));
        registry.register("admission_requests", "AdmissionReviews received", requests.clone());
        registry.register("injected", "Pods that got the driver injected", injected.clone());
        registry.register("skipped", "Pods left unchanged, by reason", skipped.clone());
        registry.register("errors", "Requests answered with an error, by kind", errors.clone());
        registry.register("admission_duration_seconds", "Time to answer an AdmissionReview", latency.clone());
        let connections = Gauge::default();
        let refused_connections = Counter::default();
        registry.register("connections", "Client connections open", connections.clone());
        registry.register(
            "refused_connections",
            "Connections closed at once because the connection limit was reached",
            refused_connections.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the serving certificate expires (Unix time); 0 when it cannot be read",
            certificate_expiry.clone(),
        );
        let build = Family::<VersionLabel, Gauge>::default();
        build.get_or_create(&VersionLabel { version: env!("CARGO_PKG_VERSION").to_owned() }).set(1);
        registry.register("build_info", "The nvidia-webhook that serves, as a label", build);
        for reason in SkipReason::ALL.iter().map(|r| r.as_str()).chain([NOT_POD_CREATE]) {
            drop(skipped.get_or_create(&ReasonLabel { reason: reason.to_owned() }));
        }
        Self {
            registry,
            requests,
            injected,
            skipped,
            errors,
            latency,
            connections,
            refused_connections,
            certificate_expiry,
        }
    }

    pub fn skip(&self, reason: &str) {
        self.skipped.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    pub fn error(&self, kind: &str) {
        self.errors.get_or_create(&ReasonLabel { reason: kind.to_owned() }).inc();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod doc_tests {
    use std::collections::BTreeSet;

    /// Metric names in the rows of the table under `heading` in docs/operations.md.
    pub fn documented(heading: &str, prefix: &str) -> BTreeSet<String> {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"))
            .expect("docs/operations.md");
        let section = doc.split(heading).nth(1).expect("the section").split("\n#").next().unwrap_or_default();
        section
            .lines()
            .filter_map(|line| line.strip_prefix(&format!("| `{prefix}")))
            .map(|rest| format!("{prefix}{}", rest.split(['`', '{']).next().unwrap_or_default()))
            .collect()
    }

    /// Sample names in the text format (histogram series folded into their family).
    pub fn exposed(text: &str) -> BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(|n| {
                ["_bucket", "_sum", "_count", "_created"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
                    .filter(|base| base.ends_with("_seconds"))
                    .unwrap_or(n)
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn the_documented_webhook_metrics_are_the_exposed_ones() {
        let metrics = super::Metrics::new();
        metrics.requests.inc();
        metrics.error("malformed");
        metrics.latency.observe(0.001);
        assert_eq!(documented("### The webhook", "nvidia_webhook_"), exposed(&metrics.encode()));
    }
}
