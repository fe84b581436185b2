//! Why a container could not get its identity.

use std::path::PathBuf;
use std::time::Duration;

use nri_identity_backends::{BackendError, ContainerInfo, PodInfo, RuntimeKind};

use crate::annotation::InvalidAnnotation;
use crate::artifacts::ArtifactError;
use crate::host::HostError;
use crate::k8s::NamingError;
use crate::limits::LimitError;
use crate::selinux::LabelError;
use crate::spiffe::TrustDomain;
use crate::spire::SourceError;

/// Why a container could not get its identity. Messages name what failed; the pod and
/// container are added by [`ContainerError`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    InvalidAnnotation(Box<InvalidAnnotation>),
    #[error(
        "the container was created without its identity directory mount (the plugin was not connected at CreateContainer); recreate it"
    )]
    MissingMount,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the container's process {pid} exited before its identity was delivered")]
    ProcessGone { pid: u32 },
    #[error("the container's process {pid} is not in the container any more (cgroup {cgroup:?})")]
    ProcessMoved { pid: u32, cgroup: String },
    #[error("{}", match error {
        // Already names the agent.
        SourceError::Connect { .. } => error.to_string(),
        // Says what is wrong with the deployment, not just "PermissionDenied".
        SourceError::Refused { .. } => format!("the SPIRE agent at {} {error}", agent.display()),
        _ => format!("the SPIRE agent at {}: {error}", agent.display()),
    })]
    Agent { agent: PathBuf, error: SourceError },
    #[error("no identity from the SPIRE agent at {agent} within {budget:?}{}", if *.empty_updates > 0 { " (the agent has no registration entry matching this workload)" } else { "" })]
    NoIdentity {
        agent: PathBuf,
        budget: Duration,
        empty_updates: u32,
    },
    #[error("no trust bundle from the SPIRE agent at {agent} within {budget:?}")]
    NoBundle { agent: PathBuf, budget: Duration },
    #[error("no JWT bundle for {} from the SPIRE agent at {} within {budget:?}", trust_domain.id(), agent.display())]
    NoJwtBundle {
        agent: PathBuf,
        trust_domain: TrustDomain,
        budget: Duration,
    },
    #[error("the SPIRE agent at {} minted no JWT-SVID for {spiffe_id} (audience {audience:?}){}", agent.display(), if *.timed_out { " in time" } else { "" })]
    NoJwt {
        agent: PathBuf,
        spiffe_id: String,
        audience: Vec<String>,
        timed_out: bool,
    },
    #[error("no SVID with hint {hint:?} among {available:?}")]
    NoSuchHint {
        hint: String,
        available: Vec<String>,
    },
    #[error("the agent issued {got} but the annotation expects {expected}")]
    UnexpectedSpiffeId { expected: String, got: String },
    #[error("the trust bundle of {} is missing from the agent's bundles", trust_domain.id())]
    MissingTrustDomain { trust_domain: TrustDomain },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error("selectors attestation needs the kubelet's pod list: set kubelet_url")]
    NoKubelet,
    #[error(transparent)]
    Naming(#[from] NamingError),
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(
        "the start guard is on but its binary is not installed under the artifact root (see the daemon's start-up log)"
    )]
    GuardNotInstalled,
}

impl EngineError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidAnnotation(_) => "invalid_annotation",
            EngineError::MissingMount => "missing_mount",
            EngineError::Backend(_) => "backend",
            EngineError::ProcessGone { .. } => "process_gone",
            EngineError::ProcessMoved { .. } => "process_moved",
            EngineError::Agent { error, .. } => error.kind(),
            EngineError::NoIdentity { .. } => "no_identity",
            EngineError::NoBundle { .. } => "no_bundle",
            EngineError::NoJwtBundle { .. } => "no_jwt_bundle",
            EngineError::NoJwt { .. } => "no_jwt",
            EngineError::NoSuchHint { .. } => "no_such_hint",
            EngineError::UnexpectedSpiffeId { .. } => "unexpected_spiffe_id",
            EngineError::MissingTrustDomain { .. } => "missing_trust_domain",
            EngineError::Host(_) => "host",
            EngineError::Artifacts(e) if e.is_no_space() => "no_space",
            EngineError::Artifacts(_) => "write",
            EngineError::NoKubelet => "no_kubelet",
            EngineError::Naming(NamingError::Kubelet(_)) => "kubelet",
            EngineError::Naming(NamingError::Selectors(_)) => "selectors",
            EngineError::Naming(NamingError::EphemeralContainer) => "ephemeral_container",
            EngineError::Label(_) => "selinux_label",
            EngineError::Limit(_) => "limit",
            EngineError::GuardNotInstalled => "guard_not_installed",
        }
    }
}

/// An error with its whole chain of causes, for logs and for the runtime's message: "staging
/// svid.pem" alone does not say "no space left on device". A cause whose text is already in
/// the message is not repeated.
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut message = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&message)
    }
}

/// An [`EngineError`] for one container: its message names the pod and container, and
/// prints the error.
#[derive(Debug, thiserror::Error)]
pub struct ContainerError {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub error: Box<EngineError>,
}

impl std::fmt::Display for ContainerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.error {
            // Already names the pod, the container, the annotation key and the field.
            EngineError::InvalidAnnotation(e) => write!(f, "{e}"),
            e => write!(
                f,
                "pod {}/{} container {}: {e}",
                self.namespace, self.pod, self.container
            ),
        }
    }
}

impl ContainerError {
    pub(super) fn new(pod: &PodInfo, container: &ContainerInfo, error: EngineError) -> Self {
        ContainerError {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: container.name.clone(),
            error: Box::new(error),
        }
    }
}

/// The runtime that connected cannot be served.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeError {
    #[error("the runtime calls itself {name:?}, which has no backend (containerd and cri-o have)")]
    Unknown { name: String },
    #[error(
        "the daemon is configured for runtime {configured} but {reported} connected: set runtime = \"{reported}\", or leave it unset to serve whichever connects"
    )]
    Mismatch {
        configured: RuntimeKind,
        reported: RuntimeKind,
    },
}
