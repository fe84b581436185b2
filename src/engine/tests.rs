//! The engine's branches through its lifecycle methods, against the recording host and a
//! scripted identity source: first delivery, the failure policy, synchronize, stop and
//! removal, and keeping files fresh.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nri_identity_backends::{ContainerInfo, PodInfo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use zeroize::Zeroizing;

use super::*;
use crate::annotation::POD_KEY;
use crate::host::{FakeNode, Op, RecordingHost};
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::spire::{
    BundleStream, JwtBundleStream, JwtSvid, SourceError, SvidStream, SvidUpdate, Workload, X509Svid,
};

const ROOT: &str = "/run/nri-identity-injector";
const AGENT: &str = "/run/spire/admin/admin.sock";

type SvidSender = mpsc::UnboundedSender<Result<SvidUpdate, SourceError>>;

/// What the scripted agent answers.
#[derive(Default)]
struct Script {
    /// The first update of a new SVID subscription, per workload.
    svids: HashMap<Workload, SvidUpdate>,
    /// Every new SVID subscription is refused with this code.
    refuse: Option<tonic::Code>,
    bundles: BundleSet,
    /// Every SVID subscription made, oldest first, with the sender that feeds it.
    streams: Vec<(Workload, SvidSender)>,
    /// Senders of the bundle streams, held so the streams stay open.
    bundle_streams: Vec<mpsc::UnboundedSender<Result<BundleSet, SourceError>>>,
    /// Lifetime of minted JWT-SVIDs, seconds.
    jwt_ttl: i64,
    /// Every JWT-SVID fetch is refused with this code.
    jwt_refuse: Option<tonic::Code>,
    /// Audiences of every JWT-SVID fetch, oldest first.
    jwt_fetches: Vec<Vec<String>>,
    jwt_bundles: JwtBundleSet,
    jwt_bundle_streams: Vec<mpsc::UnboundedSender<Result<JwtBundleSet, SourceError>>>,
}

/// An [`IdentitySource`] whose answers the test scripts and whose streams it feeds.
#[derive(Clone, Default)]
struct ScriptedSource(Arc<Mutex<Script>>);

impl ScriptedSource {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        lock(&self.0)
    }

    /// The sender of the newest subscription for `workload`.
    fn stream_of(&self, workload: &Workload) -> Option<SvidSender> {
        let s = self.script();
        let found = s.streams.iter().rev().find(|(w, _)| w == workload);
        found.map(|(_, tx)| tx.clone())
    }

    fn subscriptions(&self) -> usize {
        self.script().streams.len()
    }
}

impl IdentitySource for ScriptedSource {
    async fn subscribe_svids(
        &self,
        _agent: &Path,
        workload: &Workload,
    ) -> Result<SvidStream, SourceError> {
        let mut s = self.script();
        if let Some(code) = s.refuse {
            return Err(SourceError::Status {
                code,
                message: "refused by the script".into(),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(update) = s.svids.get(workload) {
            let _ = tx.send(Ok(update.clone()));
        }
        s.streams.push((workload.clone(), tx));
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn subscribe_bundles(&self, _agent: &Path) -> Result<BundleStream, SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.script();
        let _ = tx.send(Ok(s.bundles.clone()));
        s.bundle_streams.push(tx);
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn fetch_jwt_svids(
        &self,
        _agent: &Path,
        workload: &Workload,
        audience: &[String],
    ) -> Result<Vec<JwtSvid>, SourceError> {
        let mut s = self.script();
        s.jwt_fetches.push(audience.to_vec());
        if let Some(code) = s.jwt_refuse {
            return Err(SourceError::Status {
                code,
                message: "refused by the script".into(),
            });
        }
        let now = crate::spire::unix_now();
        let ttl = s.jwt_ttl;
        let minted = s.svids.get(workload).map(|u| {
            u.svids
                .iter()
                .map(|x| JwtSvid {
                    spiffe_id: x.spiffe_id.clone(),
                    token: Zeroizing::new(format!("aGVhZA.{}.c2ln", s.jwt_fetches.len())),
                    expires_at: now + ttl,
                    issued_at: now,
                    hint: x.hint.clone(),
                })
                .collect()
        });
        Ok(minted.unwrap_or_default())
    }

    async fn subscribe_jwt_bundles(&self, _agent: &Path) -> Result<JwtBundleStream, SourceError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.script();
        let _ = tx.send(Ok(s.jwt_bundles.clone()));
        s.jwt_bundle_streams.push(tx);
        Ok(Box::pin(UnboundedReceiverStream::new(rx)))
    }

    async fn probe(&self, _agent: &Path) -> Result<(), SourceError> {
        Ok(())
    }
}

fn svid(path: &str, serial: u8) -> X509Svid {
    X509Svid {
        spiffe_id: SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap(),
        cert_chain: vec![vec![0x30, 0x03, 0x02, 0x01, serial]],
        private_key: Zeroizing::new(vec![0x30, 0x01, serial]),
        expires_at: 4_000_000_000,
        hint: String::new(),
    }
}

fn update(svid: X509Svid) -> SvidUpdate {
    SvidUpdate {
        svids: vec![svid],
        federates_with: Vec::new(),
    }
}

struct Bed {
    engine: Engine<ScriptedSource>,
    source: ScriptedSource,
    host: Arc<RecordingHost>,
    metrics: Arc<Metrics>,
}

impl Bed {
    fn new() -> Bed {
        Bed::with(|_| {})
    }

    fn with(configure: impl FnOnce(&mut EngineConfig)) -> Bed {
        let source = ScriptedSource::default();
        let td = TrustDomain::parse("example.org").unwrap();
        source.script().bundles = BundleSet {
            bundles: BTreeMap::from([(td.clone(), vec![vec![0x30, 0x03, 0x02, 0x01, 0xca]])]),
        };
        source.script().jwt_bundles = JwtBundleSet {
            bundles: BTreeMap::from([(td, br#"{"keys":[]}"#.to_vec())]),
        };
        source.script().jwt_ttl = 300;
        let host = Arc::new(RecordingHost::new());
        host.plant_dir(ROOT, 0o700, 0);
        let metrics = Arc::new(Metrics::default());
        let mut cfg = EngineConfig::new(ROOT, annotation::Policy::new(AGENT));
        cfg.first_svid_timeout = Duration::from_millis(300);
        cfg.retry_initial = Duration::from_millis(10);
        cfg.retry_max = Duration::from_millis(50);
        configure(&mut cfg);
        let engine = Engine::new(cfg, source.clone(), host.clone(), metrics.clone());
        Bed {
            engine,
            source,
            host,
            metrics,
        }
    }

    /// A running process for `c`, in a cgroup named after it.
    fn process(&self, c: &ContainerInfo) {
        let pid = c.pid.unwrap() as u32;
        self.host
            .add_process(pid, format!("0::/kubepods/pod/{}\n", c.id));
    }

    fn serve(&self, c: &ContainerInfo, svid: X509Svid) {
        let workload = Workload::Pid(c.pid.unwrap());
        self.source.script().svids.insert(workload, update(svid));
    }

    fn dir(&self, pod: &PodInfo, c: &ContainerInfo) -> PathBuf {
        Path::new(ROOT).join(pod.key()).join(&c.id)
    }

    fn files(&self, pod: &PodInfo, c: &ContainerInfo) -> Vec<String> {
        self.host.names(self.dir(pod, c))
    }

    fn file(&self, pod: &PodInfo, c: &ContainerInfo, name: &str) -> Vec<u8> {
        self.host
            .contents(self.dir(pod, c).join(name))
            .unwrap_or_default()
    }

    /// CreateContainer then StartContainer, with the mount the runtime would add.
    async fn create_and_start(
        &self,
        pod: &PodInfo,
        c: &mut ContainerInfo,
    ) -> Result<(), ContainerError> {
        if let Some(injection) = self.engine.create_container(pod, c, None).await? {
            for m in injection.mounts {
                c.mounts.push((m.destination, m.source));
            }
        }
        self.engine.start_container(pod, c, None).await
    }
}

fn pod(uid: &str, value: &str) -> PodInfo {
    PodInfo {
        id: format!("sandbox-{uid}"),
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: "default".into(),
        annotations: BTreeMap::from([(POD_KEY.to_owned(), value.to_owned())]),
        ..PodInfo::default()
    }
}

fn container(id: &str, pid: i32) -> ContainerInfo {
    ContainerInfo {
        id: id.into(),
        name: "app".into(),
        pid: Some(pid),
        user: Some((1001, 1001)),
        ..ContainerInfo::default()
    }
}

const SPIFFE_HELPER: [&str; 3] = ["svid.pem", "svid_bundle.pem", "svid_key.pem"];

/// Polls `done` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}

#[tokio::test]
async fn a_container_without_the_annotation_is_left_alone() {
    let bed = Bed::new();
    let mut p = pod("u0", "cert_dir: /var/certs\n");
    p.annotations.clear();
    let mut c = container("ctr-0", 100);
    bed.create_and_start(&p, &mut c).await.unwrap();
    assert!(c.mounts.is_empty());
    assert_eq!(bed.source.subscriptions(), 0);
    assert!(bed.host.ops().is_empty(), "{:?}", bed.host.ops());
}

#[tokio::test]
async fn pid_mode_delivers_at_start_into_the_mounted_directory_owned_by_the_container() {
    let bed = Bed::new();
    let p = pod("u1", "cert_dir: /var/certs\n");
    let mut c = container("ctr-1", 101);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));

    let injection = bed.engine.create_container(&p, &c, None).await.unwrap();
    let injection = injection.expect("an annotated container gets a mount");
    assert!(
        injection.start_container_hooks.is_empty(),
        "no start guard unless configured"
    );
    let [mount] = <[_; 1]>::try_from(injection.mounts).expect("one mount: the directory");
    assert_eq!(mount.destination, Path::new("/var/certs"));
    assert_eq!(mount.source, bed.dir(&p, &c));
    assert!(bed.files(&p, &c).is_empty(), "nothing before the start");
    c.mounts.push((mount.destination, mount.source));

    bed.engine.start_container(&p, &c, None).await.unwrap();
    assert_eq!(bed.files(&p, &c), SPIFFE_HELPER);
    let chain = String::from_utf8(bed.file(&p, &c, "svid.pem")).unwrap();
    assert!(chain.starts_with("-----BEGIN CERTIFICATE-----"), "{chain}");
    let key = bed.host.node(bed.dir(&p, &c).join("svid_key.pem")).unwrap();
    assert_eq!((key.mode(), key.owner()), (Some(0o600), Some((1001, 1001))));
    assert_eq!(bed.source.script().streams[0].0, Workload::Pid(101));
    assert_eq!(bed.metrics.identities_served(), 1);
    assert_eq!(bed.engine.active(), 1);
}

#[tokio::test]
async fn a_refusal_at_start_fails_it_and_empties_the_directory_in_place() {
    let bed = Bed::new();
    let p = pod("u2", "cert_dir: /var/certs\n");
    let mut c = container("ctr-2", 102);
    bed.process(&c);
    bed.source.script().refuse = Some(tonic::Code::PermissionDenied);

    let err = bed.create_and_start(&p, &mut c).await.unwrap_err();
    assert!(
        matches!(
            &*err.error,
            EngineError::Agent {
                error: SourceError::Status {
                    code: tonic::Code::PermissionDenied,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("pod default/pod-u2 container app: "),
        "{err}"
    );
    // The directory is the mount source of a container that exists: it stays, empty.
    assert!(matches!(
        bed.host.node(bed.dir(&p, &c)),
        Some(FakeNode::Dir { .. })
    ));
    assert!(bed.files(&p, &c).is_empty());
    assert_eq!(bed.metrics.failures("permission_denied"), 1);
    assert_eq!(bed.engine.active(), 0);
}

#[tokio::test]
async fn no_identity_within_the_budget_names_an_empty_answer() {
    let bed = Bed::new();
    let p = pod("u3", "cert_dir: /var/certs\n");
    let mut c = container("ctr-3", 103);
    bed.process(&c);
    // The agent answers at once with an empty set: no entry matches.
    let empty = SvidUpdate::default();
    let workload = Workload::Pid(103);
    bed.source.script().svids.insert(workload, empty);

    let err = bed.create_and_start(&p, &mut c).await.unwrap_err();
    assert!(
        matches!(
            &*err.error,
            EngineError::NoIdentity {
                empty_updates: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("no registration entry"), "{err}");
}

#[tokio::test]
async fn with_on_failure_continue_the_start_goes_on_and_the_files_follow() {
    let bed = Bed::new();
    let p = pod("u4", "cert_dir: /var/certs\non_failure: continue\n");
    let mut c = container("ctr-4", 104);
    bed.process(&c);
    bed.source.script().refuse = Some(tonic::Code::Unavailable);

    bed.create_and_start(&p, &mut c).await.unwrap();
    assert!(bed.files(&p, &c).is_empty());
    assert_eq!(bed.metrics.failures("unavailable"), 1);

    bed.source.script().refuse = None;
    bed.serve(&c, svid("/web", 4));
    eventually("the files written in the background", || {
        bed.files(&p, &c) == SPIFFE_HELPER
    })
    .await;
    assert_eq!(bed.metrics.identities_served(), 1);
}

#[tokio::test]
async fn a_failure_at_create_removes_the_directory() {
    // Selectors mode delivers at CreateContainer and needs the kubelet, which is not set.
    let bed = Bed::new();
    let p = pod("u5", "cert_dir: /var/certs\nattestation: selectors\n");
    let c = container("ctr-5", 105);

    let err = bed.engine.create_container(&p, &c, None).await.unwrap_err();
    assert!(matches!(&*err.error, EngineError::NoKubelet), "{err}");
    assert!(bed.host.node(bed.dir(&p, &c)).is_none());
    assert_eq!(bed.metrics.failures("no_kubelet"), 1);
}

#[tokio::test]
async fn a_start_without_our_mount_fails_unless_the_pod_accepts_going_without() {
    let bed = Bed::new();
    let p = pod("u6", "cert_dir: /var/certs\n");
    let c = container("ctr-6", 106);
    bed.process(&c);
    // Not seen at CreateContainer (the daemon was not connected), so no mount.
    let err = bed.engine.start_container(&p, &c, None).await.unwrap_err();
    assert!(matches!(&*err.error, EngineError::MissingMount), "{err}");

    let p = pod("u6", "cert_dir: /var/certs\non_failure: continue\n");
    bed.engine.start_container(&p, &c, None).await.unwrap();
    assert_eq!(bed.metrics.failures("missing_mount"), 2);
    assert_eq!(bed.source.subscriptions(), 0);
}

#[tokio::test]
async fn an_invalid_annotation_fails_the_create_naming_the_field() {
    let bed = Bed::new();
    let p = pod("u7", "cert_dir: relative\n");
    let c = container("ctr-7", 107);
    let err = bed.engine.create_container(&p, &c, None).await.unwrap_err();
    assert!(
        matches!(&*err.error, EngineError::InvalidAnnotation(_)),
        "{err}"
    );
    assert!(err.to_string().contains("cert_dir"), "{err}");
    assert!(bed.host.ops().is_empty(), "{:?}", bed.host.ops());
}

#[tokio::test]
async fn rotations_rewrite_the_files_and_identical_updates_do_not() {
    let bed = Bed::new();
    let p = pod("u8", "cert_dir: /var/certs\n");
    let mut c = container("ctr-8", 108);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    let first = bed.file(&p, &c, "svid.pem");

    let stream = bed.source.stream_of(&Workload::Pid(108)).unwrap();
    stream.send(Ok(update(svid("/web", 1)))).unwrap();
    stream.send(Ok(update(svid("/web", 2)))).unwrap();
    eventually("the rotated chain on disk", || {
        bed.file(&p, &c, "svid.pem") != first
    })
    .await;
    // The counter moves after the write returns: wait for it, then check nothing more came.
    eventually("the rotation counted", || {
        bed.metrics
            .render(0)
            .lines()
            .any(|l| l == "nri_identity_rotations_total 1")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bed.metrics.identities_served(), 1);
    let rotations = bed.metrics.render(0);
    assert!(
        rotations
            .lines()
            .any(|l| l == "nri_identity_rotations_total 1"),
        "the identical update was skipped:\n{rotations}"
    );
}

#[tokio::test]
async fn a_broken_stream_is_resubscribed_and_the_files_stay() {
    let bed = Bed::new();
    let p = pod("u9", "cert_dir: /var/certs\n");
    let mut c = container("ctr-9", 109);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();

    let stream = bed.source.stream_of(&Workload::Pid(109)).unwrap();
    stream
        .send(Err(SourceError::Disconnected("agent restarted".into())))
        .unwrap();
    eventually("a second subscription", || bed.source.subscriptions() == 2).await;
    assert_eq!(bed.files(&p, &c), SPIFFE_HELPER);
    assert_eq!(bed.metrics.failures("disconnected"), 1);
}

#[tokio::test]
async fn stop_closes_the_stream_and_keeps_the_files() {
    let bed = Bed::new();
    let p = pod("u10", "cert_dir: /var/certs\n");
    let mut c = container("ctr-10", 110);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    let stream = bed.source.stream_of(&Workload::Pid(110)).unwrap();

    bed.engine.stop_container(&c);
    eventually("the stream closed", || stream.is_closed()).await;
    assert_eq!(bed.files(&p, &c), SPIFFE_HELPER);
    assert_eq!(bed.engine.active(), 0);
}

#[tokio::test]
async fn the_process_exiting_closes_the_stream() {
    let bed = Bed::new();
    let p = pod("u11", "cert_dir: /var/certs\n");
    let mut c = container("ctr-11", 111);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    let stream = bed.source.stream_of(&Workload::Pid(111)).unwrap();

    bed.host.exit_process(111);
    eventually("the stream closed", || stream.is_closed()).await;
}

#[tokio::test]
async fn removal_closes_the_stream_and_removes_the_directory_then_the_pods() {
    let bed = Bed::new();
    let p = pod("u12", "cert_dir: /var/certs\n");
    let mut c = container("ctr-12", 112);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    let stream = bed.source.stream_of(&Workload::Pid(112)).unwrap();
    // Another container of the pod keeps the pod's directory.
    bed.host
        .plant_dir(Path::new(ROOT).join("u12/other"), 0o755, 0);

    bed.engine.remove_container(&p, &c);
    eventually("the stream closed", || stream.is_closed()).await;
    assert!(bed.host.node(bed.dir(&p, &c)).is_none());
    assert_eq!(bed.host.names(Path::new(ROOT).join("u12")), ["other"]);
    assert_eq!(bed.engine.active(), 0);

    bed.engine.remove_pod(&p);
    assert!(bed.host.node(Path::new(ROOT).join("u12")).is_none());
}

#[tokio::test]
async fn synchronize_resumes_running_containers_and_sweeps_what_is_gone() {
    let bed = Bed::new();
    let p = pod("u13", "cert_dir: /var/certs\n");
    let c = ContainerInfo {
        running: true,
        mounts: vec![(
            PathBuf::from("/var/certs"),
            Path::new(ROOT).join("u13/ctr-13"),
        )],
        ..container("ctr-13", 113)
    };
    // A created but not started container of the same pod: tracked, not resumed.
    let created = container("ctr-13b", 0);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    // Left over from before the restart: this container's directory, one of a container and
    // one of a pod that no longer exist.
    for dir in [
        "u13",
        "u13/ctr-13",
        "u13/ctr-13b",
        "u13/gone",
        "gone-pod",
        "gone-pod/ctr",
    ] {
        bed.host.plant_dir(Path::new(ROOT).join(dir), 0o755, 0);
    }

    bed.engine.synchronize(
        std::slice::from_ref(&p),
        &[(c.clone(), Some(0)), (created, Some(0))],
    );
    eventually("the resumed container's files", || {
        bed.files(&p, &c) == SPIFFE_HELPER
    })
    .await;
    assert_eq!(bed.host.names(ROOT), ["u13"]);
    assert_eq!(
        bed.host.names(Path::new(ROOT).join("u13")),
        ["ctr-13", "ctr-13b"]
    );
    assert_eq!(bed.source.subscriptions(), 1);

    // A second synchronize (the runtime reconnected) does not subscribe again.
    bed.engine
        .synchronize(std::slice::from_ref(&p), &[(c.clone(), Some(0))]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(bed.source.subscriptions(), 1);
    assert!(
        !bed.host.ops().iter().any(|op| matches!(
            op,
            Op::RemoveAll { path } if path.ends_with("ctr-13")
        )),
        "the live container's directory stays"
    );
}

const JWT_POD: &str = "cert_dir: /var/certs\njwt_audience: [api, db]\n";

#[tokio::test]
async fn the_first_delivery_writes_the_jwt_svid_and_its_jwks_before_the_x509_files() {
    let bed = Bed::new();
    let p = pod("j1", JWT_POD);
    let mut c = container("ctr-j1", 301);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();

    assert_eq!(
        bed.files(&p, &c),
        [
            "jwt_bundle.json",
            "jwt_svid.token",
            "svid.pem",
            "svid_bundle.pem",
            "svid_key.pem"
        ]
    );
    assert_eq!(bed.file(&p, &c, "jwt_svid.token"), b"aGVhZA.1.c2ln");
    assert_eq!(bed.file(&p, &c, "jwt_bundle.json"), br#"{"keys":[]}"#);
    let token = bed
        .host
        .node(bed.dir(&p, &c).join("jwt_svid.token"))
        .unwrap();
    assert_eq!(
        (token.mode(), token.owner()),
        (Some(0o600), Some((1001, 1001)))
    );
    assert_eq!(
        bed.source.script().jwt_fetches,
        [vec!["api".to_owned(), "db".to_owned()]]
    );
    assert_eq!(bed.metrics.jwt_refreshes(), 1);
    // The token went in before the X.509 files, whose last one releases a start guard.
    let renames: Vec<String> = bed
        .host
        .ops()
        .into_iter()
        .filter_map(|op| match op {
            Op::Rename { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    let token_at = renames.iter().position(|n| n == "jwt_svid.token").unwrap();
    let bundle_at = renames.iter().position(|n| n == "svid_bundle.pem").unwrap();
    assert!(token_at < bundle_at, "{renames:?}");
}

#[tokio::test]
async fn a_refused_jwt_svid_keeps_the_container_from_starting() {
    let bed = Bed::new();
    bed.source.script().jwt_refuse = Some(tonic::Code::PermissionDenied);
    let p = pod("j2", JWT_POD);
    let mut c = container("ctr-j2", 302);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    let err = bed.create_and_start(&p, &mut c).await.unwrap_err();
    assert!(
        err.to_string().contains("pod default/pod-j2 container app"),
        "{err}"
    );
    assert!(
        bed.files(&p, &c).is_empty(),
        "nothing half-delivered: {:?}",
        bed.files(&p, &c)
    );
}

#[tokio::test]
async fn the_jwt_svid_is_refreshed_at_half_its_lifetime() {
    let bed = Bed::new();
    bed.source.script().jwt_ttl = 2;
    let p = pod("j3", JWT_POD);
    let mut c = container("ctr-j3", 303);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    // Issued now with a 2 s lifetime: asked again after about 1 s, well before it expires.
    let started = std::time::Instant::now();
    eventually("a second token", || {
        bed.file(&p, &c, "jwt_svid.token") == b"aGVhZA.2.c2ln"
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(bed.metrics.jwt_refreshes() >= 2);
}

#[tokio::test]
async fn an_expired_jwt_svid_is_removed_when_the_refresh_keeps_failing() {
    let bed = Bed::new();
    bed.source.script().jwt_ttl = 1;
    let p = pod("j4", JWT_POD);
    let mut c = container("ctr-j4", 304);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    bed.source.script().jwt_refuse = Some(tonic::Code::Unavailable);
    eventually("the expired token removed", || {
        !bed.files(&p, &c).contains(&"jwt_svid.token".to_owned())
    })
    .await;
    assert_eq!(bed.metrics.jwt_expired_removals(), 1);
    assert_eq!(bed.metrics.failures("jwt_expired"), 1);
    // The X.509 files and the JWKS stay; a token comes back when the agent answers again.
    assert!(bed.files(&p, &c).contains(&"svid.pem".to_owned()));
    bed.source.script().jwt_refuse = None;
    eventually("a token again", || {
        bed.files(&p, &c).contains(&"jwt_svid.token".to_owned())
    })
    .await;
}

#[tokio::test]
async fn a_new_jwks_is_written_next_to_the_token() {
    let bed = Bed::new();
    let p = pod("j5", JWT_POD);
    let mut c = container("ctr-j5", 305);
    bed.process(&c);
    bed.serve(&c, svid("/web", 1));
    bed.create_and_start(&p, &mut c).await.unwrap();
    let td = TrustDomain::parse("example.org").unwrap();
    let next = JwtBundleSet {
        bundles: BTreeMap::from([(td, br#"{"keys":[{"kid":"k2"}]}"#.to_vec())]),
    };
    for tx in &bed.source.script().jwt_bundle_streams {
        let _ = tx.send(Ok(next.clone()));
    }
    eventually("the new jwks", || {
        bed.file(&p, &c, "jwt_bundle.json") == br#"{"keys":[{"kid":"k2"}]}"#
    })
    .await;
}
