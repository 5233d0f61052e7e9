//! The upgrade controller's metrics: where the rollout stands (GPU nodes per upgrade state, how
//! many are out against the budget), whether this controller holds the Lease, and what its rounds
//! and steps did. The holder's figures describe the cluster; a standing-by controller reports only
//! that it stands by.

use std::collections::BTreeMap;

use super::State;
use super::plan::Action;
use crate::node::metrics::{Text, labels};

/// What the controller saw and did, as its metrics show it.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub leader: bool,
    /// GPU nodes per upgrade state in the last round (`none`: no upgrade state).
    pub nodes: BTreeMap<&'static str, usize>,
    pub out_of_service: usize,
    pub max_unavailable: usize,
    /// Unix seconds of the last round that read the cluster.
    pub last_round: u64,
    /// Rounds by outcome (`ok`, `failed`).
    pub rounds: BTreeMap<&'static str, u64>,
    /// Steps by kind and outcome.
    pub steps: BTreeMap<(&'static str, &'static str), u64>,
}

impl Stats {
    /// The nodes of a round just read.
    pub fn saw(&mut self, states: impl Iterator<Item = Option<State>>, out_of_service: usize, budget: usize) {
        self.nodes = State::ALL.iter().map(|s| (s.as_str(), 0)).chain([("none", 0)]).collect();
        for state in states {
            *self.nodes.entry(state.map_or("none", State::as_str)).or_default() += 1;
        }
        self.out_of_service = out_of_service;
        self.max_unavailable = budget;
        self.last_round = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    }

    pub fn step(&mut self, action: &Action, ok: bool) {
        *self.steps.entry((action.kind(), if ok { "ok" } else { "failed" })).or_default() += 1;
    }

    pub fn round(&mut self, ok: bool) {
        *self.rounds.entry(if ok { "ok" } else { "failed" }).or_default() += 1;
    }
}

/// The metrics in the Prometheus text format.
pub fn render(stats: &Stats) -> String {
    let mut text = Text::with_build_info();
    let plain = |v: f64| vec![(String::new(), v)];
    text.metric(
        "nvidia_installer_upgrade_controller_leader",
        "gauge",
        "1 while this upgrade controller holds the Lease and acts; 0 while it stands by",
        &plain(if stats.leader { 1.0 } else { 0.0 }),
    );
    let rounds: Vec<(String, f64)> =
        stats.rounds.iter().map(|(outcome, n)| (labels(&[("outcome", outcome)]), *n as f64)).collect();
    text.metric("nvidia_installer_upgrade_rounds_total", "counter", "Rounds this controller ran, by outcome", &rounds);
    let steps: Vec<(String, f64)> = stats
        .steps
        .iter()
        .map(|((action, outcome), n)| (labels(&[("action", action), ("outcome", outcome)]), *n as f64))
        .collect();
    text.metric(
        "nvidia_installer_upgrade_steps_total",
        "counter",
        "Steps this controller took (cordon, uncordon, set_state, evict, delete, restart_installer, event), by outcome",
        &steps,
    );
    if stats.leader && stats.last_round > 0 {
        let nodes: Vec<(String, f64)> =
            stats.nodes.iter().map(|(state, n)| (labels(&[("state", state)]), *n as f64)).collect();
        text.metric(
            "nvidia_installer_upgrade_nodes",
            "gauge",
            "GPU nodes per upgrade state (none: no upgrade state), as the last round read them",
            &nodes,
        );
        text.metric(
            "nvidia_installer_upgrade_nodes_out_of_service",
            "gauge",
            "GPU nodes out for the upgrade now (cordoned by it, or between cordoned and validating)",
            &plain(stats.out_of_service as f64),
        );
        text.metric(
            "nvidia_installer_upgrade_max_unavailable_nodes",
            "gauge",
            "How many GPU nodes may be out at once (upgrade.maxUnavailable of the GPU nodes now)",
            &plain(stats.max_unavailable as f64),
        );
        text.metric(
            "nvidia_installer_upgrade_last_round_timestamp_seconds",
            "gauge",
            "When the last round read the cluster (Unix time)",
            &plain(stats.last_round as f64),
        );
    }
    text.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading() -> Stats {
        let mut stats = Stats { leader: true, ..Stats::default() };
        stats.saw([Some(State::Done), Some(State::Done), Some(State::Draining), None].into_iter(), 1, 2);
        stats.round(true);
        stats.step(&Action::Cordon { node: "a".into() }, true);
        stats.step(&Action::Evict { namespace: "n".into(), pod: "p".into(), node: "a".into() }, false);
        stats
    }

    #[test]
    fn the_rollout_is_counted_per_state_with_every_state_present() {
        let text = render(&leading());
        assert!(text.contains("nvidia_installer_upgrade_nodes{state=\"done\"} 2\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_nodes{state=\"draining\"} 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_nodes{state=\"none\"} 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_nodes{state=\"failed\"} 0\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_nodes_out_of_service 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_max_unavailable_nodes 2\n"), "{text}");
        assert!(
            text.contains("nvidia_installer_upgrade_steps_total{action=\"evict\",outcome=\"failed\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("nvidia_installer_upgrade_rounds_total{outcome=\"ok\"} 1\n"), "{text}");
        assert!(text.contains("nvidia_installer_upgrade_controller_leader 1\n"), "{text}");
    }

    #[test]
    fn a_standing_by_controller_says_nothing_of_the_cluster() {
        let mut stats = leading();
        stats.leader = false;
        let text = render(&stats);
        assert!(text.contains("nvidia_installer_upgrade_controller_leader 0\n"), "{text}");
        assert!(!text.contains("nvidia_installer_upgrade_nodes{"), "{text}");
    }

    /// docs/operations.md lists exactly the metrics `render` exposes.
    #[test]
    fn the_documented_controller_metrics_are_the_exposed_ones() {
        use crate::node::metrics::tests::{documented, exposed};
        assert_eq!(documented("### The upgrade controller"), exposed(&render(&leading())));
    }
}
