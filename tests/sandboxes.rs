//! Runtimes and sandbox kinds through the real daemon: which runtime is served, how pods of
//! VM runtime handlers are named and served next to process pods, and a directory that keeps
//! its inode across a failed start.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use nri_identity_backends::{RuntimeKind, SandboxClasses};
use nri_identity_injector::engine::RuntimeError;
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

const KEY: &str = "identity.noderesource.dev/container.c0";

fn kata_classes(cfg: &mut nri_identity_injector::engine::EngineConfig) {
    cfg.sandboxes = SandboxClasses::new(&["kata*"], &["kata-fc"]).unwrap();
}

fn pod_with(bed: &Bed, uid: &str, handler: &str, extra: &str) -> pb::PodSandbox {
    let value = format!(
        "{}{extra}",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    let mut pod = annotated_pod("vm", uid, &[(KEY, value.as_str())]);
    pod.namespace = "prod".into();
    pod.runtime_handler = handler.into();
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_pod_is_named_by_selectors_and_served_inside_create_container() {
    let kubelet = FakeKubelet::start().await;
    // The daemon's default is PID mode: only the sandbox kind makes this pod use selectors.
    let bed = Bed::with(
        Some(&kubelet),
        Arc::new(|cfg| {
            kata_classes(cfg);
            cfg.default_attestation = nri_identity_backends::Attestation::Pid;
        }),
    )
    .await;
    let svid = bed.serve_selectors(&kubelet, "uid-vm-1", &[]);
    let pod = pod_with(&bed, "uid-vm-1", "kata-qemu", "");
    // The PID a VM runtime reports is the hypervisor's; the daemon must not use it.
    let c = container(&pod, "c0", "ctr-vm-1", 4242);
    let created = bed.create(&pod, &c).await.unwrap();
    assert_eq!(created.adjust.unwrap().mounts.len(), 1);
    let cert = std::fs::read(bed.dir("uid-vm-1", "ctr-vm-1").join("svid.pem"))
        .expect("files exist when CreateContainer returns");
    assert_eq!(pem_blocks(&cert, "CERTIFICATE"), svid.cert_chain);
    assert!(
        bed.agent
            .stats()
            .svid_subscriptions
            .iter()
            .all(|s| s.pid == 0),
        "the agent was never asked by PID"
    );
    bed.start(&pod, &c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pid_mode_is_refused_for_a_vm_pod_at_create_container_and_runc_pods_keep_it() {
    let bed = Bed::with(None, Arc::new(kata_classes)).await;
    let pod = pod_with(&bed, "uid-vm-2", "kata-clh", "  attestation: pid\n");
    let c = container(&pod, "c0", "ctr-vm-2", 4243);
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    for part in [
        "pod prod/vm container c0",
        "kata-clh",
        "hypervisor",
        "selectors",
    ] {
        assert!(err.message.contains(part), "{part} in {}", err.message);
    }
    assert!(!bed.dir("uid-vm-2", "ctr-vm-2").exists());

    // A runc pod on the same daemon is still served by PID.
    let runc = pod_with(&bed, "uid-runc", "runc", "");
    let c = container(&runc, "c0", "ctr-runc", 4244);
    bed.process(4244, "ctr-runc", 1001);
    bed.serve_pid(4244, bed.svid("/runc"));
    bed.create(&runc, &c).await.unwrap();
    bed.start(&runc, &c).await.unwrap();
    assert!(bed.dir("uid-runc", "ctr-runc").join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_once_vm_needs_the_pods_consent() {
    let kubelet = FakeKubelet::start().await;
    let bed = Bed::with(Some(&kubelet), Arc::new(kata_classes)).await;
    bed.serve_selectors(&kubelet, "uid-fc", &[]);
    let pod = pod_with(&bed, "uid-fc", "kata-fc", "");
    let c = container(&pod, "c0", "ctr-fc-1", 0);
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(err.message.contains("copy_once: true"), "{}", err.message);

    let pod = pod_with(&bed, "uid-fc", "kata-fc", "  copy_once: true\n");
    let c = container(&pod, "c0", "ctr-fc-2", 0);
    bed.create(&pod, &c).await.unwrap();
    assert!(bed.dir("uid-fc", "ctr-fc-2").join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_empties_the_directory_in_place_and_a_retry_fills_the_same_inode() {
    let bed = Bed::with_timeout(Duration::from_millis(300)).await;
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod("web", "uid-inode", &[(KEY, value.as_str())]);
    let c = container(&pod, "c0", "ctr-inode", 4300);
    bed.process(4300, "ctr-inode", 1001);
    bed.create(&pod, &c).await.unwrap();
    let dir = bed.dir("uid-inode", "ctr-inode");
    let inode = std::fs::metadata(&dir).unwrap().ino();

    // No entry for the PID yet: the start fails and leaves an empty directory.
    bed.start(&pod, &c).await.unwrap_err();
    assert_eq!(std::fs::metadata(&dir).unwrap().ino(), inode);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    bed.serve_pid(4300, bed.svid("/web"));
    bed.start(&pod, &c).await.unwrap();
    assert_eq!(std::fs::metadata(&dir).unwrap().ino(), inode);
    assert!(dir.join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_other_than_the_configured_one_is_refused_and_stops_the_daemon() {
    let bed = Bed::unconfigured(
        "cri-o",
        Arc::new(|cfg| cfg.runtime = Some(RuntimeKind::Containerd)),
    )
    .await;
    let req = pb::ConfigureRequest {
        runtime_name: "cri-o".into(),
        runtime_version: "1.36.3".into(),
        request_timeout: 2000,
        registration_timeout: 5000,
        ..Default::default()
    };
    let err = bed
        .conn
        .call::<_, pb::ConfigureResponse>("Configure", &req)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(
        err.message.contains("runtime = \"cri-o\""),
        "{}",
        err.message
    );
    assert_eq!(
        bed.daemon.plugin.wrong_runtime(),
        Some(RuntimeError::Mismatch {
            configured: RuntimeKind::Containerd,
            reported: RuntimeKind::CriO
        })
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(5), bed.daemon.shutdown.cancelled())
            .await
            .is_ok(),
        "the daemon stops instead of reconnecting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_runtime_cri_o_is_served_with_its_own_rules() {
    let bed = Bed::unconfigured("cri-o", Arc::new(|_| {})).await;
    bed.conn.handshake().await;
    // CRI-O only logs StartContainer errors, so PID mode (delivered at start) is refused at
    // CreateContainer instead of failing open.
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod("web", "uid-crio", &[(KEY, value.as_str())]);
    let c = container(&pod, "c0", "ctr-crio", 0);
    let err = bed.create(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert!(err.message.contains("cri-o"), "{}", err.message);
    assert!(err.message.contains("selectors"), "{}", err.message);
}

/// The directory as a VM guest's share holds it: an open descriptor pins the inode, so a
/// directory removed and made again under the same path necessarily has another inode, and
/// the pinned one has no link left.
struct Pinned {
    path: std::path::PathBuf,
    fd: std::fs::File,
}

impl Pinned {
    fn new(path: std::path::PathBuf) -> Pinned {
        let fd = std::fs::File::open(&path).expect("the directory exists");
        Pinned { path, fd }
    }

    #[track_caller]
    fn assert_same(&self, step: &str) {
        let held = self.fd.metadata().unwrap();
        let now = std::fs::metadata(&self.path)
            .unwrap_or_else(|e| panic!("{step}: {} is gone: {e}", self.path.display()));
        assert!(held.nlink() > 0, "{step}: the pinned directory was removed");
        assert_eq!(
            (now.dev(), now.ino()),
            (held.dev(), held.ino()),
            "{step}: {} is another directory now",
            self.path.display()
        );
    }
}

fn running_with_mount(c: &pb::Container, dir: &std::path::Path) -> pb::Container {
    let mut c = c.clone();
    c.state = pb::ContainerState::ContainerRunning as i32;
    c.mounts = vec![pb::Mount {
        destination: "/var/certs".into(),
        r#type: "bind".into(),
        source: dir.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "ro".into()],
    }];
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_replaces_a_container_directory_until_remove_container() {
    let kubelet = FakeKubelet::start().await;
    let mut bed = Bed::with(
        Some(&kubelet),
        Arc::new(|cfg| {
            kata_classes(cfg);
            cfg.default_attestation = nri_identity_backends::Attestation::Pid;
            cfg.first_svid_timeout = Duration::from_millis(300);
        }),
    )
    .await;

    // A runc pod by PID: created, a failed start (no entry yet), the retried start.
    let mut runc = pod_with(&bed, "uid-pin-runc", "runc", "");
    runc.id = "sandbox-pin-runc".into();
    let c = container(&runc, "c0", "ctr-pin-runc", 4400);
    bed.process(4400, "ctr-pin-runc", 1001);
    bed.create(&runc, &c).await.unwrap();
    let runc_dir = Pinned::new(bed.dir("uid-pin-runc", "ctr-pin-runc"));
    bed.start(&runc, &c).await.unwrap_err();
    runc_dir.assert_same("failed start");
    bed.serve_pid(4400, bed.svid("/runc"));
    bed.start(&runc, &c).await.unwrap();
    runc_dir.assert_same("retried start");

    // A VM pod by selectors: delivered at create, then started.
    let svid = bed.serve_selectors(&kubelet, "uid-pin-vm", &[]);
    let mut vm = pod_with(&bed, "uid-pin-vm", "kata-qemu", "");
    vm.id = "sandbox-pin-vm".into();
    let v = container(&vm, "c0", "ctr-pin-vm", 4401);
    bed.create(&vm, &v).await.unwrap();
    let vm_dir = Pinned::new(bed.dir("uid-pin-vm", "ctr-pin-vm"));
    bed.start(&vm, &v).await.unwrap();
    vm_dir.assert_same("start");
    assert!(bed.wait_leaf(&vm_dir.path.join("svid.pem"), &svid).await);

    // A VM container created before a daemon restart and started after it: the new daemon
    // never saw its CreateContainer.
    let late = container(&vm, "c0", "ctr-pin-late", 4402);
    bed.create(&vm, &late).await.unwrap();
    let late_dir = Pinned::new(bed.dir("uid-pin-vm", "ctr-pin-late"));

    // Rotations.
    let rotated = bed.svid("/runc");
    bed.serve_pid(4400, rotated.clone());
    assert!(
        bed.wait_leaf(&runc_dir.path.join("svid.pem"), &rotated)
            .await
    );
    runc_dir.assert_same("rotation");

    // A daemon restart: synchronize resumes the running ones and keeps the created one.
    let mut created = late.clone();
    created.state = pb::ContainerState::ContainerCreated as i32;
    bed.restart_daemon(
        vec![runc.clone(), vm.clone()],
        vec![
            running_with_mount(&c, &runc_dir.path),
            running_with_mount(&v, &vm_dir.path),
            created,
        ],
    )
    .await;
    for (d, step) in [
        (&runc_dir, "daemon restart"),
        (&vm_dir, "daemon restart"),
        (&late_dir, "daemon restart"),
    ] {
        d.assert_same(step);
    }
    bed.start(&vm, &running_with_mount(&late, &late_dir.path))
        .await
        .unwrap();
    late_dir.assert_same("start after the restart");
    let rotated = bed.svid("/runc");
    bed.serve_pid(4400, rotated.clone());
    assert!(
        bed.wait_leaf(&runc_dir.path.join("svid.pem"), &rotated)
            .await
    );
    runc_dir.assert_same("rotation after the restart");

    for (pod, ctr, d) in [
        (&runc, &c, &runc_dir),
        (&vm, &v, &vm_dir),
        (&vm, &late, &late_dir),
    ] {
        bed.stop(pod, ctr).await;
        d.assert_same("stop");
        bed.remove(pod, ctr).await;
        assert!(
            !d.path.exists(),
            "RemoveContainer removes {}",
            d.path.display()
        );
        assert_eq!(d.fd.metadata().unwrap().nlink(), 0);
    }
}
