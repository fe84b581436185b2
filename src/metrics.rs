//! Prometheus metrics, rendered by hand in the text exposition format: a handful of
//! counters does not justify a metrics stack in a daemon that aims at a few MiB of memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-SVID histogram.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    nri_ready: AtomicU64,
    agent_ready: AtomicU64,
    /// 0: no kubelet configured; 1: it answers; 2: it does not.
    kubelet: AtomicU64,
    identities_served: AtomicU64,
    rotations: AtomicU64,
    active: AtomicI64,
    first_svid: Histogram,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    expiries: Mutex<BTreeMap<String, i64>>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    pub fn set_nri_ready(&self, ready: bool) {
        self.nri_ready.store(ready as u64, Ordering::Relaxed);
    }
    pub fn set_agent_ready(&self, ready: bool) {
        self.agent_ready.store(ready as u64, Ordering::Relaxed);
    }
    pub fn set_kubelet_ready(&self, ready: bool) {
        self.kubelet
            .store(if ready { 1 } else { 2 }, Ordering::Relaxed);
    }
    /// `None` when the daemon does not use a kubelet.
    pub fn kubelet_ready(&self) -> Option<bool> {
        match self.kubelet.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v == 1),
        }
    }
    pub fn nri_ready(&self) -> bool {
        self.nri_ready.load(Ordering::Relaxed) == 1
    }
    pub fn agent_ready(&self) -> bool {
        self.agent_ready.load(Ordering::Relaxed) == 1
    }

    /// A container's first identity is on disk.
    pub fn served(&self, time_to_first: Duration) {
        self.identities_served.fetch_add(1, Ordering::Relaxed);
        let secs = time_to_first.as_secs_f64();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.first_svid.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.first_svid.count.fetch_add(1, Ordering::Relaxed);
        self.first_svid
            .sum_micros
            .fetch_add(time_to_first.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn rotated(&self) {
        self.rotations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&self, kind: &'static str) {
        *self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    pub fn failures(&self, kind: &str) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    pub fn set_active(&self, n: usize) {
        self.active.store(n as i64, Ordering::Relaxed);
    }

    /// Records when a container's current SVID expires (Unix seconds).
    pub fn set_expiry(&self, container: &str, expires_at: i64) {
        self.expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(container.to_owned(), expires_at);
    }

    pub fn forget(&self, container: &str) {
        self.expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container);
    }

    pub fn identities_served(&self) -> u64 {
        self.identities_served.load(Ordering::Relaxed)
    }

    pub fn render(&self, now_unix: i64) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            &mut o,
            "nri_identity_nri_registered",
            "1 while registered and synchronized with the runtime.",
            self.nri_ready.load(Ordering::Relaxed).to_string(),
        );
        gauge(
            &mut o,
            "nri_identity_agent_reachable",
            "1 while the SPIRE agent answers.",
            self.agent_ready.load(Ordering::Relaxed).to_string(),
        );
        if let Some(ok) = self.kubelet_ready() {
            gauge(
                &mut o,
                "nri_identity_kubelet_reachable",
                "1 while the kubelet lists the node's pods for the daemon.",
                (ok as u8).to_string(),
            );
        }
        gauge(
            &mut o,
            "nri_identity_active_identities",
            "Containers whose identity is kept fresh.",
            self.active.load(Ordering::Relaxed).to_string(),
        );
        let soonest = self
            .expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .min()
            .copied();
        if let Some(exp) = soonest {
            gauge(
                &mut o,
                "nri_identity_soonest_expiry_seconds",
                "Seconds until the soonest-expiring delivered SVID expires.",
                (exp - now_unix).to_string(),
            );
        }
        let _ = writeln!(
            o,
            "# HELP nri_identity_served_total Identities delivered for the first time.\n# TYPE nri_identity_served_total counter\nnri_identity_served_total {}",
            self.identities_served.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP nri_identity_rotations_total Identity files rewritten after a rotation or bundle change.\n# TYPE nri_identity_rotations_total counter\nnri_identity_rotations_total {}",
            self.rotations.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP nri_identity_failures_total Failures by kind.\n# TYPE nri_identity_failures_total counter"
        );
        for (kind, n) in self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(o, "nri_identity_failures_total{{kind=\"{kind}\"}} {n}");
        }
        let h = &self.first_svid;
        let _ = writeln!(
            o,
            "# HELP nri_identity_time_to_first_svid_seconds From the start event to the files on disk.\n# TYPE nri_identity_time_to_first_svid_seconds histogram"
        );
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "nri_identity_time_to_first_svid_seconds_bucket{{le=\"{le}\"}} {}",
                h.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "nri_identity_time_to_first_svid_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "nri_identity_time_to_first_svid_seconds_sum {}",
            h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "nri_identity_time_to_first_svid_seconds_count {count}");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_soonest_expiry() {
        let m = Metrics::default();
        m.set_nri_ready(true);
        m.served(Duration::from_millis(42));
        m.failure("agent_unavailable");
        m.failure("agent_unavailable");
        m.set_expiry("a", 1_000);
        m.set_expiry("b", 900);
        let text = m.render(800);
        assert!(text.contains("nri_identity_nri_registered 1"));
        assert!(text.contains("nri_identity_served_total 1"));
        assert!(text.contains("nri_identity_failures_total{kind=\"agent_unavailable\"} 2"));
        assert!(text.contains("nri_identity_soonest_expiry_seconds 100"));
        assert!(text.contains("nri_identity_time_to_first_svid_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("nri_identity_time_to_first_svid_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("nri_identity_time_to_first_svid_seconds_count 1"));
    }

    /// The names, types and help texts dashboards, alerts and the documentation rely on.
    #[test]
    fn names_types_and_help_texts_are_stable() {
        let m = Metrics::default();
        m.set_kubelet_ready(true);
        m.set_expiry("a", 1);
        m.failure("connect");
        let text = m.render(0);
        for (name, kind, help) in [
            (
                "nri_identity_nri_registered",
                "gauge",
                "1 while registered and synchronized with the runtime.",
            ),
            (
                "nri_identity_agent_reachable",
                "gauge",
                "1 while the SPIRE agent answers.",
            ),
            (
                "nri_identity_kubelet_reachable",
                "gauge",
                "1 while the kubelet lists the node's pods for the daemon.",
            ),
            (
                "nri_identity_active_identities",
                "gauge",
                "Containers whose identity is kept fresh.",
            ),
            (
                "nri_identity_soonest_expiry_seconds",
                "gauge",
                "Seconds until the soonest-expiring delivered SVID expires.",
            ),
            (
                "nri_identity_served_total",
                "counter",
                "Identities delivered for the first time.",
            ),
            (
                "nri_identity_rotations_total",
                "counter",
                "Identity files rewritten after a rotation or bundle change.",
            ),
            (
                "nri_identity_failures_total",
                "counter",
                "Failures by kind.",
            ),
            (
                "nri_identity_time_to_first_svid_seconds",
                "histogram",
                "From the start event to the files on disk.",
            ),
        ] {
            let help_line = format!("# HELP {name} {help}");
            let type_line = format!("# TYPE {name} {kind}");
            assert!(text.lines().any(|l| l == help_line), "{help_line}\n{text}");
            assert!(text.lines().any(|l| l == type_line), "{type_line}\n{text}");
        }
        assert!(
            text.lines()
                .any(|l| l == "nri_identity_kubelet_reachable 1")
        );
        assert!(
            text.lines()
                .any(|l| l == "nri_identity_failures_total{kind=\"connect\"} 1")
        );
        m.set_kubelet_ready(false);
        assert!(
            m.render(0)
                .lines()
                .any(|l| l == "nri_identity_kubelet_reachable 0")
        );
        assert!(
            !Metrics::default().render(0).contains("kubelet"),
            "no kubelet gauge without a kubelet"
        );
    }
}
