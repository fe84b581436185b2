//! CRI-O through the real daemon, with a fake NRI runtime that behaves as CRI-O v1.36 does:
//! it names itself `cri-o` at Configure, sends no PID at CreateContainer (runc has not run
//! yet), the init PID at StartContainer, names containers from `io.kubernetes.container.name`
//! and images from `io.kubernetes.cri-o.ImageName`, and only logs an error answered to
//! StartContainer before starting the container anyway. Only a CreateContainer error stops
//! a container there, so every refusal that matters must happen at CreateContainer.
//!
//! Every SELinux label choice is read back from the real files' `security.selinux`
//! attributes (settable by root on tmpfs and ext4 even where SELinux is not enabled).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::*;
use nri_identity_backends::{Attestation, RuntimeKind};
use nri_identity_injector::selinux::{LabelPolicy, SHARED_CONTAINER_FILE_LABEL};
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::{Code, Status};

const KEY: &str = "identity.noderesource.dev/container.c0";
const FILES: [&str; 3] = ["svid.pem", "svid_key.pem", "svid_bundle.pem"];

/// Setting `security.selinux` without an SELinux policy needs CAP_SYS_ADMIN.
fn can_label() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped: setting security.selinux needs root where SELinux is not enabled");
    false
}

/// The label of `path`, if it has one.
fn label_of(path: &Path) -> Option<String> {
    let mut buf = [0u8; 256];
    match rustix::fs::getxattr(path, "security.selinux", &mut buf) {
        Ok(n) => Some(
            String::from_utf8_lossy(&buf[..n])
                .trim_end_matches('\0')
                .to_owned(),
        ),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {}: {e}", path.display()),
    }
}

/// The directory and every identity file in it carry `expected` (`None`: no label).
#[track_caller]
fn assert_labels(dir: &Path, expected: Option<&str>) {
    assert_eq!(label_of(dir).as_deref(), expected, "{}", dir.display());
    for f in FILES {
        let path = dir.join(f);
        assert!(path.exists(), "{} missing", path.display());
        assert_eq!(label_of(&path).as_deref(), expected, "{}", path.display());
    }
}

/// A runtime state directory as CRI-O keeps it: each sandbox's OCI configuration with the
/// mount label CRI-O computed for the pod (CRI-O writes it wherever SELinux is enabled).
struct CrioState {
    dir: PathBuf,
}

impl CrioState {
    fn new() -> CrioState {
        CrioState {
            dir: unique_dir("crio-run"),
        }
    }

    fn add_sandbox(&self, id: &str, mount_label: Option<&str>) {
        let userdata = self
            .dir
            .join("overlay-containers")
            .join(id)
            .join("userdata");
        std::fs::create_dir_all(&userdata).unwrap();
        let mut linux = serde_json::json!({
            "namespaces": [{"type": "mount"}, {"type": "ipc"}],
            "cgroupsPath": format!("/kubepods/pod-{id}"),
        });
        if let Some(label) = mount_label {
            linux["mountLabel"] = label.into();
        }
        let spec = serde_json::json!({
            "ociVersion": "1.2.1",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["/pause"], "cwd": "/",
                "selinuxLabel": mount_label.map(|l| l.replace("object_r:container_file_t", "system_r:container_t"))},
            "root": {"path": "/run/containers/storage/overlay/x/merged", "readonly": true},
            "hostname": "node-1",
            "annotations": {"io.kubernetes.cri-o.SandboxID": id},
            "linux": linux,
        });
        std::fs::write(userdata.join("config.json"), spec.to_string()).unwrap();
    }
}

/// A pod as CRI-O reports it through NRI: no infra container (PID 0), the kubelet's labels
/// plus CRI-O's own `io.kubernetes.container.name: POD`.
fn crio_pod(bed: &Bed, id: &str, uid: &str, extra: &str) -> pb::PodSandbox {
    let value = format!(
        "{}{extra}",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    let mut pod = annotated_pod("web", uid, &[(KEY, value.as_str())]);
    pod.id = id.into();
    pod.namespace = "prod".into();
    pod.labels = [
        ("app", "web"),
        ("io.kubernetes.container.name", "POD"),
        ("io.kubernetes.pod.name", "web"),
        ("io.kubernetes.pod.namespace", "prod"),
        ("io.kubernetes.pod.uid", uid),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    pod
}

/// A container as CRI-O reports it at CreateContainer: no PID yet, its name and image from
/// CRI-O's annotations.
fn crio_container(pod: &pb::PodSandbox, id: &str) -> pb::Container {
    let mut c = container(pod, "c0", id, 0);
    c.annotations = [
        ("io.kubernetes.container.name", "c0"),
        (
            "io.kubernetes.cri-o.ImageName",
            "docker.io/library/busybox:1.36",
        ),
        ("io.kubernetes.cri-o.SandboxID", pod.id.as_str()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    c
}

/// The same container at StartContainer: runc created it, its init has a PID.
fn started(c: &pb::Container, pid: u32) -> pb::Container {
    let mut c = c.clone();
    c.pid = pid;
    c.state = pb::ContainerState::ContainerCreated as i32;
    c
}

/// StartContainer as CRI-O sends it: an error is logged and the container starts anyway.
async fn crio_start(bed: &Bed, pod: &pb::PodSandbox, c: &pb::Container) -> Option<Status> {
    bed.start(pod, c).await.err()
}

fn labelled(policy: LabelPolicy, state: &Path) -> Tweak {
    let state = state.to_owned();
    Arc::new(move |cfg| {
        cfg.runtime = Some(RuntimeKind::CriO);
        cfg.selinux_label = policy;
        cfg.runtime_state_dir = Some(state.clone());
    })
}

const LEVEL_A: &str = "system_u:object_r:container_file_t:s0:c123,c456";
const LEVEL_B: &str = "system_u:object_r:container_file_t:s0:c7,c8";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selectors_mode_delivers_inside_create_container_with_each_label_choice() {
    if !can_label() {
        return;
    }
    for (policy, expected) in [
        (LabelPolicy::Off, None),
        (LabelPolicy::Shared, Some(SHARED_CONTAINER_FILE_LABEL)),
        (LabelPolicy::Private, Some(LEVEL_A)),
    ] {
        let state = CrioState::new();
        state.add_sandbox("sb-sel", Some(LEVEL_A));
        let kubelet = FakeKubelet::start().await;
        let bed = Bed::on_runtime("cri-o", Some(&kubelet), labelled(policy, &state.dir)).await;
        let svid = bed.serve_selectors(&kubelet, "uid-sel", &[("app", "web")]);
        let pod = crio_pod(&bed, "sb-sel", "uid-sel", "");
        let c = crio_container(&pod, "ctr-sel");

        let created = bed.create(&pod, &c).await.unwrap();
        assert_eq!(created.adjust.unwrap().mounts.len(), 1, "{policy}");
        let dir = bed.dir("uid-sel", "ctr-sel");
        let cert = std::fs::read(dir.join("svid.pem")).expect("files before any process exists");
        assert_eq!(pem_blocks(&cert, "CERTIFICATE"), svid.cert_chain);
        assert_labels(&dir, expected);

        // CRI-O's own label and image annotation were read as CRI-O means them.
        let asked: BTreeSet<String> = bed.agent.stats().svid_subscriptions[0]
            .selectors
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(
            asked.contains("k8s:container-name:c0")
                && asked.contains("k8s:container-image:docker.io/library/busybox:1.36"),
            "{asked:?}"
        );
        assert!(
            !asked.iter().any(|s| s.contains("POD")),
            "CRI-O's infra label is not the pod's: {asked:?}"
        );

        // StartContainer with the PID changes nothing and never asks by PID.
        assert!(crio_start(&bed, &pod, &started(&c, 4700)).await.is_none());
        assert!(
            bed.agent
                .stats()
                .svid_subscriptions
                .iter()
                .all(|s| s.pid == 0)
        );
        assert_labels(&dir, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_start_guard_pid_mode_is_refused_at_create_container_because_cri_o_ignores_start_errors()
 {
    let state = CrioState::new();
    let bed = Bed::on_runtime("cri-o", None, labelled(LabelPolicy::Shared, &state.dir)).await;
    let pod = crio_pod(&bed, "sb-pid", "uid-pid", "");
    let c = crio_container(&pod, "ctr-pid");
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    for part in ["pod prod/web container c0", "cri-o", "selectors"] {
        assert!(err.message.contains(part), "{part} in {}", err.message);
    }
    assert!(!bed.dir("uid-pid", "ctr-pid").exists());
    // Had CRI-O created it anyway, a StartContainer refusal would not have stopped it: the
    // refusal above is the one that counts.
    let late = crio_start(&bed, &pod, &started(&c, 4701)).await;
    assert!(late.is_some(), "the daemon never serves it at start either");
    assert!(!bed.dir("uid-pid", "ctr-pid").join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_cannot_be_delivered_fails_create_container_which_cri_o_enforces() {
    let state = CrioState::new();
    let kubelet = FakeKubelet::start().await;
    let bed = Bed::on_runtime(
        "cri-o",
        Some(&kubelet),
        labelled(LabelPolicy::Shared, &state.dir),
    )
    .await;
    // The kubelet knows the pod, the agent has no entry for it.
    kubelet.add_pod("uid-none", "web", &[]);
    let pod = crio_pod(&bed, "sb-none", "uid-none", "");
    let c = crio_container(&pod, "ctr-none");
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable, "{}", err.message);
    assert!(
        err.message.contains("no registration entry"),
        "{}",
        err.message
    );
    assert!(
        !bed.dir("uid-none", "ctr-none").exists(),
        "nothing is left of a refused creation"
    );

    // The agent gone altogether: refused the same way, naming the agent.
    bed.agent.stop();
    let c = crio_container(&pod, "ctr-none-2");
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert!(err.message.contains("SPIRE agent"), "{}", err.message);
    assert!(!bed.dir("uid-none", "ctr-none-2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_labels_follow_each_pods_level_and_are_set_again_on_every_directory() {
    if !can_label() {
        return;
    }
    let state = CrioState::new();
    state.add_sandbox("sb-a", Some(LEVEL_A));
    state.add_sandbox("sb-b", Some(LEVEL_B));
    // A pod CRI-O does not separate (host PID namespace, or SELinux off in CRI-O): no mount
    // label, so the shared level, which is what its processes can read.
    state.add_sandbox("sb-c", None);
    let kubelet = FakeKubelet::start().await;
    let mut bed = Bed::on_runtime(
        "cri-o",
        Some(&kubelet),
        labelled(LabelPolicy::Private, &state.dir),
    )
    .await;
    let mut pods = Vec::new();
    let mut ctrs = Vec::new();
    for (sb, uid, expected) in [
        ("sb-a", "uid-a", LEVEL_A),
        ("sb-b", "uid-b", LEVEL_B),
        ("sb-c", "uid-c", SHARED_CONTAINER_FILE_LABEL),
    ] {
        bed.serve_selectors(&kubelet, uid, &[("app", "web")]);
        let pod = crio_pod(&bed, sb, uid, "");
        let c = crio_container(&pod, &format!("ctr-{uid}"));
        bed.create(&pod, &c).await.unwrap();
        assert_labels(&bed.dir(uid, &c.id), Some(expected));
        pods.push(pod);
        ctrs.push(c);
    }

    // A sandbox whose configuration is not where the daemon was told: refused at
    // CreateContainer, naming the setting, rather than served with a weaker label.
    let lost = crio_pod(&bed, "sb-lost", "uid-lost", "");
    bed.serve_selectors(&kubelet, "uid-lost", &[("app", "web")]);
    let c = crio_container(&lost, "ctr-lost");
    let err = bed.create(&lost, &c).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    for part in [
        "pod prod/web container c0",
        "selinux_label",
        "runtime_state_dir",
        "sb-lost",
    ] {
        assert!(err.message.contains(part), "{part} in {}", err.message);
    }
    assert!(!bed.dir("uid-lost", "ctr-lost").exists());

    // A directory whose label was lost (relabelled by a file-system restore, or made by an
    // older daemon) gets it back when a restarted daemon takes the running container over.
    let dir = bed.dir("uid-a", &ctrs[0].id);
    rustix::fs::setxattr(
        &dir,
        "security.selinux",
        b"system_u:object_r:tmpfs_t:s0",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut running = started(&ctrs[0], 4710);
    running.state = pb::ContainerState::ContainerRunning as i32;
    running.mounts = vec![pb::Mount {
        destination: "/var/certs".into(),
        r#type: "bind".into(),
        source: dir.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "ro".into()],
    }];
    bed.restart_daemon(pods.clone(), vec![running]).await;
    // Synchronize answers before the maintenance it starts has run: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while label_of(&dir).as_deref() != Some(LEVEL_A) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(label_of(&dir).as_deref(), Some(LEVEL_A), "relabelled");
    // And every file written from then on carries it: a rotation.
    let rotated = bed.svid("/ns/prod/sa/web");
    bed.serve_prod_web(rotated.clone());
    assert!(bed.wait_leaf(&dir.join("svid.pem"), &rotated).await);
    assert_labels(&dir, Some(LEVEL_A));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_mode_labels_the_files_written_at_start_container_and_the_guard_binary() {
    if !can_label() {
        return;
    }
    for runtime in ["containerd", "cri-o"] {
        for (policy, expected) in [
            (LabelPolicy::Off, None),
            (LabelPolicy::Shared, Some(SHARED_CONTAINER_FILE_LABEL)),
            (LabelPolicy::Private, Some(LEVEL_B)),
        ] {
            // Each runtime keeps the sandbox's configuration where its backend says.
            let state = unique_dir("state");
            let spec = match runtime {
                "cri-o" => state.join("overlay-containers/sb-pid/userdata"),
                _ => state.join("io.containerd.runtime.v2.task/k8s.io/sb-pid"),
            };
            std::fs::create_dir_all(&spec).unwrap();
            std::fs::write(
                spec.join("config.json"),
                serde_json::json!({"ociVersion": "1.2.1", "linux": {"mountLabel": LEVEL_B}})
                    .to_string(),
            )
            .unwrap();
            let state_dir = state.clone();
            let bed = Bed::on_runtime(
                runtime,
                None,
                Arc::new(move |cfg| {
                    cfg.default_attestation = Attestation::Pid;
                    cfg.selinux_label = policy;
                    cfg.runtime_state_dir = Some(state_dir.clone());
                    // CRI-O serves PID mode only behind the start guard.
                    cfg.start_guard = Some(std::time::Duration::from_secs(30));
                }),
            )
            .await;
            let value = identity_annotation(bed.agent.path(), "/var/certs");
            let mut pod = annotated_pod("web", "uid-pid", &[(KEY, value.as_str())]);
            pod.id = "sb-pid".into();
            let c = container(&pod, "c0", "ctr-pid", 0);
            let reply = bed.create(&pod, &c).await.unwrap();
            let dir = bed.dir("uid-pid", "ctr-pid");
            assert_eq!(
                label_of(&dir).as_deref(),
                expected,
                "{runtime} {policy}: at create"
            );
            // The guard's one binary serves every pod: the shared label wherever labels
            // are set.
            let guard = reply.adjust.unwrap().mounts[1].source.clone();
            let shared = expected.map(|_| SHARED_CONTAINER_FILE_LABEL);
            assert_eq!(label_of(Path::new(&guard)).as_deref(), shared, "{guard}");
            bed.process(4720, "ctr-pid", 1001);
            bed.serve_pid(4720, bed.svid("/web"));
            bed.start(&pod, &started(&c, 4720)).await.unwrap();
            assert_labels(&dir, expected);
        }
    }
}
