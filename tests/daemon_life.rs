//! The life of annotated containers through the real daemon (engine + NRI plugin), driven by
//! a fake NRI runtime and a fake SPIRE agent over temporary unix sockets.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use nri_identity_injector::limits::IdentityLimits;
use nri_identity_injector::spire::fake::WorkloadKey;
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

const KEY: &str = "identity.noderesource.dev/container.c0";

/// The two load tests measure against the production budget; running them one at a time
/// keeps them from starving each other on a 2-core machine.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pod_for(bed: &Bed, name: &str, uid: &str) -> pb::PodSandbox {
    let value = identity_annotation(bed.agent.path(), "/var/certs");
    annotated_pod(name, uid, &[(KEY, value.as_str())])
}

/// The value of the series `name` (with its labels, exactly as rendered) in `metrics`.
fn series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {name} in\n{metrics}"))
}

/// Every millisecond of a first delivery is accounted for: one histogram per phase, each
/// observed once per delivery, whose sums add up to the whole delivery's, and the whole is
/// the time StartContainer took less only the NRI wire. An agent slow to accept the
/// subscription shows in the phase that waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phases_of_a_first_delivery_add_up_to_its_whole_time() {
    let bed = Bed::new().await;
    let slow_agent = Duration::from_millis(40);
    let n = 3;
    let mut round_trips = Duration::ZERO;
    for i in 0..n {
        let pid = 4100 + i;
        let (id, uid) = (format!("ctr-phases-{i}"), format!("pod-uid-phases-{i}"));
        let pod = pod_for(&bed, "web", &uid);
        let c = container(&pod, "c0", &id, pid);
        bed.process(pid, &id, 1001);
        bed.serve_pid(pid, bed.svid("/web"));
        bed.create(&pod, &c).await.unwrap();
        // The bundle stream is open by now (the first delivery opens it, the readiness
        // probe too), so the delay lands on SVID subscriptions only, from the second on.
        if i == 1 {
            bed.agent.set_initial_delay(slow_agent);
        }
        let t = Instant::now();
        bed.start(&pod, &c).await.unwrap();
        round_trips += t.elapsed();
    }
    let text = bed.daemon.metrics.render(0);
    let total = series(&text, "nri_identity_first_delivery_seconds_sum");
    assert_eq!(
        series(&text, "nri_identity_first_delivery_seconds_count"),
        f64::from(n)
    );
    let mut phases = 0.0;
    for phase in [
        "workload_named",
        "stream_open",
        "first_svid",
        "bundle_ready",
        "checks",
        "jwt",
        "files_written",
        "reply",
    ] {
        let labels = format!("{{phase=\"{phase}\"}}");
        let count = series(
            &text,
            &format!("nri_identity_first_delivery_phase_seconds_count{labels}"),
        );
        assert_eq!(count, f64::from(n), "{phase} observed once per delivery");
        let sum = series(
            &text,
            &format!("nri_identity_first_delivery_phase_seconds_sum{labels}"),
        );
        assert!(sum > 0.0, "{phase} took some time");
        phases += sum;
        if phase == "stream_open" {
            assert!(
                sum >= 2.0 * slow_agent.as_secs_f64(),
                "the agent's delay shows in stream_open: {sum} s"
            );
        }
    }
    assert!(
        (phases - total).abs() < 1e-6,
        "phases {phases} s vs total {total} s"
    );
    let wire = round_trips.as_secs_f64() - total;
    assert!(
        (0.0..0.1).contains(&wire),
        "the deliveries ({total} s) are the StartContainer calls ({round_trips:?}) but for the wire"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_annotated_container_gets_its_identity_before_start_and_loses_it_on_removal() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-1");
    let c = container(&pod, "c0", "ctr-1", 4001);
    bed.process(4001, "ctr-1", 1001);
    let svid = bed.svid("/web");
    bed.serve_pid(4001, svid.clone());

    // CreateContainer: a read-only directory mount at cert_dir, nothing written yet.
    let created = bed.create(&pod, &c).await.unwrap();
    let mounts = created.adjust.unwrap().mounts;
    assert_eq!(mounts.len(), 1);
    let dir = bed.dir("pod-uid-1", "ctr-1");
    assert_eq!(mounts[0].destination, "/var/certs");
    assert_eq!(mounts[0].source, dir.to_string_lossy());
    for opt in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            mounts[0].options.iter().any(|o| o == opt),
            "{opt} in {:?}",
            mounts[0].options
        );
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // StartContainer returns only once the files are there.
    let t = Instant::now();
    bed.start(&pod, &c).await.unwrap();
    eprintln!("StartContainer took {:?}", t.elapsed());
    let cert = std::fs::read(dir.join("svid.pem")).unwrap();
    assert_eq!(pem_blocks(&cert, "CERTIFICATE"), svid.cert_chain);
    let key = std::fs::read(dir.join("svid_key.pem")).unwrap();
    assert_eq!(
        pem_blocks(&key, "PRIVATE KEY"),
        vec![svid.private_key.to_vec()]
    );
    let bundle = std::fs::read(dir.join("svid_bundle.pem")).unwrap();
    assert_eq!(
        pem_blocks(&bundle, "CERTIFICATE"),
        vec![bed.ca.cert_der().to_vec()]
    );
    // Owned by the container's user; the key private to it.
    let key_meta = std::fs::metadata(dir.join("svid_key.pem")).unwrap();
    assert_eq!((key_meta.uid(), key_meta.gid()), (1001, 1001));
    assert_eq!(key_meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(dir.join("svid.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    assert_eq!(bed.daemon.metrics.identities_served(), 1);

    // Rotation: a new SVID replaces the files.
    let rotated = bed.svid("/web");
    bed.serve_pid(4001, rotated.clone());
    assert!(
        bed.wait_leaf(&dir.join("svid.pem"), &rotated).await,
        "the rotated certificate reaches the file"
    );

    // Stop closes the stream; remove deletes the directory.
    bed.stop(&pod, &c).await;
    assert!(
        bed.agent
            .wait_until(Duration::from_secs(5), |s| s.open_svid_streams == 0)
            .await,
        "stream closed on stop"
    );
    assert!(dir.exists(), "files stay until the container is removed");
    bed.remove(&pod, &c).await;
    assert!(!dir.exists());
    assert!(
        !bed.root.join("pod-uid-1").exists(),
        "the empty pod directory goes too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_without_the_annotation_are_left_alone() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-2");
    let other = container(&pod, "c2", "ctr-2", 4002);
    let created = bed.create(&pod, &other).await.unwrap();
    assert!(created.adjust.unwrap_or_default().mounts.is_empty());
    bed.start(&pod, &other).await.unwrap();
    assert!(!bed.dir("pod-uid-2", "ctr-2").exists());
    assert!(bed.agent.stats().svid_subscriptions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_annotation_fails_create_naming_pod_container_and_field_and_writes_nothing() {
    let bed = Bed::new().await;
    let cases = [
        ("cert_dir: /", "cert_dir"),
        (
            "cert_dir: /var/certs\nsvid_file_name: ../x",
            "svid_file_name",
        ),
        (
            "cert_dir: /var/certs\nspire_agent_address: /run/containerd/containerd.sock",
            "spire_agent_address",
        ),
        ("cert_dir: /proc/self", "cert_dir"),
        ("cert_dir: /var/certs\nbogus: 1", "bogus"),
    ];
    for (i, (value, field)) in cases.iter().enumerate() {
        let uid = format!("hostile-{i}");
        let pod = annotated_pod("evil", &uid, &[(KEY, value)]);
        let c = container(&pod, "c0", &format!("ctr-h{i}"), 0);
        let err = bed.create(&pod, &c).await.unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument, "{value}");
        for needle in ["default/evil", "c0", field] {
            assert!(
                err.message.contains(needle),
                "{value}: {:?} lacks {needle}",
                err.message
            );
        }
        assert!(!bed.root.join(&uid).exists(), "nothing on disk for {value}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_down_at_start_fails_the_start_within_budget_and_leaves_no_files() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-3");
    let c = container(&pod, "c0", "ctr-3", 4003);
    bed.process(4003, "ctr-3", 1001);
    bed.create(&pod, &c).await.unwrap();
    bed.agent.stop();
    let t = Instant::now();
    let err = bed.start(&pod, &c).await.unwrap_err();
    let took = t.elapsed();
    assert!(
        took < bed.first_svid_timeout + Duration::from_millis(700),
        "failed after {took:?}"
    );
    assert_eq!(err.code, Code::Unavailable, "{err}");
    assert!(
        err.message.contains("default/web") && err.message.contains("c0"),
        "{err}"
    );
    let dir = bed.dir("pod-uid-3", "ctr-3");
    assert!(
        dir.exists(),
        "the mount source stays for the existing container"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no files left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refusal_reaches_the_runtime_with_the_agents_code_and_words_once() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-denied");
    let c = container(&pod, "c0", "ctr-denied", 4010);
    bed.process(4010, "ctr-denied", 1001);
    bed.serve_pid(4010, bed.svid("/web"));
    bed.create(&pod, &c).await.unwrap();
    let refusal = "caller not configured as an authorized delegate";
    bed.agent
        .set_deny_all(Some((tonic::Code::PermissionDenied, refusal)));
    let err = bed.start(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::PermissionDenied, "{err}");
    assert_eq!(err.message.matches(refusal).count(), 1, "{err}");
    assert!(
        err.message.contains("default/web")
            && err.message.contains(bed.agent.path().to_str().unwrap()),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_on_failure_continue_the_container_starts_and_gets_its_identity_later() {
    let bed = Bed::new().await;
    let value = format!(
        "{}  on_failure: continue\n",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    let pod = annotated_pod("web", "pod-uid-4", &[(KEY, value.as_str())]);
    let c = container(&pod, "c0", "ctr-4", 4004);
    bed.process(4004, "ctr-4", 1001);
    bed.create(&pod, &c).await.unwrap();
    bed.agent.stop();
    bed.start(&pod, &c).await.expect("the start goes on");
    let dir = bed.dir("pod-uid-4", "ctr-4");
    assert!(!dir.join("svid.pem").exists());
    bed.serve_pid(4004, bed.svid("/web"));
    bed.agent.resume().unwrap();
    assert!(
        bed.wait_file(&dir.join("svid.pem"), Duration::from_secs(5), |b| !b
            .is_empty())
            .await,
        "delivered once the agent is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_keeps_the_files_and_resumes_updates() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-5");
    let c = container(&pod, "c0", "ctr-5", 4005);
    bed.process(4005, "ctr-5", 1001);
    bed.serve_pid(4005, bed.svid("/web"));
    bed.create(&pod, &c).await.unwrap();
    bed.start(&pod, &c).await.unwrap();
    let dir = bed.dir("pod-uid-5", "ctr-5");
    let before = std::fs::read(dir.join("svid.pem")).unwrap();

    bed.agent.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read(dir.join("svid.pem")).unwrap(),
        before,
        "files stay while the agent is down"
    );
    let after_restart = bed.svid("/web");
    bed.serve_pid(4005, after_restart.clone());
    bed.agent.resume().unwrap();
    assert!(
        bed.wait_leaf(&dir.join("svid.pem"), &after_restart).await,
        "updates resume after the agent restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_resumes_rotation_and_removes_directories_of_vanished_containers() {
    let mut bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-6");
    let mut c = container(&pod, "c0", "ctr-6", 4006);
    let gone = container(&pod, "c0", "ctr-gone", 4007);
    bed.process(4006, "ctr-6", 1001);
    bed.process(4007, "ctr-gone", 1001);
    bed.serve_pid(4006, bed.svid("/web"));
    bed.serve_pid(4007, bed.svid("/web"));
    for ctr in [&c, &gone] {
        bed.create(&pod, ctr).await.unwrap();
        bed.start(&pod, ctr).await.unwrap();
    }
    let dir = bed.dir("pod-uid-6", "ctr-6");

    // The runtime reports what is running, with the mount our earlier instance added.
    c.state = pb::ContainerState::ContainerRunning as i32;
    c.mounts = vec![pb::Mount {
        destination: "/var/certs".into(),
        r#type: "bind".into(),
        source: dir.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "ro".into()],
    }];
    bed.restart_daemon(vec![pod.clone()], vec![c.clone()]).await;
    assert!(
        !bed.dir("pod-uid-6", "ctr-gone").exists(),
        "directory of a container that is gone is removed"
    );
    let rotated = bed.svid("/web");
    bed.serve_pid(4006, rotated.clone());
    assert!(
        bed.wait_leaf(&dir.join("svid.pem"), &rotated).await,
        "rotation continues after the daemon restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_before_the_first_update_gets_no_files() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-7");
    let c = container(&pod, "c0", "ctr-7", 4008);
    bed.process(4008, "ctr-7", 1001);
    bed.serve_pid(4008, bed.svid("/web"));
    bed.agent.set_initial_delay(Duration::from_millis(300));
    bed.create(&pod, &c).await.unwrap();
    let procs = bed.host.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        procs.procs.exit_process(4008);
    });
    let err = bed.start(&pod, &c).await.unwrap_err();
    assert!(err.message.contains("exited"), "{err}");
    assert_eq!(
        std::fs::read_dir(bed.dir("pod-uid-7", "ctr-7"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_without_a_matching_entry_fails_clearly() {
    let bed = Bed::new().await;
    let pod = pod_for(&bed, "web", "pod-uid-8");
    let c = container(&pod, "c0", "ctr-8", 4009);
    bed.process(4009, "ctr-8", 1001);
    bed.create(&pod, &c).await.unwrap();
    let err = bed.start(&pod, &c).await.unwrap_err();
    assert!(err.message.contains("no registration entry"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_containers_started_at_once_are_all_served_within_budget() {
    let _heavy = HEAVY.lock().await;
    // One pod of 200 containers is over the default per-pod identity limit, which is not
    // what this test is about.
    let limits = IdentityLimits {
        per_pod: 200,
        total: 200,
    };
    let bed = Arc::new(
        Bed::with_timeout_and(
            Duration::from_millis(1500),
            Arc::new(move |cfg| cfg.limits = limits),
        )
        .await,
    );
    let pod = pod_for(&bed, "many", "pod-uid-many");
    let mut containers = Vec::new();
    for i in 0..200u32 {
        let id = format!("ctr-m{i}");
        let c = container(&pod, "c0", &id, 10_000 + i);
        bed.process(10_000 + i, &id, 1001);
        bed.serve_pid(10_000 + i, bed.svid(&format!("/w{i}")));
        bed.create(&pod, &c).await.unwrap();
        containers.push(c);
    }
    let t = Instant::now();
    let mut starts = Vec::new();
    for c in containers.clone() {
        let (bed, pod) = (bed.clone(), pod.clone());
        starts.push(tokio::spawn(async move {
            let t = Instant::now();
            bed.start(&pod, &c).await.map(|_| t.elapsed())
        }));
    }
    let mut times = Vec::new();
    for s in starts {
        times.push(s.await.unwrap().expect("every start is served"));
    }
    times.sort();
    eprintln!(
        "200 concurrent starts: total {:?}, p50 {:?}, max {:?}",
        t.elapsed(),
        times[100],
        times[199]
    );
    for c in &containers {
        assert!(bed.dir("pod-uid-many", &c.id).join("svid.pem").exists());
    }
    assert_eq!(bed.daemon.metrics.identities_served(), 200);
}

/// Readers that check key/certificate consistency on every read while the agent rotates
/// 1,000 times. With the combined layout one read is always a matching pair. With separate
/// files a reader must re-read when the pair does not match (the files are replaced one
/// after the other); it must never see a half-written file, and must always converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_a_torn_or_partial_identity_during_1000_rotations() {
    let _heavy = HEAVY.lock().await;
    let bed = Bed::with_timeout(Duration::from_millis(1500)).await;
    let value = format!(
        "{}  layout: combined\n",
        identity_annotation(bed.agent.path(), "/var/certs")
    )
    .replace(
        "  svid_file_name: svid.pem\n  svid_key_file_name: svid_key.pem\n",
        "",
    );
    let combined_key = "identity.noderesource.dev/container.combined";
    let separate_value = identity_annotation(bed.agent.path(), "/var/certs");
    let pod = annotated_pod(
        "rot",
        "pod-uid-rot",
        &[
            (combined_key, value.as_str()),
            (
                "identity.noderesource.dev/container.separate",
                separate_value.as_str(),
            ),
        ],
    );
    let cc = container(&pod, "combined", "ctr-comb", 5001);
    let cs = container(&pod, "separate", "ctr-sep", 5002);
    bed.process(5001, "ctr-comb", 0);
    bed.process(5002, "ctr-sep", 0);
    // Pre-mint the SVIDs (minting costs more than writing) and remember which key goes
    // with which leaf.
    let svids: Vec<_> = (0..1001).map(|_| bed.svid("/rot")).collect();
    let pairs: std::collections::HashMap<Vec<u8>, Vec<u8>> = svids
        .iter()
        .map(|s| (s.private_key.to_vec(), s.cert_chain[0].clone()))
        .collect();
    let pairs = Arc::new(pairs);
    bed.serve_pid(5001, svids[0].clone());
    bed.serve_pid(5002, svids[0].clone());
    for c in [&cc, &cs] {
        bed.create(&pod, c).await.unwrap();
        bed.start(&pod, c).await.unwrap();
    }
    let comb_dir = bed.dir("pod-uid-rot", "ctr-comb");
    let sep_dir = bed.dir("pod-uid-rot", "ctr-sep");
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, retries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let comb_reader = {
        let (stop, pairs, reads) = (stop.clone(), pairs.clone(), reads.clone());
        let path = comb_dir.join("credential-bundle.pem");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bytes = std::fs::read(&path).unwrap();
                let key = pem_blocks(&bytes, "PRIVATE KEY");
                let certs = pem_blocks(&bytes, "CERTIFICATE");
                assert_eq!(key.len(), 1, "exactly one key in every read");
                assert_eq!(pairs.get(&key[0]), certs.first(), "a torn combined file");
                reads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let order: Arc<Vec<(Vec<u8>, Vec<u8>)>> = Arc::new(
        svids
            .iter()
            .map(|s| (s.private_key.to_vec(), s.cert_chain[0].clone()))
            .collect(),
    );
    let sep_reader = {
        let (stop, pairs, retries, order) =
            (stop.clone(), pairs.clone(), retries.clone(), order.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut attempts = 0;
                loop {
                    let key = pem_blocks(
                        &std::fs::read(sep_dir.join("svid_key.pem")).unwrap(),
                        "PRIVATE KEY",
                    );
                    let certs = pem_blocks(
                        &std::fs::read(sep_dir.join("svid.pem")).unwrap(),
                        "CERTIFICATE",
                    );
                    assert_eq!(key.len(), 1, "a partial key file");
                    assert!(!certs.is_empty(), "a partial certificate file");
                    if pairs.get(&key[0]) == certs.first() {
                        std::thread::sleep(Duration::from_micros(50));
                        break;
                    }
                    attempts += 1;
                    retries.fetch_add(1, Ordering::Relaxed);
                    // The writer may be descheduled between its renames on a busy machine.
                    std::thread::sleep(Duration::from_millis(1));
                    if attempts >= 1000 {
                        let k = order.iter().position(|(kk, _)| *kk == key[0]);
                        let c = order.iter().position(|(_, cc)| Some(cc) == certs.first());
                        panic!("the separate files never converged: key #{k:?}, cert #{c:?}");
                    }
                }
            }
        })
    };
    let t = Instant::now();
    for svid in &svids[1..] {
        bed.serve_pid(5001, svid.clone());
        bed.serve_pid(5002, svid.clone());
        assert!(
            bed.wait_leaf(&comb_dir.join("credential-bundle.pem"), svid)
                .await
        );
    }
    stop.store(true, Ordering::Relaxed);
    comb_reader
        .join()
        .expect("combined reader saw only matching pairs");
    sep_reader.join().expect("separate reader always converged");
    eprintln!(
        "1000 rotations in {:?}; {} combined reads, {} separate-file re-reads",
        t.elapsed(),
        reads.load(Ordering::Relaxed),
        retries.load(Ordering::Relaxed)
    );
    let _ = WorkloadKey::Pid(0);
}
