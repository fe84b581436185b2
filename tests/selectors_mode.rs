//! Selectors mode (Kubernetes): the daemon names the workload to the agent by the `k8s`
//! selectors it derives from the runtime's pod metadata and the kubelet's pod list, and the
//! files are in place at CreateContainer, before the container exists.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use nri_identity_injector::spire::fake::WorkloadKey;
use nri_identity_injector::spire::{Selector, SvidUpdate};
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn entry(selectors: &[&str]) -> WorkloadKey {
    WorkloadKey::Selectors(selectors.iter().map(|s| sel(s)).collect::<BTreeSet<_>>())
}

/// A pod as containerd reports it: the kubelet's bookkeeping labels next to the pod's own.
fn k8s_pod(bed: &Bed, namespace: &str, name: &str, uid: &str) -> pb::PodSandbox {
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let mut pod = annotated_pod(
        name,
        uid,
        &[("identity.noderesource.dev/container.c0", value.as_str())],
    );
    pod.namespace = namespace.into();
    pod.labels = [
        ("app", "web"),
        ("io.kubernetes.pod.name", name),
        ("io.kubernetes.pod.namespace", namespace),
        ("io.kubernetes.pod.uid", uid),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_is_on_disk_when_create_container_returns() {
    let kubelet = FakeKubelet::start().await;
    kubelet.add_pod("uid-web", "web-sa", &[("app", "web")]);
    let bed = Bed::with_kubelet(&kubelet).await;
    let svid = bed.svid("/ns/prod/sa/web-sa");
    bed.agent.set_svids(
        entry(&["k8s:ns:prod", "k8s:sa:web-sa"]),
        SvidUpdate {
            svids: vec![svid.clone()],
            federates_with: vec![],
        },
    );
    let pod = k8s_pod(&bed, "prod", "web", "uid-web");
    // No PID at CreateContainer, and none is needed.
    let c = container(&pod, "c0", "ctr-sel-1", 0);
    let created = bed.create(&pod, &c).await.unwrap();
    assert_eq!(created.adjust.unwrap().mounts.len(), 1);
    let dir = bed.dir("uid-web", "ctr-sel-1");
    let cert = std::fs::read(dir.join("svid.pem")).expect("files exist before the container does");
    assert_eq!(pem_blocks(&cert, "CERTIFICATE"), svid.cert_chain);

    // The agent was asked by exactly the attestor's selectors, without the kubelet's
    // bookkeeping labels.
    let asked: BTreeSet<String> = bed.agent.stats().svid_subscriptions[0]
        .selectors
        .iter()
        .map(|s| s.to_string())
        .collect();
    let expected: BTreeSet<String> = [
        "k8s:ns:prod",
        "k8s:sa:web-sa",
        "k8s:pod-name:web",
        "k8s:pod-uid:uid-web",
        "k8s:pod-label:app:web",
        "k8s:container-name:c0",
        "k8s:node-name:node-1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(asked, expected);

    // StartContainer has nothing left to do.
    let t = std::time::Instant::now();
    bed.start(&pod, &c).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(100));
    assert_eq!(
        bed.agent.stats().svid_subscriptions.len(),
        1,
        "no second subscription at start"
    );

    // Rotation follows the stream; removal cleans up.
    let rotated = bed.svid("/ns/prod/sa/web-sa");
    bed.agent.set_svids(
        entry(&["k8s:ns:prod", "k8s:sa:web-sa"]),
        SvidUpdate {
            svids: vec![rotated.clone()],
            federates_with: vec![],
        },
    );
    assert!(bed.wait_leaf(&dir.join("svid.pem"), &rotated).await);
    bed.remove(&pod, &c).await;
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_in_another_namespace_copying_labels_and_names_gets_nothing() {
    let kubelet = FakeKubelet::start().await;
    kubelet.add_pod("uid-evil", "web-sa", &[("app", "web")]);
    let bed = Bed::with_kubelet(&kubelet).await;
    // The workload's entry is keyed by namespace and service account.
    bed.agent.set_svids(
        entry(&["k8s:ns:prod", "k8s:sa:web-sa", "k8s:container-name:c0"]),
        SvidUpdate {
            svids: vec![bed.svid("/prod/web")],
            federates_with: vec![],
        },
    );
    let pod = k8s_pod(&bed, "evil", "web", "uid-evil");
    let c = container(&pod, "c0", "ctr-evil", 0);
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(
        err.message.contains("evil/web") && err.message.contains("no registration entry"),
        "{err}"
    );
    assert!(
        !bed.root.join("uid-evil").join("ctr-evil").exists(),
        "nothing left on disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_service_account_fails_clearly_and_leaves_nothing() {
    let kubelet = FakeKubelet::start().await;
    let bed = Bed::with_kubelet(&kubelet).await;
    let pod = k8s_pod(&bed, "prod", "ghost", "uid-ghost");
    let c = container(&pod, "c0", "ctr-ghost", 0);
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(
        err.message.contains("uid-ghost") && err.message.contains("prod/ghost"),
        "{err}"
    );
    assert!(!bed.root.join("uid-ghost").join("ctr-ghost").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_can_still_choose_pid_mode() {
    let kubelet = FakeKubelet::start().await;
    kubelet.add_pod("uid-pid", "web-sa", &[]);
    let bed = Bed::with_kubelet(&kubelet).await;
    let value = format!(
        "{}  attestation: pid\n",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    let pod = annotated_pod(
        "web",
        "uid-pid",
        &[("identity.noderesource.dev/container.c0", value.as_str())],
    );
    let c = container(&pod, "c0", "ctr-pid", 6001);
    bed.process(6001, "ctr-pid", 1001);
    bed.serve_pid(6001, bed.svid("/by-pid"));
    bed.create(&pod, &c).await.unwrap();
    assert!(
        !bed.dir("uid-pid", "ctr-pid").join("svid.pem").exists(),
        "PID mode delivers at start"
    );
    bed.start(&pod, &c).await.unwrap();
    assert!(bed.dir("uid-pid", "ctr-pid").join("svid.pem").exists());
    assert_eq!(bed.agent.stats().svid_subscriptions[0].pid, 6001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_runtime_reporting_the_user_the_pod_spec_names_the_owner() {
    use std::os::unix::fs::MetadataExt;
    let kubelet = FakeKubelet::start().await;
    // The pod's securityContext, and one container's own over it.
    kubelet.add_pod_with_spec(
        "uid-owner",
        "web-sa",
        &[],
        serde_json::json!({
            "securityContext": {"runAsUser": 1001, "runAsGroup": 1002},
            "containers": [
                {"name": "c0"},
                {"name": "c1", "securityContext": {"runAsUser": 1003}},
            ],
        }),
    );
    let bed = Bed::with_kubelet(&kubelet).await;
    bed.agent.set_svids(
        entry(&["k8s:ns:prod", "k8s:sa:web-sa"]),
        SvidUpdate {
            svids: vec![bed.svid("/ns/prod/sa/web-sa")],
            federates_with: vec![],
        },
    );
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let mut pod = k8s_pod(&bed, "prod", "web", "uid-owner");
    pod.annotations = [("identity.noderesource.dev/pod".to_string(), value)].into();
    let owner = |id: &str| {
        let m = std::fs::metadata(bed.dir("uid-owner", id).join("svid_key.pem")).unwrap();
        (m.uid(), m.gid())
    };

    // A runtime that reports no user (containerd before 2.3): the spec's.
    let c0 = container(&pod, "c0", "ctr-owner-0", 0);
    bed.create(&pod, &c0).await.unwrap();
    assert_eq!(owner("ctr-owner-0"), (1001, 1002));
    let c1 = container(&pod, "c1", "ctr-owner-1", 0);
    bed.create(&pod, &c1).await.unwrap();
    assert_eq!(
        owner("ctr-owner-1"),
        (1003, 1002),
        "the container's uid over the pod's"
    );

    // A runtime that reports one: it resolved the image's USER, so it wins.
    let mut c2 = container(&pod, "c0", "ctr-owner-2", 0);
    c2.user = Some(pb::User {
        uid: 2001,
        gid: 2002,
        additional_gids: vec![],
    });
    bed.create(&pod, &c2).await.unwrap();
    assert_eq!(owner("ctr-owner-2"), (2001, 2002));
}
