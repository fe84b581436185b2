//! SPIRE's k8s workload attestor, emulated: the selectors it would produce for a container.
//!
//! On Kubernetes the SPIRE agent's `k8s` workload attestor cannot attest a container PID at
//! NRI StartContainer, because the kubelet does not know the container yet. So the daemon names
//! the workload by the selectors that attestor *would* produce, built here from the pod and
//! container metadata the runtime reports through NRI plus the few facts looked up elsewhere
//! (the service account; optionally the node name and owner references).
//!
//! Every value has exactly the attestor's format (SPIRE v1.13.3,
//! `pkg/agent/plugin/workloadattestor/k8s/k8s.go`, `getSelectorValuesFromPodInfo` and
//! `getSelectorValuesFromWorkloadContainerStatus`), so registration entries written for the
//! attestor match unchanged. The agent matches an entry when the entry's selectors are a subset
//! of the ones sent: a selector we cannot derive is left out and reported in
//! [`Derived::not_derived`] (only entries keyed by it miss), never guessed (a wrong value is a
//! silent miss, or a match the attestor would not make).
//!
//! This module is pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::fmt;

use nri_identity_backends::{ContainerInfo, PodInfo, RuntimeBackend};

use crate::spire::Selector;

/// The selector type of every selector the `k8s` workload attestor produces (the plugin's name).
pub const SELECTOR_TYPE: &str = "k8s";

/// Keys the kubelet adds to every sandbox's CRI labels (kubelet `kuberuntime/labels.go`
/// `newPodLabels`, overwriting a pod label of the same key) that the pod's `metadata.labels`
/// (what the attestor turns into `pod-label` selectors) does not carry. They, and the keys the
/// runtime adds ([`RuntimeBackend::sandbox_label_keys`]), are removed before deriving
/// `pod-label`.
///
/// A real pod label with one of these keys is lost too (the runtime overwrote its value); that
/// only makes entries keyed by it miss. Not removable: labels of the sandbox (pause) image's
/// config, which containerd also merges in; prefer the pod's labels from the kubelet, which
/// selectors mode always has.
pub const KUBELET_SANDBOX_LABELS: [&str; 3] = [
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
];

/// A pod's owner, from `metadata.ownerReferences`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// What is known about a Kubernetes container before it starts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct K8sWorkload {
    /// NRI `PodSandbox.namespace` (the kubelet's `pod.Namespace`).
    pub namespace: String,
    /// NRI `PodSandbox.name` (`pod.Name`; a static pod's carries the `-<node>` suffix already).
    pub pod_name: String,
    /// NRI `PodSandbox.uid` (`pod.UID`, verbatim: a dashed UUID, or the kubelet's 32-hex hash
    /// for a static pod without `metadata.uid`).
    pub pod_uid: String,
    /// The pod's labels, with what the kubelet and the runtime added removed.
    pub pod_labels: BTreeMap<String, String>,
    /// The pod's `spec.serviceAccountName`, which neither CRI nor NRI carries. `None`: not
    /// known (an error). `Some("")`: the pod has none (static pods), and the attestor then
    /// sends `k8s:sa:` with an empty name, so we do too.
    pub service_account: Option<String>,
    /// NRI `Container.name` (the container's name in the pod spec).
    pub container_name: String,
    /// The container's image reference ([`RuntimeBackend::image_reference`]).
    pub image: Option<String>,
    /// The kubelet's node name (`spec.nodeName`): configuration, not NRI; never the hostname
    /// guessed (`--hostname-override` changes it).
    pub node_name: Option<String>,
    /// The pod's owner references, which NRI does not carry. `None`: unknown (the
    /// `pod-owner` selectors are then not derived); `Some(vec![])`: the pod has no owner.
    pub owner_references: Option<Vec<OwnerReference>>,
}

impl K8sWorkload {
    /// Everything the runtime tells about the workload; the service account, node name and
    /// owners are left unknown for the caller to fill in.
    pub fn from_runtime(
        pod: &PodInfo,
        container: &ContainerInfo,
        runtime: &dyn RuntimeBackend,
    ) -> K8sWorkload {
        let added = runtime.sandbox_label_keys();
        K8sWorkload {
            namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            pod_uid: pod.uid.clone(),
            pod_labels: pod
                .labels
                .iter()
                .filter(|(k, _)| !added.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_account: None,
            container_name: container.name.clone(),
            image: runtime.image_reference(container).map(str::to_owned),
            node_name: None,
            owner_references: None,
        }
    }
}

/// An attestor selector left out, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotDerived {
    /// The selector, as `k8s:<name>` (values vary).
    pub selector: &'static str,
    pub why: &'static str,
}

impl fmt::Display for NotDerived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.selector, self.why)
    }
}

/// The selectors to send, and the attestor's selectors that could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derived {
    /// Sorted and de-duplicated; all of type [`SELECTOR_TYPE`], none with an empty value.
    pub selectors: Vec<Selector>,
    pub not_derived: Vec<NotDerived>,
}

/// Why no selectors can be derived: without these the set would lack a selector the attestor
/// always sends, so entries keyed by it would silently miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sSelectorError {
    #[error("service account of pod {namespace}/{pod} unknown")]
    ServiceAccountUnknown { namespace: String, pod: String },
    #[error("pod {namespace}/{pod} has no {what} in the runtime's metadata (not a kubelet pod?)")]
    MissingMetadata {
        namespace: String,
        pod: String,
        what: &'static str,
    },
}

/// Attestor selectors that come from the kubelet's pod *status*, which does not describe the
/// container before it runs (or from outside the pod), so are never derived.
const STATUS_ONLY: [NotDerived; 7] = [
    NotDerived {
        selector: "k8s:pod-image",
        why: "image and image ID of every container status in the pod: status, changes as \
              containers start",
    },
    NotDerived {
        selector: "k8s:pod-image-count",
        why: "number of container statuses: status; NRI does not report the pod spec",
    },
    NotDerived {
        selector: "k8s:pod-init-image",
        why: "image and image ID of every init container status: status",
    },
    NotDerived {
        selector: "k8s:pod-init-image-count",
        why: "number of init container statuses: status; NRI does not report the pod spec",
    },
    NotDerived {
        selector: "k8s:container-image",
        why: "the image ID form (`<repo>@sha256:…` or `sha256:…`) is the runtime's first repo \
              digest, in status only",
    },
    NotDerived {
        selector: "k8s:image-signature",
        why: "sigstore selectors (when the agent verifies signatures) come from verifying the \
              status image ID",
    },
    NotDerived {
        selector: "k8s:ns-label",
        why: "namespace labels (newer agents, opt-in) come from the API server",
    },
];

/// Derives the `k8s` selectors the attestor would produce for this container, with container
/// selectors enabled (the attestor's default).
pub fn selectors(input: &K8sWorkload) -> Result<Derived, K8sSelectorError> {
    let missing = |what| K8sSelectorError::MissingMetadata {
        namespace: input.namespace.clone(),
        pod: input.pod_name.clone(),
        what,
    };
    if input.namespace.is_empty() {
        return Err(missing("namespace"));
    }
    if input.pod_name.is_empty() {
        return Err(missing("pod name"));
    }
    if input.pod_uid.is_empty() {
        return Err(missing("pod UID"));
    }
    if input.container_name.is_empty() {
        return Err(missing("container name"));
    }
    let Some(sa) = &input.service_account else {
        return Err(K8sSelectorError::ServiceAccountUnknown {
            namespace: input.namespace.clone(),
            pod: input.pod_name.clone(),
        });
    };

    let mut values = vec![
        format!("sa:{sa}"),
        format!("ns:{}", input.namespace),
        format!("pod-uid:{}", input.pod_uid),
        format!("pod-name:{}", input.pod_name),
        format!("container-name:{}", input.container_name),
    ];
    let mut not_derived = Vec::new();

    match input.node_name.as_deref().filter(|n| !n.is_empty()) {
        Some(node) => values.push(format!("node-name:{node}")),
        None => not_derived.push(NotDerived {
            selector: "k8s:node-name",
            why: "the kubelet's node name is not configured",
        }),
    }

    for (k, v) in &input.pod_labels {
        if k.is_empty() || KUBELET_SANDBOX_LABELS.contains(&k.as_str()) {
            continue;
        }
        values.push(format!("pod-label:{k}:{v}"));
    }

    match &input.owner_references {
        Some(owners) => {
            for o in owners {
                values.push(format!("pod-owner:{}:{}", o.kind, o.name));
                values.push(format!("pod-owner-uid:{}:{}", o.kind, o.uid));
            }
        }
        None => {
            not_derived.push(NotDerived {
                selector: "k8s:pod-owner",
                why: "owner references are not in NRI and were not looked up",
            });
            not_derived.push(NotDerived {
                selector: "k8s:pod-owner-uid",
                why: "owner references are not in NRI and were not looked up",
            });
        }
    }

    match input.image.as_deref().map(status_image) {
        Some(Ok(image)) => values.push(format!("container-image:{image}")),
        Some(Err(why)) => not_derived.push(NotDerived {
            selector: "k8s:container-image",
            why,
        }),
        None => not_derived.push(NotDerived {
            selector: "k8s:container-image",
            why: "the runtime reports no image for the container",
        }),
    }
    not_derived.extend(STATUS_ONLY);

    let mut selectors: Vec<Selector> = values
        .into_iter()
        .map(|value| Selector::new(SELECTOR_TYPE, value))
        .collect();
    selectors.sort();
    selectors.dedup();
    Ok(Derived {
        selectors,
        not_derived,
    })
}

/// The tag form of `containerStatus.image` for a container created from `reference`.
///
/// containerd reports the image's first tag in Docker-normalized form
/// (`docker.io/library/busybox:1.36`), and the image ID (`sha256:…`) when the image has no tag.
/// A tagged reference is normalized the same way (`distribution/reference`
/// `ParseDockerRef`): Docker Hub domain and `library/` added, `:latest` when untagged. The
/// result equals the status image unless the image carries several tags and another one sorts
/// first (the status then names that one, so an entry on the image selector must name the tag
/// the status shows); it is always a tag the image has. Digest-pinned references and image IDs
/// are not derived: the status would show some tag of the image or its ID.
fn status_image(reference: &str) -> Result<String, &'static str> {
    const DIGESTED: &str = "the image is pinned by digest, so the kubelet reports another tag \
                            of it or its image ID";
    if reference.is_empty()
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("the runtime's image reference is not a valid reference");
    }
    if reference.contains('@') || reference.starts_with("sha256:") || is_hex64(reference) {
        return Err(DIGESTED);
    }
    let (domain, remote) = match reference.split_once('/') {
        None => ("docker.io", reference),
        Some(("index.docker.io", rest)) => ("docker.io", rest),
        Some((first, rest))
            if first == "localhost"
                || first.contains(['.', ':'])
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        Some(_) => ("docker.io", reference),
    };
    let library = if domain == "docker.io" && !remote.contains('/') {
        "library/"
    } else {
        ""
    };
    let last = remote.rsplit('/').next().unwrap_or(remote);
    let (repo, tag) = match last.split_once(':') {
        Some((_, tag)) => (&remote[..remote.len() - tag.len() - 1], tag),
        None => (remote, "latest"),
    };
    if repo.is_empty() || tag.is_empty() || repo.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("the runtime's image reference is not a valid reference");
    }
    Ok(format!("{domain}/{library}{repo}:{tag}"))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests;
