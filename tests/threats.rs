//! The threats of SECURITY.md that need the whole daemon to prove: what a pod author, a
//! container, many pods or a runtime that lies can and cannot make the daemon do. Real
//! engine and NRI plugin, fake runtime and agent, real files in a temporary artifact root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use crate::common::*;
use nri_identity_injector::limits::IdentityLimits;
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

fn key(container: &str) -> String {
    format!("identity.noderesource.dev/container.{container}")
}

/// Every path under `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

async fn remove_pod(bed: &Bed, pod: &pb::PodSandbox) {
    let _: pb::Empty = bed
        .conn
        .call(
            "RemovePodSandbox",
            &pb::RemovePodSandboxRequest {
                pod: Some(pod.clone()),
            },
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_naming_another_pods_container_gives_that_container_nothing() {
    let bed = Bed::new().await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    // The author of "evil" names container "db", which runs in another pod.
    let evil = annotated_pod("evil", "uid-evil", &[(&key("db"), value.as_str())]);
    let victim = annotated_pod("victim", "uid-victim", &[]);
    let db = container(&victim, "db", "ctr-db", 0);
    let created = bed.create(&victim, &db).await.unwrap();
    assert!(created.adjust.unwrap_or_default().mounts.is_empty());
    assert!(!bed.root.join("uid-victim").exists());
    // And the naming pod's own containers of other names get nothing either.
    let web = container(&evil, "web", "ctr-web", 0);
    let created = bed.create(&evil, &web).await.unwrap();
    assert!(created.adjust.unwrap_or_default().mounts.is_empty());
    assert!(tree(&bed.root).is_empty(), "{:?}", tree(&bed.root));
    assert!(bed.agent.stats().svid_subscriptions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotation_changed_after_creation_changes_nothing() {
    let bed = Bed::new().await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod("web", "uid-web", &[(&key("c0"), value.as_str())]);
    let c = container(&pod, "c0", "ctr-1", 4101);
    bed.process(4101, "ctr-1", 1001);
    let svid = bed.svid("/web");
    bed.serve_pid(4101, svid.clone());
    let created = bed.create(&pod, &c).await.unwrap();
    assert_eq!(created.adjust.unwrap().mounts[0].destination, "/var/certs");

    // By StartContainer the pod claims another directory, other file names and the
    // runtime's own socket as its agent.
    let changed = "cert_dir: /etc\nspire_agent_address: /run/containerd/containerd.sock\nsvid_file_name: passwd\nkey_file_mode: \"0644\"\n";
    let mut later = pod.clone();
    later.annotations.insert(key("c0"), changed.to_owned());
    bed.start(&later, &c).await.unwrap();
    let dir = bed.dir("uid-web", "ctr-1");
    let mut names = tree(&dir);
    names.sort();
    assert_eq!(names, ["svid.pem", "svid_bundle.pem", "svid_key.pem"]);
    let key_mode = std::fs::metadata(dir.join("svid_key.pem"))
        .unwrap()
        .permissions()
        .mode();
    // The agent named at creation served it (the runtime's socket would not have).
    assert_eq!(key_mode & 0o777, 0o600);
    assert_eq!(bed.agent.stats().svid_subscriptions.len(), 1);

    // Rotations keep to what was validated at creation.
    let rotated = bed.svid("/web");
    bed.serve_pid(4101, rotated.clone());
    assert!(bed.wait_leaf(&dir.join("svid.pem"), &rotated).await);
    assert!(!dir.join("passwd").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sibling_containers_get_separate_directories_and_private_keys() {
    let bed = Bed::new().await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod(
        "web",
        "uid-pair",
        &[("identity.noderesource.dev/pod", value.as_str())],
    );
    let mut mounts = Vec::new();
    let mut svids = Vec::new();
    for (i, (name, uid)) in [("app", 1001u32), ("sidecar", 1002)].iter().enumerate() {
        let pid = 4201 + i as u32;
        let id = format!("ctr-{name}");
        let c = container(&pod, name, &id, pid);
        bed.process(pid, &id, *uid);
        let svid = bed.svid(&format!("/{name}"));
        bed.serve_pid(pid, svid.clone());
        let created = bed.create(&pod, &c).await.unwrap();
        mounts.push(created.adjust.unwrap().mounts.remove(0).source);
        bed.start(&pod, &c).await.unwrap();
        svids.push((id, *uid, svid));
    }
    assert_ne!(
        mounts[0], mounts[1],
        "each container mounts its own directory"
    );
    for ((id, uid, svid), source) in svids.iter().zip(&mounts) {
        let dir = bed.dir("uid-pair", id);
        assert_eq!(
            Path::new(source),
            dir,
            "the mount is the container's directory only"
        );
        let key = dir.join("svid_key.pem");
        let meta = std::fs::metadata(&key).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (*uid, 0o600));
        assert_eq!(
            pem_blocks(&std::fs::read(&key).unwrap(), "PRIVATE KEY"),
            vec![svid.private_key.to_vec()],
            "each directory holds its own container's key"
        );
    }
    // Above the container directories, only root may enter.
    for dir in [bed.root.clone(), bed.root.join("uid-pair")] {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700, "{}", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_reporting_traversing_ids_gets_nothing_outside_the_root() {
    let bed = Bed::new().await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let outside = bed.root.parent().unwrap().to_path_buf();
    let before = tree(&outside);
    for (i, (pod_uid, container_id)) in [
        ("..", "escape"),
        ("uid-ok", ".."),
        ("uid-ok", "../../escape"),
        ("a/../..", "escape"),
        ("/tmp", "escape"),
        ("", ""),
        ("uid-ok", "nul\0byte"),
    ]
    .iter()
    .enumerate()
    {
        let mut pod = annotated_pod("web", pod_uid, &[(&key("c0"), value.as_str())]);
        // A runtime without a UID falls back to the sandbox ID: lie in that too.
        pod.id = (*pod_uid).to_owned();
        let c = container(&pod, "c0", container_id, 4300 + i as u32);
        let err = bed.create(&pod, &c).await.unwrap_err();
        assert_eq!(err.code, Code::Internal, "{pod_uid:?}/{container_id:?}");
        // Remove and sweep must not follow the lie either.
        bed.remove(&pod, &c).await;
        remove_pod(&bed, &pod).await;
    }
    let after = tree(&outside);
    let new: Vec<_> = after
        .iter()
        .filter(|p| !before.contains(p) && !p.starts_with("artifacts"))
        .collect();
    assert!(new.is_empty(), "written outside the root: {new:?}");
    assert!(bed.root.is_dir(), "the root itself stays");
}

fn limits(per_pod: usize, total: usize) -> Tweak {
    Arc::new(move |cfg| cfg.limits = IdentityLimits { per_pod, total })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_over_its_identity_limit_is_refused_at_create_naming_the_setting() {
    let bed = Bed::with(None, limits(2, 10)).await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod(
        "many",
        "uid-many",
        &[("identity.noderesource.dev/pod", value.as_str())],
    );
    let cs: Vec<_> = (0..3)
        .map(|i| container(&pod, &format!("c{i}"), &format!("ctr-m{i}"), 0))
        .collect();
    bed.create(&pod, &cs[0]).await.unwrap();
    bed.create(&pod, &cs[1]).await.unwrap();
    let err = bed.create(&pod, &cs[2]).await.unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    for needle in ["default/many", "c2", "max_identities_per_pod"] {
        assert!(
            err.message.contains(needle),
            "{:?} lacks {needle}",
            err.message
        );
    }
    assert!(!bed.dir("uid-many", "ctr-m2").exists(), "nothing written");
    assert_eq!(bed.daemon.metrics.failures("limit"), 1);

    // A removed container frees its place; the kubelet's retry then succeeds.
    bed.remove(&pod, &cs[1]).await;
    bed.create(&pod, &cs[2]).await.unwrap();
    assert!(bed.dir("uid-many", "ctr-m2").is_dir());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_limit_refuses_new_identities_until_a_pod_is_removed() {
    let mut bed = Bed::with(None, limits(2, 3)).await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pods: Vec<_> = (0..3)
        .map(|i| {
            annotated_pod(
                &format!("p{i}"),
                &format!("uid-p{i}"),
                &[("identity.noderesource.dev/pod", value.as_str())],
            )
        })
        .collect();
    let c = |p: usize, n: usize| container(&pods[p], &format!("c{n}"), &format!("ctr-{p}-{n}"), 0);
    bed.create(&pods[0], &c(0, 0)).await.unwrap();
    bed.create(&pods[0], &c(0, 1)).await.unwrap();
    bed.create(&pods[1], &c(1, 0)).await.unwrap();
    let err = bed.create(&pods[2], &c(2, 0)).await.unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    for needle in ["default/p2", "c0", "max_identities"] {
        assert!(
            err.message.contains(needle),
            "{:?} lacks {needle}",
            err.message
        );
    }
    assert!(!bed.root.join("uid-p2").exists());

    // RemovePodSandbox frees every identity of the pod.
    remove_pod(&bed, &pods[0]).await;
    bed.create(&pods[2], &c(2, 0)).await.unwrap();

    // A restarted daemon counts what the runtime still runs.
    let mut listed = vec![c(1, 0), c(2, 0)];
    for ctr in &mut listed {
        ctr.state = pb::ContainerState::ContainerCreated as i32;
    }
    bed.restart_daemon(vec![pods[1].clone(), pods[2].clone()], listed)
        .await;
    bed.create(&pods[1], &c(1, 1)).await.unwrap();
    let err = bed.create(&pods[2], &c(2, 1)).await.unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted, "{}", err.message);
}
