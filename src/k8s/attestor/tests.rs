use nri_identity_backends::{Containerd, CriO};

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A minimal known workload: everything the attestor always sends is present.
fn workload() -> K8sWorkload {
    K8sWorkload {
        namespace: "ns1".into(),
        pod_name: "pod1".into(),
        pod_uid: "11111111-2222-3333-4444-555555555555".into(),
        pod_labels: BTreeMap::new(),
        service_account: Some("sa1".into()),
        container_name: "c0".into(),
        image: None,
        node_name: None,
        owner_references: None,
    }
}

fn values(input: &K8sWorkload) -> Vec<String> {
    let d = selectors(input).unwrap();
    assert!(d.selectors.iter().all(|s| s.kind == "k8s"));
    d.selectors.into_iter().map(|s| s.value).collect()
}

fn not_derived(input: &K8sWorkload) -> Vec<&'static str> {
    selectors(input)
        .unwrap()
        .not_derived
        .into_iter()
        .map(|n| n.selector)
        .collect()
}

#[test]
fn golden_deployment_pod_on_containerd_gives_the_attestors_values() {
    let pod = PodInfo {
        namespace: "payments".into(),
        name: "api-7d9f8c6b5-x2k4p".into(),
        uid: "3f1c2a9e-8b7d-4e6f-a1b2-c3d4e5f60718".into(),
        // As containerd 2.x reports them in NRI PodSandbox.labels.
        labels: labels(&[
            ("app", "api"),
            ("app.kubernetes.io/part-of", "shop"),
            ("pod-template-hash", "7d9f8c6b5"),
            ("io.kubernetes.pod.name", "api-7d9f8c6b5-x2k4p"),
            ("io.kubernetes.pod.namespace", "payments"),
            (
                "io.kubernetes.pod.uid",
                "3f1c2a9e-8b7d-4e6f-a1b2-c3d4e5f60718",
            ),
            ("io.cri-containerd.kind", "sandbox"),
            ("oci_runtime_type", "io.containerd.runc.v2"),
            ("selinux_label", ""),
        ]),
        ..Default::default()
    };
    let c = ContainerInfo {
        name: "server".into(),
        image: "ghcr.io/acme/api:v2.1.0".into(),
        ..Default::default()
    };
    let mut input = K8sWorkload::from_runtime(&pod, &c, &Containerd);
    input.service_account = Some("api".into());
    input.node_name = Some("node-a".into());
    input.owner_references = Some(vec![OwnerReference {
        kind: "ReplicaSet".into(),
        name: "api-7d9f8c6b5".into(),
        uid: "0b6a4f2e-1c3d-4e5f-8a9b-0c1d2e3f4a5b".into(),
    }]);
    assert_eq!(
        values(&input),
        [
            "container-image:ghcr.io/acme/api:v2.1.0",
            "container-name:server",
            "node-name:node-a",
            "ns:payments",
            "pod-label:app.kubernetes.io/part-of:shop",
            "pod-label:app:api",
            "pod-label:pod-template-hash:7d9f8c6b5",
            "pod-name:api-7d9f8c6b5-x2k4p",
            "pod-owner-uid:ReplicaSet:0b6a4f2e-1c3d-4e5f-8a9b-0c1d2e3f4a5b",
            "pod-owner:ReplicaSet:api-7d9f8c6b5",
            "pod-uid:3f1c2a9e-8b7d-4e6f-a1b2-c3d4e5f60718",
            "sa:api",
        ]
    );
    // Only what comes from the pod status (or outside the pod) is missing.
    assert_eq!(
        not_derived(&input),
        [
            "k8s:pod-image",
            "k8s:pod-image-count",
            "k8s:pod-init-image",
            "k8s:pod-init-image-count",
            "k8s:container-image",
            "k8s:image-signature",
            "k8s:ns-label",
        ]
    );
}

#[test]
fn entries_keyed_by_ns_and_sa_or_container_name_are_subsets_of_what_is_sent() {
    let sent = selectors(&workload()).unwrap().selectors;
    for entry in [
        &["ns:ns1", "sa:sa1"][..],
        &["container-name:c0"],
        &["ns:ns1", "pod-uid:11111111-2222-3333-4444-555555555555"],
        &["pod-name:pod1", "ns:ns1"],
    ] {
        for value in entry {
            let s = Selector {
                kind: "k8s".into(),
                value: (*value).into(),
            };
            assert!(sent.contains(&s), "{value} missing from {sent:?}");
        }
    }
}

#[test]
fn kubelet_bookkeeping_labels_are_not_sent_as_pod_labels() {
    let mut input = workload();
    input.pod_labels = labels(&[
        ("io.kubernetes.pod.name", "pod1"),
        ("io.kubernetes.pod.namespace", "ns1"),
        (
            "io.kubernetes.pod.uid",
            "11111111-2222-3333-4444-555555555555",
        ),
        ("app", "web"),
    ]);
    let v = values(&input);
    assert!(v.contains(&"pod-label:app:web".to_owned()));
    assert!(
        !v.iter().any(|s| s.starts_with("pod-label:io.kubernetes.")),
        "{v:?}"
    );
}

#[test]
fn runtime_sandbox_labels_of_cri_o_and_containerd_are_not_sent() {
    let pod = |pairs: &[(&str, &str)]| PodInfo {
        namespace: "ns1".into(),
        name: "pod1".into(),
        uid: "u1".into(),
        labels: labels(pairs),
        ..Default::default()
    };
    let c = ContainerInfo {
        name: "c0".into(),
        ..Default::default()
    };
    let containerd = pod(&[
        ("io.cri-containerd.kind", "sandbox"),
        ("oci_runtime_type", "io.containerd.runc.v2"),
        ("selinux_label", "system_u:system_r:container_t:s0:c1,c2"),
    ]);
    let crio = pod(&[("io.kubernetes.container.name", "POD")]);
    for (pod, runtime) in [
        (&containerd, &Containerd as &dyn RuntimeBackend),
        (&crio, &CriO),
    ] {
        let mut input = K8sWorkload::from_runtime(pod, &c, runtime);
        input.service_account = Some("sa1".into());
        let v = values(&input);
        assert!(!v.iter().any(|s| s.starts_with("pod-label:")), "{v:?}");
    }
}

#[test]
fn only_the_exact_runtime_keys_are_stripped_not_their_prefixes() {
    let mut input = workload();
    input.pod_labels = labels(&[
        ("io.kubernetes.pod.team", "blue"),
        ("app.kubernetes.io/name", "web"),
        ("io.cri-containerd.custom", "x"),
    ]);
    assert!(values(&input).starts_with(&[
        "container-name:c0".to_owned(),
        "ns:ns1".to_owned(),
        "pod-label:app.kubernetes.io/name:web".to_owned(),
        "pod-label:io.cri-containerd.custom:x".to_owned(),
        "pod-label:io.kubernetes.pod.team:blue".to_owned(),
    ]));
}

#[test]
fn an_empty_label_value_is_sent_with_a_trailing_colon_like_the_attestor() {
    let mut input = workload();
    input.pod_labels = labels(&[("canary", "")]);
    assert!(values(&input).contains(&"pod-label:canary:".to_owned()));
}

#[test]
fn colons_slashes_and_unicode_in_labels_pass_through_verbatim() {
    let mut input = workload();
    input.pod_labels = labels(&[("example.com/tier", "a:b:c"), ("équipe", "café\u{301}")]);
    let v = values(&input);
    assert!(v.contains(&"pod-label:example.com/tier:a:b:c".to_owned()));
    // No Unicode normalization: the attestor formats Go strings byte for byte.
    assert!(v.contains(&"pod-label:équipe:café\u{301}".to_owned()));
}

#[test]
fn a_label_with_an_empty_key_is_dropped() {
    let mut input = workload();
    input.pod_labels = labels(&[("", "x")]);
    assert!(!values(&input).iter().any(|s| s.starts_with("pod-label:")));
}

#[test]
fn an_unknown_service_account_fails_naming_the_pod() {
    let mut input = workload();
    input.service_account = None;
    let err = selectors(&input).unwrap_err();
    assert_eq!(
        err,
        K8sSelectorError::ServiceAccountUnknown {
            namespace: "ns1".into(),
            pod: "pod1".into()
        }
    );
    assert_eq!(err.to_string(), "service account of pod ns1/pod1 unknown");
}

#[test]
fn a_static_pod_without_service_account_sends_an_empty_sa_like_the_attestor() {
    let mut input = workload();
    input.pod_name = "etcd-node-a".into();
    input.pod_uid = "2b3c4d5e6f708192a3b4c5d6e7f80912".into(); // the kubelet's hash UID
    input.service_account = Some(String::new());
    let v = values(&input);
    assert!(v.contains(&"sa:".to_owned()), "{v:?}");
    assert!(v.contains(&"pod-uid:2b3c4d5e6f708192a3b4c5d6e7f80912".to_owned()));
}

#[test]
fn a_pod_without_uid_namespace_name_or_container_name_is_an_error() {
    for (field, what) in [
        (0, "pod UID"),
        (1, "namespace"),
        (2, "pod name"),
        (3, "container name"),
    ] {
        let mut input = workload();
        match field {
            0 => input.pod_uid.clear(),
            1 => input.namespace.clear(),
            2 => input.pod_name.clear(),
            _ => input.container_name.clear(),
        }
        match selectors(&input) {
            Err(K8sSelectorError::MissingMetadata { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn an_unconfigured_node_name_is_reported_not_guessed() {
    let mut input = workload();
    assert!(!values(&input).iter().any(|s| s.starts_with("node-name:")));
    assert!(not_derived(&input).contains(&"k8s:node-name"));
    input.node_name = Some(String::new());
    assert!(not_derived(&input).contains(&"k8s:node-name"));
    input.node_name = Some("node-a".into());
    assert!(values(&input).contains(&"node-name:node-a".to_owned()));
    assert!(!not_derived(&input).contains(&"k8s:node-name"));
}

#[test]
fn unknown_owners_are_reported_and_known_owners_give_kind_name_and_kind_uid() {
    let mut input = workload();
    assert!(not_derived(&input).contains(&"k8s:pod-owner"));
    assert!(not_derived(&input).contains(&"k8s:pod-owner-uid"));

    input.owner_references = Some(vec![]);
    assert!(!not_derived(&input).contains(&"k8s:pod-owner"));
    assert!(!values(&input).iter().any(|s| s.starts_with("pod-owner")));

    input.owner_references = Some(vec![
        OwnerReference {
            kind: "StatefulSet".into(),
            name: "db".into(),
            uid: "u-1".into(),
        },
        OwnerReference {
            kind: "Node".into(),
            name: "node-a".into(),
            uid: "u-2".into(),
        },
    ]);
    let v = values(&input);
    for s in [
        "pod-owner:StatefulSet:db",
        "pod-owner-uid:StatefulSet:u-1",
        "pod-owner:Node:node-a",
        "pod-owner-uid:Node:u-2",
    ] {
        assert!(v.contains(&s.to_owned()), "{s} in {v:?}");
    }
}

#[test]
fn image_references_are_normalized_like_the_kubelets_status_image() {
    for (spec, status) in [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
        ("acme/api:v1", "docker.io/acme/api:v1"),
        ("docker.io/acme/api", "docker.io/acme/api:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/busybox:1", "docker.io/library/busybox:1"),
        (
            "ghcr.io/spiffe/spire-agent:1.13.3",
            "ghcr.io/spiffe/spire-agent:1.13.3",
        ),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/team/app:dev", "localhost:5000/team/app:dev"),
        ("registry:5000/app", "registry:5000/app:latest"),
        // Already normalized (NRI Container.image.name): unchanged.
        (
            "docker.io/library/busybox:1.36",
            "docker.io/library/busybox:1.36",
        ),
    ] {
        assert_eq!(status_image(spec).as_deref(), Ok(status), "{spec}");
    }
}

#[test]
fn a_digest_pinned_image_or_image_id_is_not_derived() {
    let digest = "sha256:9ae97d36d26566ff84e8893c64a6dc4fe8ca6d1144bf5b87b2b85a32def253c7";
    for image in [
        format!("busybox@{digest}"),
        format!("busybox:1.36@{digest}"),
        digest.to_owned(),
        digest["sha256:".len()..].to_owned(),
    ] {
        let mut input = workload();
        input.image = Some(image.clone());
        assert!(
            !values(&input)
                .iter()
                .any(|s| s.starts_with("container-image:")),
            "{image}"
        );
        let reasons: Vec<_> = selectors(&input)
            .unwrap()
            .not_derived
            .into_iter()
            .filter(|n| n.selector == "k8s:container-image")
            .collect();
        assert_eq!(reasons.len(), 2, "{image}: tag form and image ID form");
    }
}

#[test]
fn an_invalid_or_missing_image_sends_no_container_image() {
    for image in [
        None,
        Some(""),
        Some("Busybox"),
        Some("a b"),
        Some("busybox:"),
    ] {
        let mut input = workload();
        input.image = image.map(str::to_owned);
        assert!(
            !values(&input)
                .iter()
                .any(|s| s.starts_with("container-image:")),
            "{image:?}"
        );
    }
}

#[test]
fn selectors_are_sorted_deduplicated_and_never_empty_valued() {
    let mut input = workload();
    // Two identical owner references give the same two values twice.
    let owner = OwnerReference {
        kind: "Job".into(),
        name: "j".into(),
        uid: "u".into(),
    };
    input.owner_references = Some(vec![owner.clone(), owner]);
    let sent = selectors(&input).unwrap().selectors;
    let mut sorted = sent.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sent, sorted);
    // The agent's delegated API rejects a request with an empty selector value.
    assert!(sent.iter().all(|s| !s.value.is_empty()));
}

#[test]
fn from_runtime_prefers_the_nri_image_and_falls_back_to_containerds_annotation() {
    let pod = PodInfo {
        uid: "u".into(),
        name: "p".into(),
        namespace: "n".into(),
        labels: labels(&[("app", "a")]),
        ..Default::default()
    };
    let mut c = ContainerInfo {
        name: "c".into(),
        annotations: labels(&[(
            nri_identity_backends::CONTAINERD_IMAGE_ANNOTATION,
            "busybox:1.36",
        )]),
        ..Default::default()
    };
    let w = K8sWorkload::from_runtime(&pod, &c, &Containerd);
    assert_eq!(w.image.as_deref(), Some("busybox:1.36"));
    assert_eq!(
        (
            w.namespace.as_str(),
            w.pod_name.as_str(),
            w.pod_uid.as_str()
        ),
        ("n", "p", "u")
    );
    assert_eq!(w.container_name, "c");
    assert_eq!(w.service_account, None);
    assert_eq!(w.owner_references, None);

    c.image = "docker.io/library/busybox:1.36".into();
    let w = K8sWorkload::from_runtime(&pod, &c, &Containerd);
    assert_eq!(w.image.as_deref(), Some("docker.io/library/busybox:1.36"));
}

#[test]
fn not_derived_entries_explain_themselves() {
    let d = selectors(&workload()).unwrap();
    let text: Vec<String> = d.not_derived.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.starts_with("k8s:pod-image-count: ") && t.contains("status")),
        "{text:?}"
    );
    assert!(d.not_derived.iter().all(|n| !n.why.is_empty()));
}
