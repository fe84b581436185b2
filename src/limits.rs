//! How many identities the daemon serves at once: per pod and on the whole node.
//!
//! Every annotated container costs the node a directory on the artifact root's tmpfs (charged
//! to the daemon's memory cgroup), a stream to the SPIRE agent, a few descriptors and a task.
//! Whoever can create pods decides how many annotated containers there are, so both are
//! bounded: a pod can claim at most [`IdentityLimits::per_pod`] identities (the pod key
//! applies to every container of a pod), and the node at most [`IdentityLimits::total`], below
//! what the daemon's memory limit holds (the DaemonSet's 64 MiB hold about 2,000). A container
//! over a limit is refused at CreateContainer, before anything is written, with an error that
//! names the limit and its setting; the kubelet retries it, and it is admitted once others
//! are removed.
//!
//! A container counts from its admission at CreateContainer until RemoveContainer (its files
//! stay until then, stopped or not), its pod's RemovePodSandbox, or a Synchronize that no
//! longer lists it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;

/// The configured bounds (`max_identities_per_pod`, `max_identities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityLimits {
    pub per_pod: usize,
    pub total: usize,
}

impl IdentityLimits {
    /// The defaults: 32 per pod, 1,000 per node (half of what the shipped DaemonSet's
    /// memory limit holds).
    pub const DEFAULT: IdentityLimits = IdentityLimits {
        per_pod: 32,
        total: 1000,
    };
}

impl Default for IdentityLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A container refused because a limit is reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "the pod already has {limit} containers with an identity, its limit (max_identities_per_pod)"
    )]
    PerPod { limit: usize },
    #[error(
        "the node already serves {limit} identities, the daemon's limit (max_identities); remove containers or raise it with the daemon's memory limit"
    )]
    Total { limit: usize },
}

/// The containers holding an identity, by pod.
#[derive(Debug)]
pub struct Admissions {
    limits: IdentityLimits,
    state: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    pods: BTreeMap<String, BTreeSet<String>>,
    total: usize,
}

impl Held {
    fn insert(&mut self, pod_key: &str, container_id: &str) {
        if self
            .pods
            .entry(pod_key.to_owned())
            .or_default()
            .insert(container_id.to_owned())
        {
            self.total += 1;
        }
    }
}

impl Admissions {
    pub fn new(limits: IdentityLimits) -> Self {
        Admissions {
            limits,
            state: Mutex::new(Held::default()),
        }
    }

    pub fn limits(&self) -> IdentityLimits {
        self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `container_id` of pod `pod_key`, or says which limit it would exceed. A
    /// container already admitted is admitted again (the runtime may repeat an event).
    pub fn admit(&self, pod_key: &str, container_id: &str) -> Result<(), LimitError> {
        let mut held = self.lock();
        let in_pod = held.pods.get(pod_key);
        if in_pod.is_some_and(|c| c.contains(container_id)) {
            return Ok(());
        }
        if in_pod.map_or(0, BTreeSet::len) >= self.limits.per_pod {
            return Err(LimitError::PerPod {
                limit: self.limits.per_pod,
            });
        }
        if held.total >= self.limits.total {
            return Err(LimitError::Total {
                limit: self.limits.total,
            });
        }
        held.insert(pod_key, container_id);
        Ok(())
    }

    /// Counts a container that already has its identity (found at Synchronize), whatever
    /// the limits: it exists, and refusing it now would change nothing.
    pub fn restore(&self, pod_key: &str, container_id: &str) {
        self.lock().insert(pod_key, container_id);
    }

    /// The container's identity is gone (RemoveContainer, or a failed creation).
    pub fn release(&self, pod_key: &str, container_id: &str) {
        let mut held = self.lock();
        let Some(containers) = held.pods.get_mut(pod_key) else {
            return;
        };
        let removed = containers.remove(container_id);
        if containers.is_empty() {
            held.pods.remove(pod_key);
        }
        if removed {
            held.total -= 1;
        }
    }

    /// Every identity of the pod is gone (RemovePodSandbox).
    pub fn release_pod(&self, pod_key: &str) {
        let mut held = self.lock();
        if let Some(containers) = held.pods.remove(pod_key) {
            held.total -= containers.len();
        }
    }

    /// Keeps only the containers the runtime still has (Synchronize).
    pub fn retain(&self, live: &HashSet<(String, String)>) {
        let mut held = self.lock();
        held.pods.retain(|pod, containers| {
            containers.retain(|c| live.contains(&(pod.clone(), c.clone())));
            !containers.is_empty()
        });
        held.total = held.pods.values().map(BTreeSet::len).sum();
    }

    /// Identities held now: in total, and by the pod `pod_key`.
    pub fn count(&self, pod_key: &str) -> (usize, usize) {
        let held = self.lock();
        (held.total, held.pods.get(pod_key).map_or(0, BTreeSet::len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admissions(per_pod: usize, total: usize) -> Admissions {
        Admissions::new(IdentityLimits { per_pod, total })
    }

    #[test]
    fn a_pod_over_its_limit_is_refused_and_others_are_not() {
        let a = admissions(2, 10);
        a.admit("p1", "c1").unwrap();
        a.admit("p1", "c2").unwrap();
        assert_eq!(a.admit("p1", "c3"), Err(LimitError::PerPod { limit: 2 }));
        a.admit("p2", "c3").unwrap();
        assert_eq!(a.count("p1"), (3, 2));
    }

    #[test]
    fn the_node_limit_counts_every_pod() {
        let a = admissions(5, 3);
        a.admit("p1", "c1").unwrap();
        a.admit("p2", "c2").unwrap();
        a.admit("p3", "c3").unwrap();
        assert_eq!(a.admit("p4", "c4"), Err(LimitError::Total { limit: 3 }));
        a.release("p2", "c2");
        a.admit("p4", "c4").unwrap();
    }

    #[test]
    fn a_repeated_admission_counts_once_and_is_never_refused() {
        let a = admissions(1, 1);
        a.admit("p1", "c1").unwrap();
        a.admit("p1", "c1").unwrap();
        assert_eq!(a.count("p1"), (1, 1));
    }

    #[test]
    fn removing_a_pod_or_synchronizing_frees_its_identities() {
        let a = admissions(4, 4);
        a.admit("p1", "c1").unwrap();
        a.admit("p1", "c2").unwrap();
        a.admit("p2", "c3").unwrap();
        a.release_pod("p1");
        assert_eq!(a.count("p1"), (1, 0));
        a.restore("p3", "c4");
        a.restore("p3", "c5");
        let live: HashSet<(String, String)> = [("p3".to_owned(), "c5".to_owned())].into();
        a.retain(&live);
        assert_eq!(a.count("p3"), (1, 1));
    }

    #[test]
    fn restored_containers_count_even_over_the_limits() {
        let a = admissions(1, 1);
        a.restore("p1", "c1");
        a.restore("p1", "c2");
        assert_eq!(a.count("p1"), (2, 2));
        assert!(a.admit("p2", "c3").is_err());
    }

    #[test]
    fn messages_name_the_setting() {
        assert!(
            LimitError::PerPod { limit: 2 }
                .to_string()
                .contains("max_identities_per_pod")
        );
        assert!(
            LimitError::Total { limit: 2 }
                .to_string()
                .contains("max_identities")
        );
    }
}
