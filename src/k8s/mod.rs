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
    Selectors(#[from] K8sSelectorError),
    #[error("ephemeral (debug) containers get no identity: SPIRE's k8s attestor never names them")]
    EphemeralContainer,
}

/// The `k8s` selectors SPIRE's k8s attestor would produce for container `c` of `pod`, from the
/// runtime's metadata and the kubelet's pod list; `until` bounds the kubelet lookup.
pub async fn derive_selectors(
    kubelet: &KubeletPods,
    runtime: &dyn RuntimeBackend,
    pod: &PodInfo,
    c: &ContainerInfo,
    until: Instant,
) -> Result<Vec<Selector>, NamingError> {
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
    let mut w = K8sWorkload::from_runtime(pod, c, runtime);
    w.service_account = Some(facts.service_account);
    w.node_name = Some(facts.node_name).filter(|n| !n.is_empty());
    w.owner_references = Some(facts.owners);
    // The kubelet's labels are the pod's own; NRI's also carry the runtime's and the pause
    // image's.
    w.pod_labels = facts.labels;
    let derived = attestor::selectors(&w)?;
    debug!(selectors = ?derived.selectors.iter().map(ToString::to_string).collect::<Vec<_>>(), "derived selectors");
    Ok(derived.selectors)
}
