//! Faults through the real daemon: the agent refusing the daemon or a workload, the agent
//! going away during a start, and a full artifact root (a real, small tmpfs). Each fault is
//! reported once, surfaced in metrics and readiness, fails closed, and heals by itself.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use nri_identity_injector::engine::AgentStatus;
use nri_identity_injector::http::respond;
use nri_identity_injector::spire::DelegateRefusal;
use nri_identity_injector::spire::fake::WorkloadKey;
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

const KEY: &str = "identity.noderesource.dev/container.c0";

fn pod_for(bed: &Bed, uid: &str, extra: &str) -> pb::PodSandbox {
    let value = format!(
        "{}{extra}",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    annotated_pod(uid, uid, &[(KEY, value.as_str())])
}

/// A pod and its container with a fake process `pid` as uid 1001.
fn workload(
    bed: &Bed,
    uid: &str,
    id: &str,
    pid: u32,
    extra: &str,
) -> (pb::PodSandbox, pb::Container) {
    let pod = pod_for(bed, uid, extra);
    let c = container(&pod, "c0", id, pid);
    bed.process(pid, id, 1001);
    (pod, c)
}

fn subscriptions_of(bed: &Bed, pid: i32) -> usize {
    bed.agent
        .stats()
        .svid_subscriptions
        .iter()
        .filter(|s| s.pid == pid)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_refused_by_the_agent_says_which_mistake_it_is_and_how_to_fix_it() {
    let bed = Bed::new().await;
    for (i, (refusal, words, remedy)) in [
        (
            DelegateRefusal::NotAuthorized,
            "caller not configured as an authorized delegate",
            "is not in the agent's authorized_delegates",
        ),
        (
            DelegateRefusal::NoEntry,
            "no identity issued",
            "no registration entry on this agent matches the daemon itself",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let pid = 4600 + i as u32;
        let (pod, c) = workload(
            &bed,
            &format!("uid-refused-{i}"),
            &format!("ctr-refused-{i}"),
            pid,
            "",
        );
        bed.serve_pid(pid, bed.svid("/web"));
        bed.agent.refuse_delegate(Some(refusal));
        bed.create(&pod, &c).await.unwrap();
        let err = bed.start(&pod, &c).await.unwrap_err();
        // The agent's own code, as for every answer it gives.
        assert_eq!(err.code, Code::PermissionDenied);
        for part in [
            "pod default/uid-refused",
            "refuses the daemon itself",
            words,
            remedy,
        ] {
            assert!(err.message.contains(part), "{part:?} in {}", err.message);
        }
        assert!(
            !err.message
                .contains("SPIRE agent answered PermissionDenied"),
            "not a bare PermissionDenied: {}",
            err.message
        );
        // Readiness says the same.
        let (status, _) = bed.daemon.engine.probe_agent().await;
        assert_eq!(status, AgentStatus::Refused(refusal));
        let (code, body) = respond("/readyz", &bed.daemon.metrics);
        assert!(code.starts_with("503"), "{code}");
        assert!(
            body.contains(&format!("agent: not ready ({})", refusal.kind()))
                && body.contains(remedy),
            "{body}"
        );
        let metrics = respond("/metrics", &bed.daemon.metrics).1;
        assert!(
            metrics.contains(&format!(
                "nri_identity_agent_refusal{{reason=\"{}\"}} 1",
                refusal.kind()
            )),
            "{metrics}"
        );
        assert_eq!(
            std::fs::read_dir(bed.dir(&pod.uid, &c.id)).unwrap().count(),
            0
        );

        // Fixed on the agent: ready again, and the retried start goes through.
        bed.agent.refuse_delegate(None);
        assert_eq!(bed.daemon.engine.probe_agent().await.0, AgentStatus::Ready);
        bed.start(&pod, &c).await.unwrap();
        assert!(bed.dir(&pod.uid, &c.id).join("svid.pem").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_right_after_an_agent_restart_is_retried_inside_the_start() {
    let bed = Bed::new().await;
    let (pod, c) = workload(&bed, "uid-sync", "ctr-sync", 4610, "");
    bed.serve_pid(4610, bed.svid("/web"));
    bed.create(&pod, &c).await.unwrap();
    // A restarted agent refuses the daemon until its first sync.
    bed.agent.refuse_delegate(Some(DelegateRefusal::NoEntry));
    let (started, ()) = tokio::join!(bed.start(&pod, &c), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bed.agent.refuse_delegate(None);
    });
    started.unwrap();
    assert!(bed.dir("uid-sync", "ctr-sync").join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarting_during_a_start_is_waited_for_inside_the_deadline() {
    let bed = Bed::new().await;
    let (pod, c) = workload(&bed, "uid-restart", "ctr-restart", 4620, "");
    bed.serve_pid(4620, bed.svid("/web"));
    bed.create(&pod, &c).await.unwrap();
    bed.agent.stop();
    let (started, ()) = tokio::join!(bed.start(&pod, &c), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bed.agent.resume().unwrap();
    });
    started.unwrap();
    assert!(
        bed.dir("uid-restart", "ctr-restart")
            .join("svid.pem")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_container_refused_by_the_agent_is_reported_once_and_resumes_by_itself() {
    let bed = Bed::new().await;
    let (pod, c) = workload(&bed, "uid-run", "ctr-run", 4630, "");
    bed.serve_pid(4630, bed.svid("/web"));
    bed.create(&pod, &c).await.unwrap();
    bed.start(&pod, &c).await.unwrap();
    assert_eq!(bed.daemon.engine.probe_agent().await.0, AgentStatus::Ready);
    let before = subscriptions_of(&bed, 4630);

    // The operator removes the daemon from authorized_delegates: the agent ends the stream.
    bed.agent
        .refuse_delegate(Some(DelegateRefusal::NotAuthorized));
    let m = &bed.daemon.metrics;
    let refused = || m.refused() == 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused(), "the container is counted as refused");
    // A second with a 20 ms backoff: retried forever, this would be dozens of calls.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(m.failures("not_authorized_delegate"), 1, "reported once");
    assert!(
        subscriptions_of(&bed, 4630) - before <= 2,
        "asked again {} times",
        subscriptions_of(&bed, 4630) - before
    );
    assert_eq!(
        bed.daemon.engine.probe_agent().await.0,
        AgentStatus::Refused(DelegateRefusal::NotAuthorized)
    );
    assert!(respond("/readyz", m).1.contains("refused containers: 1"));
    let dir = bed.dir("uid-run", "ctr-run");
    assert!(dir.join("svid.pem").exists(), "the last files stay");

    // Fixed: the next probe finds the agent serving the daemon and the container resumes.
    bed.agent.refuse_delegate(None);
    let rotated = bed.svid("/web");
    bed.serve_pid(4630, rotated.clone());
    assert_eq!(bed.daemon.engine.probe_agent().await.0, AgentStatus::Ready);
    assert!(bed.wait_leaf(&dir.join("svid.pem"), &rotated).await);
    assert_eq!(m.refused(), 0);
    assert_eq!(m.failures("not_authorized_delegate"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_the_agent_refuses_is_asked_again_only_when_the_agent_changes() {
    let bed = Bed::new().await;
    let (pod, c) = workload(&bed, "uid-bad", "ctr-bad", 4640, "  on_failure: continue\n");
    bed.serve_pid(4640, bed.svid("/web"));
    bed.agent.set_call_error(
        WorkloadKey::Pid(4640),
        Some((tonic::Code::InvalidArgument, "invalid selector")),
    );
    assert_eq!(bed.daemon.engine.probe_agent().await.0, AgentStatus::Ready);
    bed.create(&pod, &c).await.unwrap();
    bed.start(&pod, &c).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked = subscriptions_of(&bed, 4640);
    // Once by the start, once in the background, then it waits.
    assert!(asked <= 2, "asked {asked} times");
    // The agent answering the probe as before is no news for this workload.
    bed.daemon.engine.probe_agent().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(subscriptions_of(&bed, 4640), asked);
    assert_eq!(bed.daemon.metrics.refused(), 1);

    // The agent restarts (its configuration changed): asked again, and served.
    bed.agent.stop();
    assert_eq!(
        bed.daemon.engine.probe_agent().await.0,
        AgentStatus::Unreachable
    );
    bed.agent.set_call_error(WorkloadKey::Pid(4640), None);
    bed.agent.resume().unwrap();
    assert_eq!(bed.daemon.engine.probe_agent().await.0, AgentStatus::Ready);
    assert!(
        bed.wait_file(
            &bed.dir("uid-bad", "ctr-bad").join("svid.pem"),
            Duration::from_secs(5),
            |b| !b.is_empty()
        )
        .await
    );
    assert_eq!(bed.daemon.metrics.refused(), 0);
}

/// A tmpfs of `size` mounted at a fresh directory, unmounted (lazily: the daemon holds
/// directory descriptors) when dropped. `None` where this process may not mount.
struct SmallTmpfs {
    dir: PathBuf,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Option<SmallTmpfs> {
        let dir = unique_dir("tmpfs");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "nii-test",
            ])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(SmallTmpfs { dir })
    }

    /// Fills the file system: a file grown until the kernel says ENOSPC.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = [0u8; 4096];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_artifact_root_fails_closed_and_heals_when_space_returns() {
    let Some(fs) = SmallTmpfs::mount("256k") else {
        return;
    };
    let root = fs.dir.join("root");
    let tweak_root = root.clone();
    let bed = Bed::with(
        None,
        Arc::new(move |cfg| cfg.artifact_root = tweak_root.clone()),
    )
    .await;
    let dir_of = |pod: &str, c: &str| root.join(pod).join(c);

    // A running container with its files.
    let (pod_a, a) = workload(&bed, "uid-full-a", "ctr-full-a", 4650, "");
    let first = bed.svid("/a");
    bed.serve_pid(4650, first.clone());
    bed.create(&pod_a, &a).await.unwrap();
    bed.start(&pod_a, &a).await.unwrap();
    let dir_a = dir_of("uid-full-a", "ctr-full-a");
    let before = std::fs::read(dir_a.join("svid.pem")).unwrap();

    let filler = fs.fill();

    // A new container cannot get its files: the start fails, clearly, and nothing is left.
    let (pod_b, b) = workload(&bed, "uid-full-b", "ctr-full-b", 4651, "");
    bed.serve_pid(4651, bed.svid("/b"));
    bed.create(&pod_b, &b).await.unwrap();
    let err = bed.start(&pod_b, &b).await.unwrap_err();
    assert_eq!(err.code, Code::Internal);
    for part in [
        "pod default/uid-full-b container c0",
        "staging",
        "No space left on device",
    ] {
        assert!(err.message.contains(part), "{part:?} in {}", err.message);
    }
    let dir_b = dir_of("uid-full-b", "ctr-full-b");
    assert_eq!(
        std::fs::read_dir(&dir_b).unwrap().count(),
        0,
        "nothing partial"
    );

    // A rotation meanwhile: the old files stay whole, the failure is reported once and the
    // write is retried.
    let rotated = bed.svid("/a");
    bed.serve_pid(4650, rotated.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(std::fs::read(dir_a.join("svid.pem")).unwrap(), before);
    assert!(temp_files(&dir_a).is_empty(), "{:?}", temp_files(&dir_a));
    let m = &bed.daemon.metrics;
    assert_eq!(
        m.failures("no_space"),
        2,
        "the start and the rotation, once each"
    );

    // Space returns: the rotation lands without another update from the agent, and the
    // retried start goes through.
    std::fs::remove_file(filler).unwrap();
    assert!(
        bed.wait_leaf(&dir_a.join("svid.pem"), &rotated).await,
        "the rotation is written once there is space"
    );
    bed.start(&pod_b, &b).await.unwrap();
    assert!(dir_b.join("svid.pem").exists());
    assert_eq!(m.failures("no_space"), 2);
}
