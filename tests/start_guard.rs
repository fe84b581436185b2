//! The start guard through the real daemon and the real binary: which containers get it in
//! their CreateContainer reply, what CRI-O (whose start errors are only logged) does with it,
//! and the `guard` subcommand as the runtime runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use nri_identity_backends::{Attestation, SandboxClasses};
use nri_identity_injector::artifacts::{GUARD_DIR, GUARD_FILE};
use nri_identity_injector::engine::EngineConfig;
use nri_identity_injector::guard::{self, CONTAINER_PATH, GuardSpec};
use nri_identity_injector::spire::X509Svid;
use nri_plugin::Code;
use nri_plugin::api::v1alpha1 as pb;

const KEY: &str = "identity.noderesource.dev/container.c0";
const GUARD_TIMEOUT: Duration = Duration::from_secs(30);

fn guarded(cfg: &mut EngineConfig) {
    cfg.start_guard = Some(GUARD_TIMEOUT);
    cfg.sandboxes = SandboxClasses::new(&["kata*"], &[] as &[&str]).unwrap();
}

fn pod_with(bed: &Bed, uid: &str, extra: &str) -> pb::PodSandbox {
    let value = format!(
        "{}{extra}",
        identity_annotation(bed.agent.path(), "/var/certs")
    );
    annotated_pod("web", uid, &[(KEY, value.as_str())])
}

fn start_hooks(reply: &pb::CreateContainerResponse) -> Vec<pb::Hook> {
    reply
        .adjust
        .as_ref()
        .and_then(|a| a.hooks.clone())
        .map(|h| h.start_container)
        .unwrap_or_default()
}

fn mounts(reply: &pb::CreateContainerResponse) -> Vec<pb::Mount> {
    reply
        .adjust
        .as_ref()
        .map(|a| a.mounts.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pid_mode_pod_that_must_not_run_without_its_identity_gets_the_guard() {
    let bed = Bed::with(None, Arc::new(guarded)).await;
    let pod = pod_with(&bed, "uid-g1", "  spiffe_id: spiffe://example.org/web\n");
    let c = container(&pod, "c0", "ctr-g1", 0);
    let reply = bed.create(&pod, &c).await.unwrap();

    let mounts = mounts(&reply);
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert_eq!(mounts[0].destination, "/var/certs");
    let binary = &mounts[1];
    let installed = bed.root.join(GUARD_DIR).join(GUARD_FILE);
    assert_eq!(
        (binary.destination.as_str(), Path::new(&binary.source)),
        (CONTAINER_PATH, installed.as_path())
    );
    assert_eq!(std::fs::read(&installed).unwrap(), GUARD_STAND_IN);
    for opt in ["ro", "nosuid", "nodev"] {
        assert!(binary.options.iter().any(|o| o == opt), "{opt}");
    }
    assert!(!binary.options.iter().any(|o| o == "noexec"), "it must run");

    let hooks = start_hooks(&reply);
    assert_eq!(hooks.len(), 1);
    let hook = &hooks[0];
    assert_eq!(hook.path, CONTAINER_PATH);
    assert_eq!(
        hook.timeout.map(|t| t.value),
        Some((GUARD_TIMEOUT + guard::HOOK_TIMEOUT_MARGIN).as_secs() as i64)
    );
    let args = hook.args.join(" ");
    for part in [
        "guard --cert-dir /var/certs --cert svid.pem --key svid_key.pem --file svid_bundle.pem",
        "--spiffe-id=spiffe://example.org/web",
        "--pod=default/web",
        "--container=c0",
        "--timeout-ms=30000",
    ] {
        assert!(args.contains(part), "{part} in {args}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_selectors_and_vm_pods_get_no_guard() {
    let kubelet = FakeKubelet::start().await;
    let bed = Bed::with(
        Some(&kubelet),
        Arc::new(|cfg| {
            guarded(cfg);
            cfg.default_attestation = Attestation::Pid;
        }),
    )
    .await;
    let svid = bed.svid("/ns/default/sa/web");
    bed.agent.set_svids(
        nri_identity_injector::spire::fake::WorkloadKey::Selectors(
            ["k8s:ns:default", "k8s:sa:web"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect(),
        ),
        nri_identity_injector::spire::SvidUpdate {
            svids: vec![svid],
            federates_with: vec![],
        },
    );
    let cases = [
        ("uid-cont", "", "  on_failure: continue\n"),
        ("uid-sel", "", "  attestation: selectors\n"),
        ("uid-vm", "kata-qemu", ""),
    ];
    for (uid, handler, extra) in cases {
        kubelet.add_pod(uid, "web", &[]);
        let mut pod = pod_with(&bed, uid, extra);
        pod.runtime_handler = handler.into();
        let c = container(&pod, "c0", &format!("ctr-{uid}"), 0);
        let reply = bed.create(&pod, &c).await.unwrap();
        assert_eq!(
            mounts(&reply).len(),
            1,
            "{uid}: only the identity directory"
        );
        assert!(start_hooks(&reply).is_empty(), "{uid}: no hook");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_guard_off_the_reply_is_the_mount_alone() {
    let bed = Bed::new().await;
    let pod = pod_with(&bed, "uid-off", "");
    let reply = bed
        .create(&pod, &container(&pod, "c0", "ctr-off", 0))
        .await
        .unwrap();
    assert_eq!(mounts(&reply).len(), 1);
    assert!(start_hooks(&reply).is_empty());
    assert!(!bed.root.join(GUARD_DIR).exists(), "nothing installed");
}

/// The host directory as the guard would see it at `cert_dir`.
fn host_guard(dir: &Path, spiffe_id: Option<&str>) -> GuardSpec {
    GuardSpec {
        cert_dir: dir.to_owned(),
        cert: "svid.pem".into(),
        key: "svid_key.pem".into(),
        files: vec!["svid_bundle.pem".into()],
        spiffe_id: spiffe_id.map(str::to_owned),
        timeout_ms: 0,
        pod: None,
        container: None,
        termination_log: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_o_serves_pid_mode_behind_the_guard_and_keeps_trying_after_a_failed_start() {
    let bed = Bed::unconfigured("cri-o", Arc::new(guarded)).await;
    bed.conn.handshake().await;
    let pod = pod_with(&bed, "uid-crio", "");
    let c = container(&pod, "c0", "ctr-crio", 4500);
    let reply = bed.create(&pod, &c).await.expect("PID mode is accepted");
    assert_eq!(start_hooks(&reply).len(), 1);
    bed.process(4500, "ctr-crio", 1001);

    // No entry for the PID yet: the start fails (CRI-O only logs this and starts the
    // container, whose guard then waits)...
    let err = bed.start(&pod, &c).await.unwrap_err();
    assert_eq!(err.code, Code::Unavailable);
    let dir = bed.dir("uid-crio", "ctr-crio");
    assert!(!dir.join("svid.pem").exists());
    // ...and the daemon keeps trying, so the files arrive without another start.
    let svid = bed.svid("/web");
    bed.serve_pid(4500, svid.clone());
    assert!(bed.wait_leaf(&dir.join("svid.pem"), &svid).await);
    // What the daemon wrote is what the guard accepts.
    let accepted = guard::check(&host_guard(&dir, Some("spiffe://example.org/web"))).unwrap();
    assert_eq!(accepted.key, guard::KeyMatch::Matches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_containerd_a_failed_start_fails_as_before_and_nothing_goes_on_behind_it() {
    let bed = Bed::with(None, Arc::new(guarded)).await;
    let pod = pod_with(&bed, "uid-ctrd", "");
    let c = container(&pod, "c0", "ctr-ctrd", 4501);
    bed.process(4501, "ctr-ctrd", 1001);
    bed.create(&pod, &c).await.unwrap();
    bed.start(&pod, &c).await.unwrap_err();
    bed.serve_pid(4501, bed.svid("/web"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = bed.dir("uid-ctrd", "ctr-ctrd");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the runtime stopped the container; the kubelet retries the start"
    );
    bed.start(&pod, &c).await.unwrap();
    assert!(dir.join("svid.pem").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_started_while_the_daemon_was_away_gets_its_files_from_synchronize() {
    let mut bed = Bed::with(None, Arc::new(guarded)).await;
    let pod = pod_with(&bed, "uid-away", "");
    let mut c = container(&pod, "c0", "ctr-away", 4502);
    let reply = bed.create(&pod, &c).await.unwrap();
    bed.process(4502, "ctr-away", 1001);
    bed.serve_pid(4502, bed.svid("/web"));
    // The daemon goes away; the runtime starts the container without it (its guard holds
    // the workload) and reports it running, with the mounts, when the daemon is back.
    c.state = pb::ContainerState::ContainerRunning as i32;
    c.mounts = mounts(&reply);
    bed.restart_daemon(vec![pod.clone()], vec![c.clone()]).await;
    let dir = bed.dir("uid-away", "ctr-away");
    let started = Instant::now();
    while guard::check(&host_guard(&dir, None)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(5), "delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === the `guard` subcommand as the runtime runs it ===

fn guard_binary(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nri-identity-injector"));
    cmd.arg("guard")
        .args(["--cert-dir", &dir.to_string_lossy()])
        .args(["--cert", "svid.pem", "--key", "svid_key.pem"])
        .args(["--file", "svid_bundle.pem"])
        .args(["--pod=prod/web", "--container=c0"])
        .args(extra);
    cmd
}

fn write_identity(dir: &Path, cert: &X509Svid, key: &X509Svid, bundle: &[u8]) {
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
    };
    std::fs::write(
        dir.join("svid.pem"),
        pem("CERTIFICATE", &cert.cert_chain[0]),
    )
    .unwrap();
    std::fs::write(
        dir.join("svid_key.pem"),
        pem("PRIVATE KEY", &key.private_key),
    )
    .unwrap();
    std::fs::write(dir.join("svid_bundle.pem"), pem("CERTIFICATE", bundle)).unwrap();
}

fn scratch(tag: &str) -> PathBuf {
    unique_dir(tag)
}

#[test]
fn the_guard_binary_waits_for_missing_files_then_fails_naming_what_is_missing() {
    let dir = scratch("guard-missing");
    let started = Instant::now();
    let out = guard_binary(&dir, &["--timeout-ms=400"]).output().unwrap();
    let waited = started.elapsed();
    assert!(!out.status.success());
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for part in [
        "pod prod/web container c0",
        &dir.display().to_string(),
        "missing svid.pem, svid_key.pem, svid_bundle.pem",
        "workload was not started",
    ] {
        assert!(stderr.contains(part), "{part} in {stderr}");
    }
}

#[test]
fn the_guard_binary_accepts_matching_files_and_refuses_a_wrong_key_or_spiffe_id() {
    let ca = nri_identity_injector::spire::fake::TestCa::new(TD).unwrap();
    let web = ca.mint("/web", Duration::from_secs(3600)).unwrap();
    let other = ca.mint("/other", Duration::from_secs(3600)).unwrap();
    let dir = scratch("guard-files");
    let id = "--spiffe-id=spiffe://example.org/web";

    write_identity(&dir, &web, &web, ca.cert_der());
    let started = Instant::now();
    let out = guard_binary(&dir, &["--timeout-ms=5000", id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What a start costs when the files are there: one exec and a few reads.
    eprintln!("guard with files present: {:?}", started.elapsed());

    // Refused: a key that is not the certificate's, and a certificate of another SPIFFE ID.
    for (cert, key, refusal) in [
        (&web, &other, "does not belong to the certificate"),
        (
            &other,
            &other,
            "is for spiffe://example.org/other, not spiffe://example.org/web",
        ),
    ] {
        write_identity(&dir, cert, key, ca.cert_der());
        let out = guard_binary(&dir, &["--timeout-ms=300", id])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "refused ({refusal}): {stderr}");
        assert!(stderr.contains(refusal), "{stderr}");
    }
}
