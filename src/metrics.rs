//! Prometheus metrics, rendered by hand in the text exposition format: a handful of
//! counters does not justify a metrics stack in a daemon that aims at a few MiB of memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use crate::spire::DelegateRefusal;

/// Upper bounds (seconds) of the time-to-first-SVID histogram.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

/// Upper bounds (seconds) of the phase histograms: most phases take microseconds, the agent's
/// answer milliseconds, so these start far below [`BUCKETS`].
const PHASE_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.0,
];

/// The phases of a container's first delivery, in the order they happen. Each lasts from the
/// end of the one before (the first from the runtime event's arrival in the engine) to its own
/// end, so together they are the whole delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The workload named: the pidfd opened (PID mode) or the pod looked up and its selectors
    /// derived (selectors mode).
    Named,
    /// The agent accepted the subscription (connecting first if needed; retries included).
    StreamOpen,
    /// The agent's first update carrying an SVID arrived on the open stream.
    FirstSvid,
    /// The trust bundles were at hand.
    Bundle,
    /// The process checks (still alive, still in the container's cgroup), the owner and the
    /// files' contents.
    Checks,
    /// The JWT-SVID fetched and, with its JWT bundle, written (nothing without `jwt_audience`).
    Jwt,
    /// Key, certificate and bundle written and synced.
    Written,
    /// Metrics recorded and the stream handed to maintenance: the engine answers.
    Reply,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Named,
        Phase::StreamOpen,
        Phase::FirstSvid,
        Phase::Bundle,
        Phase::Checks,
        Phase::Jwt,
        Phase::Written,
        Phase::Reply,
    ];

    /// The name of the phase in metrics (`phase` label) and, with `_ms`, in the log.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Named => "workload_named",
            Phase::StreamOpen => "stream_open",
            Phase::FirstSvid => "first_svid",
            Phase::Bundle => "bundle_ready",
            Phase::Checks => "checks",
            Phase::Jwt => "jwt",
            Phase::Written => "files_written",
            Phase::Reply => "reply",
        }
    }
}

/// Where the time of one first delivery went, phase by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhaseTimes([Duration; Phase::ALL.len()]);

impl PhaseTimes {
    pub fn get(&self, phase: Phase) -> Duration {
        self.0[phase as usize]
    }
    pub fn set(&mut self, phase: Phase, took: Duration) {
        self.0[phase as usize] = took;
    }
    /// The whole delivery: the sum of its phases.
    pub fn total(&self) -> Duration {
        self.0.iter().sum()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    nri_ready: AtomicU64,
    agent_ready: AtomicU64,
    /// 0: the agent does not refuse the daemon; else 1 + the index in [`DelegateRefusal::ALL`].
    agent_refusal: AtomicU8,
    /// 0: no kubelet configured; 1: it answers; 2: it does not.
    kubelet: AtomicU64,
    kubelet_lists: AtomicU64,
    kubelet_list_bytes: AtomicU64,
    identities_served: AtomicU64,
    rotations: AtomicU64,
    jwt_refreshes: AtomicU64,
    jwt_expired_removed: AtomicU64,
    active: AtomicI64,
    first_svid: Histogram,
    /// One per [`Phase`], in its order.
    phases: [Histogram<{ PHASE_BUCKETS.len() }>; Phase::ALL.len()],
    /// Event to answer of every first delivery, on the phases' buckets.
    delivery: Histogram<{ PHASE_BUCKETS.len() }>,
    failures: Mutex<BTreeMap<&'static str, u64>>,
    expiries: Mutex<BTreeMap<String, i64>>,
    /// Containers whose identity the agent refuses for good, until something changes.
    refused: Mutex<BTreeSet<String>>,
}

#[derive(Debug)]
struct Histogram<const N: usize = { BUCKETS.len() }> {
    counts: [AtomicU64; N],
    count: AtomicU64,
    /// Nanoseconds, so that the sums of many sub-millisecond phases stay exact.
    sum_nanos: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    fn observe(&self, bounds: &[f64; N], took: Duration) {
        let secs = took.as_secs_f64();
        for (i, le) in bounds.iter().enumerate() {
            if secs <= *le {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The series of one histogram (`labels`: `key="value",` pairs, or empty).
    fn render(&self, o: &mut String, name: &str, labels: &str, bounds: &[f64; N]) {
        for (i, le) in bounds.iter().enumerate() {
            let _ = writeln!(
                o,
                "{name}_bucket{{{labels}le=\"{le}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(o, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let labels = labels.trim_end_matches(',');
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(o, "{name}_sum{braced} {sum}");
        let _ = writeln!(o, "{name}_count{braced} {count}");
    }
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
    /// One pod list read from the kubelet, `bytes` long.
    pub fn kubelet_list_fetched(&self, bytes: usize) {
        self.kubelet_lists.fetch_add(1, Ordering::Relaxed);
        self.kubelet_list_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
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
    /// Whether the agent answers the daemon and does not refuse it.
    pub fn agent_ready(&self) -> bool {
        self.agent_ready.load(Ordering::Relaxed) == 1 && self.agent_refusal().is_none()
    }
    /// Why the agent refuses the daemon itself, as its last answer said.
    pub fn set_agent_refusal(&self, refusal: Option<DelegateRefusal>) {
        // ALL holds every variant, so the position is always found.
        let v = refusal.map_or(0, |r| {
            DelegateRefusal::ALL
                .iter()
                .position(|x| *x == r)
                .map_or(0, |i| 1 + i as u8)
        });
        self.agent_refusal.store(v, Ordering::Relaxed);
    }
    pub fn agent_refusal(&self) -> Option<DelegateRefusal> {
        match self.agent_refusal.load(Ordering::Relaxed) {
            0 => None,
            v => DelegateRefusal::ALL.get(usize::from(v) - 1).copied(),
        }
    }

    /// Whether a container's identity is refused for good (reported once, until it is not).
    pub fn set_refused(&self, container: &str, refused: bool) {
        let mut set = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused {
            set.insert(container.to_owned());
        } else {
            set.remove(container);
        }
    }
    pub fn refused(&self) -> usize {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A container's first identity is on disk.
    pub fn served(&self, time_to_first: Duration) {
        self.identities_served.fetch_add(1, Ordering::Relaxed);
        self.first_svid.observe(&BUCKETS, time_to_first);
    }

    /// Where a first delivery's time went: each phase, and the whole.
    pub fn delivery_phases(&self, times: &PhaseTimes) {
        for phase in Phase::ALL {
            self.phases[phase as usize].observe(&PHASE_BUCKETS, times.get(phase));
        }
        self.delivery.observe(&PHASE_BUCKETS, times.total());
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

    /// A JWT-SVID file was written with a fresh token (the first one included).
    pub fn jwt_refreshed(&self) {
        self.jwt_refreshes.fetch_add(1, Ordering::Relaxed);
    }
    /// A JWT-SVID file was removed because its token expired before a new one came.
    pub fn jwt_expired_removed(&self) {
        self.jwt_expired_removed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn jwt_refreshes(&self) -> u64 {
        self.jwt_refreshes.load(Ordering::Relaxed)
    }
    pub fn jwt_expired_removals(&self) -> u64 {
        self.jwt_expired_removed.load(Ordering::Relaxed)
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
        self.set_refused(container, false);
    }

    pub fn identities_served(&self) -> u64 {
        self.identities_served.load(Ordering::Relaxed)
    }

    pub fn render(&self, now_unix: i64) -> String {
        let mut o = String::new();
        let gauge = |o: &mut String, name: &str, help: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |o: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let v = v.load(Ordering::Relaxed);
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
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
        let refusal = self.agent_refusal();
        let _ = writeln!(
            o,
            "# HELP nri_identity_agent_refusal 1 while the SPIRE agent refuses the daemon itself, by reason (no_delegate_entry: no registration entry matches the daemon; not_authorized_delegate: its SPIFFE ID is not in authorized_delegates; no_broker_svid, broker_not_listed, reference_type_not_allowed, broker_not_in_attestor: the Broker API's counterparts).\n# TYPE nri_identity_agent_refusal gauge"
        );
        for r in DelegateRefusal::ALL {
            let _ = writeln!(
                o,
                "nri_identity_agent_refusal{{reason=\"{}\"}} {}",
                r.kind(),
                u8::from(refusal == Some(r))
            );
        }
        gauge(
            &mut o,
            "nri_identity_refused_containers",
            "Containers whose identity the SPIRE agent refuses for good; retried when the agent changes.",
            self.refused().to_string(),
        );
        if let Some(ok) = self.kubelet_ready() {
            gauge(
                &mut o,
                "nri_identity_kubelet_reachable",
                "1 while the kubelet lists the node's pods for the daemon.",
                (ok as u8).to_string(),
            );
            counter(
                &mut o,
                "nri_identity_kubelet_pod_lists_total",
                "Pod lists read from the kubelet (cache misses and readiness probes).",
                &self.kubelet_lists,
            );
            counter(
                &mut o,
                "nri_identity_kubelet_pod_list_bytes_total",
                "Bytes of the pod lists read from the kubelet and parsed.",
                &self.kubelet_list_bytes,
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
        counter(
            &mut o,
            "nri_identity_served_total",
            "Identities delivered for the first time.",
            &self.identities_served,
        );
        counter(
            &mut o,
            "nri_identity_rotations_total",
            "Identity files rewritten after a rotation or bundle change.",
            &self.rotations,
        );
        counter(
            &mut o,
            "nri_identity_jwt_refreshes_total",
            "JWT-SVID files written with a fresh token.",
            &self.jwt_refreshes,
        );
        counter(
            &mut o,
            "nri_identity_jwt_expired_removed_total",
            "JWT-SVID files removed because the token expired before a refresh succeeded.",
            &self.jwt_expired_removed,
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
        let _ = writeln!(
            o,
            "# HELP nri_identity_time_to_first_svid_seconds From the start event to the files on disk.\n# TYPE nri_identity_time_to_first_svid_seconds histogram"
        );
        self.first_svid.render(
            &mut o,
            "nri_identity_time_to_first_svid_seconds",
            "",
            &BUCKETS,
        );
        let _ = writeln!(
            o,
            "# HELP nri_identity_first_delivery_seconds From the runtime event to the engine's answer, for first deliveries.\n# TYPE nri_identity_first_delivery_seconds histogram"
        );
        self.delivery.render(
            &mut o,
            "nri_identity_first_delivery_seconds",
            "",
            &PHASE_BUCKETS,
        );
        let _ = writeln!(
            o,
            "# HELP nri_identity_first_delivery_phase_seconds Each phase of a first delivery; the phases add up to nri_identity_first_delivery_seconds.\n# TYPE nri_identity_first_delivery_phase_seconds histogram"
        );
        for phase in Phase::ALL {
            self.phases[phase as usize].render(
                &mut o,
                "nri_identity_first_delivery_phase_seconds",
                &format!("phase=\"{}\",", phase.name()),
                &PHASE_BUCKETS,
            );
        }
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

    #[test]
    fn every_phase_of_a_delivery_has_its_histogram_and_they_add_up_to_the_whole() {
        let m = Metrics::default();
        let mut times = PhaseTimes::default();
        for (i, phase) in Phase::ALL.into_iter().enumerate() {
            times.set(phase, Duration::from_micros(100 * (i as u64 + 1)));
        }
        assert_eq!(times.total(), Duration::from_micros(3_600));
        m.delivery_phases(&times);
        m.delivery_phases(&times);
        let text = m.render(0);
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{series} in\n{text}"))
        };
        let mut sum = 0.0;
        for phase in Phase::ALL {
            let labels = format!("{{phase=\"{}\"}}", phase.name());
            assert_eq!(
                value(&format!(
                    "nri_identity_first_delivery_phase_seconds_count{labels}"
                )),
                2.0
            );
            sum += value(&format!(
                "nri_identity_first_delivery_phase_seconds_sum{labels}"
            ));
        }
        let total = value("nri_identity_first_delivery_seconds_sum");
        assert!(
            (sum - total).abs() < 1e-9 && (total - 0.0072).abs() < 1e-9,
            "{sum} {total}"
        );
        // Sub-millisecond buckets: 100 µs is within 250 µs, 300 µs is not.
        assert_eq!(
            value(
                "nri_identity_first_delivery_phase_seconds_bucket{phase=\"workload_named\",le=\"0.00025\"}"
            ),
            2.0
        );
        assert_eq!(
            value(
                "nri_identity_first_delivery_phase_seconds_bucket{phase=\"first_svid\",le=\"0.00025\"}"
            ),
            0.0
        );
        assert_eq!(
            value("nri_identity_first_delivery_seconds_bucket{le=\"0.0025\"}"),
            0.0
        );
        assert_eq!(
            value("nri_identity_first_delivery_seconds_bucket{le=\"0.005\"}"),
            2.0
        );
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
            (
                "nri_identity_first_delivery_seconds",
                "histogram",
                "From the runtime event to the engine's answer, for first deliveries.",
            ),
            (
                "nri_identity_first_delivery_phase_seconds",
                "histogram",
                "Each phase of a first delivery; the phases add up to nri_identity_first_delivery_seconds.",
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
        m.kubelet_list_fetched(7000);
        m.kubelet_list_fetched(500);
        let text = m.render(0);
        assert!(
            text.lines()
                .any(|l| l == "nri_identity_kubelet_pod_lists_total 2")
        );
        assert!(
            text.lines()
                .any(|l| l == "nri_identity_kubelet_pod_list_bytes_total 7500")
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

    #[test]
    fn the_agents_refusal_is_one_hot_and_refused_containers_are_counted_once() {
        let m = Metrics::default();
        let text = m.render(0);
        assert!(text.contains("nri_identity_agent_refusal{reason=\"no_delegate_entry\"} 0"));
        assert!(text.contains("nri_identity_agent_refusal{reason=\"not_authorized_delegate\"} 0"));
        m.set_agent_ready(true);
        m.set_agent_refusal(Some(DelegateRefusal::NotAuthorized));
        assert!(!m.agent_ready(), "answering but refusing is not ready");
        let text = m.render(0);
        assert!(text.contains("nri_identity_agent_reachable 1"));
        assert!(text.contains("nri_identity_agent_refusal{reason=\"no_delegate_entry\"} 0"));
        assert!(text.contains("nri_identity_agent_refusal{reason=\"not_authorized_delegate\"} 1"));
        // Every refusal reads back as itself, and its series alone says 1.
        for r in DelegateRefusal::ALL {
            m.set_agent_refusal(Some(r));
            assert_eq!(m.agent_refusal(), Some(r));
            let text = m.render(0);
            for other in DelegateRefusal::ALL {
                let want = u8::from(other == r);
                let series = format!(
                    "nri_identity_agent_refusal{{reason=\"{}\"}} {want}",
                    other.kind()
                );
                assert!(text.contains(&series), "{r:?}: missing {series}");
            }
        }
        m.set_agent_refusal(None);
        assert!(m.agent_ready());

        m.set_refused("a", true);
        m.set_refused("a", true);
        m.set_refused("b", true);
        assert!(m.render(0).contains("nri_identity_refused_containers 2"));
        m.forget("b");
        m.set_refused("a", false);
        assert!(m.render(0).contains("nri_identity_refused_containers 0"));
    }
}
