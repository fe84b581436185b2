//! Kubernetes naming (selectors mode): a container is named to the SPIRE agent by exactly the
//! `k8s` selectors the agent's own k8s workload attestor would produce for it, built from what
//! the runtime reports through NRI and what only the kubelet knows.
//!
//! * [`attestor`]: the attestor's selector rules, pure.
//! * [`kubelet`]: the kubelet's pod list (service account, owners, labels), cached.
//! * [`derive_selectors`]: the two together for one container.

pub mod attestor;
mod kubelet;

use nri_identity_backends::{ContainerInfo, PodInfo, RuntimeBackend};
use tokio::time::Instant;
use tracing::debug;

pub use attestor::{K8sSelectorError, K8sWorkload, OwnerReference};
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use kubelet::fuzzing as kubelet_fuzzing;
pub use kubelet::{
    ClientAuth, CredentialError, Endpoint, KubeletPods, KubeletUrl, LookupError, PodFacts, Scheme,
    TlsSettings,
};

use crate::spire::Selector;

/// Why a container cannot be named by selectors.
#[derive(Debug, thiserror::Error)]
pub enum NamingError {
    #[error(transparent)]
    Kubelet(#[from] LookupError),
    #[error("cannot name the workload by selectors: {0}")]
    Selectors(K8sSelectorError),
    #[error("ephemeral (debug) containers get no identity: SPIRE's k8s attestor never names them")]
    EphemeralContainer,
}

impl From<K8sSelectorError> for NamingError {
    fn from(e: K8sSelectorError) -> Self {
        NamingError::Selectors(e)
    }
}

/// A container named by selectors, and what the kubelet knows of its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub selectors: Vec<Selector>,
    /// The uid and gid the pod spec gives the container (`runAsUser`, `runAsGroup`), if it
    /// sets the uid: the files' owner where the runtime does not report the container's user
    /// (containerd before 2.3 does not).
    pub spec_user: Option<(u32, u32)>,
}

/// The `k8s` selectors SPIRE's k8s attestor would produce for container `c` of `pod`, from the
/// runtime's metadata and the kubelet's pod list; `until` bounds the kubelet lookup.
pub async fn derive_selectors(
    kubelet: &KubeletPods,
    runtime: &dyn RuntimeBackend,
    pod: &PodInfo,
    c: &ContainerInfo,
    until: Instant,
) -> Result<Naming, NamingError> {
    let asked = Instant::now();
    let facts = tokio::time::timeout_at(until, kubelet.pod(&pod.uid))
        .await
        .map_err(|_| LookupError::Timeout {
            url: kubelet.url().to_string(),
            timeout: asked.elapsed(),
        })??;
    if facts.ephemeral_containers.contains(&c.name) {
        return Err(NamingError::EphemeralContainer);
    }
    let spec_user = facts.users.get(&c.name).copied();
    let mut w = K8sWorkload::from_runtime(pod, c, runtime);
    w.service_account = Some(facts.service_account);
    w.node_name = Some(facts.node_name).filter(|n| !n.is_empty());
    w.owner_references = Some(facts.owners);
    // The kubelet's labels are the pod's own; NRI's also carry the runtime's and the pause
    // image's.
    w.pod_labels = facts.labels;
    let derived = attestor::selectors(&w)?;
    debug!(selectors = ?derived.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(), "derived selectors");
    Ok(Naming {
        selectors: derived.selectors,
        spec_user,
    })
}

/// The container annotation in which the kubelet records the container's
/// `terminationMessagePath`: the file whose contents `kubectl describe pod` shows as the
/// message of a terminated container.
pub const TERMINATION_MESSAGE_PATH_ANNOTATION: &str =
    "io.kubernetes.container.terminationMessagePath";

/// Where a container's termination message goes, if the kubelet created it (an absolute path
/// inside the container).
pub fn termination_message_path(c: &ContainerInfo) -> Option<&str> {
    c.annotations
        .get(TERMINATION_MESSAGE_PATH_ANNOTATION)
        .map(String::as_str)
        .filter(|p| p.starts_with('/'))
}
