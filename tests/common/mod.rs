//! A test bed for the daemon's own integration tests: the real engine and NRI plugin, a
//! fake NRI runtime and a fake SPIRE agent over temporary unix sockets, real files in a
//! temporary artifact root, and fake processes (so PIDs and cgroups are scriptable without
//! real containers).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nri_identity_injector::annotation::Policy;
use nri_identity_injector::engine::{Engine, EngineConfig};
use nri_identity_injector::host::Owner;
use nri_identity_injector::metrics::Metrics;
use nri_identity_injector::nri::IdentityPlugin;
use nri_identity_injector::spire::fake::{FakeAgent, TestCa, WorkloadKey};
use nri_identity_injector::spire::{ApiConfig, DelegatedIdentityApi, SvidUpdate, X509Svid};
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::testing::{FakeRuntime, PluginConn, RuntimeSettings, temp_socket};
use nri_plugin::{Backoff, ConnectionState, Options, Runner, Status};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Real files, fake processes.
pub type MixedHost = nri_identity_injector::host::SplitHost;

pub const TD: &str = "example.org";

/// What the test beds install as the start guard's binary.
pub const GUARD_STAND_IN: &[u8] = b"start guard stand-in";

pub struct Daemon {
    pub engine: Engine<DelegatedIdentityApi>,
    pub plugin: Arc<IdentityPlugin<DelegatedIdentityApi>>,
    pub metrics: Arc<Metrics>,
    pub state: watch::Receiver<ConnectionState>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), nri_plugin::Error>>,
}

/// Adjusts the daemon's engine settings before it starts.
pub type Tweak = Arc<dyn Fn(&mut EngineConfig) + Send + Sync>;

pub struct Bed {
    pub agent: FakeAgent,
    pub ca: TestCa,
    pub root: PathBuf,
    pub host: Arc<MixedHost>,
    pub runtime: FakeRuntime,
    pub conn: PluginConn,
    pub daemon: Daemon,
    pub first_svid_timeout: Duration,
    pub kubelet: Option<std::net::SocketAddr>,
    pub tweak: Tweak,
    /// What the fake runtime calls itself at NRI Configure (`containerd`, `cri-o`).
    pub runtime_name: String,
}

pub fn unique_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nii-it-{}-{tag}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A pod the fake kubelet knows: uid, service account, labels, and further `spec` fields.
pub type KubeletPod = (String, String, Vec<(String, String)>, serde_json::Value);

/// A fake kubelet `/pods` on the read-only port.
pub struct FakeKubelet {
    pub addr: std::net::SocketAddr,
    pub pods: Arc<std::sync::Mutex<Vec<KubeletPod>>>,
}

impl FakeKubelet {
    pub async fn start() -> FakeKubelet {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pods: Arc<std::sync::Mutex<Vec<KubeletPod>>> = Arc::default();
        let shared = pods.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let pods = shared.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let items: Vec<serde_json::Value> = pods
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(uid, sa, labels, extra)| {
                            let labels: serde_json::Map<String, serde_json::Value> = labels
                                .iter()
                                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                                .collect();
                            let mut spec =
                                serde_json::json!({"serviceAccountName": sa, "nodeName": "node-1"});
                            if let (Some(spec), Some(extra)) =
                                (spec.as_object_mut(), extra.as_object())
                            {
                                spec.extend(extra.clone());
                            }
                            serde_json::json!({
                                "metadata": {"uid": uid, "labels": labels},
                                "spec": spec
                            })
                        })
                        .collect();
                    let body = serde_json::json!({"kind": "PodList", "items": items}).to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        FakeKubelet { addr, pods }
    }

    pub fn add_pod(&self, uid: &str, service_account: &str, labels: &[(&str, &str)]) {
        self.add_pod_with_spec(uid, service_account, labels, serde_json::Value::Null);
    }

    /// A pod whose `spec` also carries `extra` (an object, e.g. a `securityContext`).
    pub fn add_pod_with_spec(
        &self,
        uid: &str,
        service_account: &str,
        labels: &[(&str, &str)],
        extra: serde_json::Value,
    ) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.pods
            .lock()
            .unwrap()
            .push((uid.into(), service_account.into(), labels, extra));
    }
}

impl Bed {
    pub async fn new() -> Bed {
        Bed::with_timeout(Duration::from_millis(800)).await
    }

    /// A bed whose daemon runs in selectors mode against `kubelet`.
    pub async fn with_kubelet(kubelet: &FakeKubelet) -> Bed {
        Bed::build(
            Duration::from_millis(800),
            Some(kubelet.addr),
            Arc::new(|_| {}),
        )
        .await
    }

    pub async fn with_timeout(first_svid_timeout: Duration) -> Bed {
        Bed::build(first_svid_timeout, None, Arc::new(|_| {})).await
    }

    /// Like [`Bed::with_timeout`], with the daemon's settings adjusted by `tweak`.
    pub async fn with_timeout_and(first_svid_timeout: Duration, tweak: Tweak) -> Bed {
        Bed::build(first_svid_timeout, None, tweak).await
    }

    /// A bed whose daemon's settings are adjusted by `tweak` (and which uses `kubelet` when
    /// given), connected and synchronized.
    pub async fn with(kubelet: Option<&FakeKubelet>, tweak: Tweak) -> Bed {
        Bed::build(Duration::from_millis(800), kubelet.map(|k| k.addr), tweak).await
    }

    /// Like [`Bed::with`], but the runtime connection is only accepted, not configured, and
    /// calls itself `runtime_name`.
    pub async fn unconfigured(runtime_name: &str, tweak: Tweak) -> Bed {
        Bed::assemble(Duration::from_millis(800), None, tweak, runtime_name, false).await
    }

    /// Like [`Bed::with`], with a fake runtime that calls itself `runtime_name` (also after
    /// a daemon restart).
    pub async fn on_runtime(
        runtime_name: &str,
        kubelet: Option<&FakeKubelet>,
        tweak: Tweak,
    ) -> Bed {
        Bed::assemble(
            Duration::from_millis(800),
            kubelet.map(|k| k.addr),
            tweak,
            runtime_name,
            true,
        )
        .await
    }

    async fn build(
        first_svid_timeout: Duration,
        kubelet: Option<std::net::SocketAddr>,
        tweak: Tweak,
    ) -> Bed {
        Bed::assemble(first_svid_timeout, kubelet, tweak, "containerd", true).await
    }

    async fn assemble(
        first_svid_timeout: Duration,
        kubelet: Option<std::net::SocketAddr>,
        tweak: Tweak,
        runtime_name: &str,
        handshake: bool,
    ) -> Bed {
        let agent = FakeAgent::start().await.unwrap();
        let ca = TestCa::new(TD).unwrap();
        agent.set_bundle(&ca.trust_domain_id(), &[ca.cert_der().to_vec()]);
        let root = unique_dir("root").join("artifacts");
        let host = Arc::new(MixedHost::default());
        let nri_path = temp_socket("d");
        let runtime = FakeRuntime::bind(&nri_path);
        let daemon = spawn_daemon(
            &agent,
            &root,
            host.clone(),
            &nri_path,
            first_svid_timeout,
            kubelet,
            &tweak,
        );
        let conn = runtime.accept(runtime_settings(runtime_name)).await;
        if handshake {
            conn.handshake().await;
        }
        Bed {
            agent,
            ca,
            root,
            host,
            runtime,
            conn,
            daemon,
            first_svid_timeout,
            kubelet,
            tweak,
            runtime_name: runtime_name.to_owned(),
        }
    }

    /// Stops the daemon and starts a new one against the same runtime and agent; the new
    /// connection is synchronized with `pods` and `containers`.
    pub async fn restart_daemon(
        &mut self,
        pods: Vec<pb::PodSandbox>,
        containers: Vec<pb::Container>,
    ) {
        self.daemon.shutdown.cancel();
        let _ = (&mut self.daemon.task).await;
        self.daemon = spawn_daemon(
            &self.agent,
            &self.root,
            self.host.clone(),
            &self.runtime.path,
            self.first_svid_timeout,
            self.kubelet,
            &self.tweak,
        );
        self.conn = self
            .runtime
            .accept(runtime_settings(&self.runtime_name))
            .await;
        self.conn.configure().await;
        self.conn.synchronize(pods, containers, 100).await;
    }

    pub fn svid(&self, path: &str) -> X509Svid {
        self.ca.mint(path, Duration::from_secs(3600)).unwrap()
    }

    /// Scripts the agent's answer for a PID.
    pub fn serve_pid(&self, pid: u32, svid: X509Svid) {
        self.agent.set_svids(
            WorkloadKey::Pid(pid as i32),
            SvidUpdate {
                svids: vec![svid],
                federates_with: vec![],
            },
        );
    }

    /// Scripts selectors mode for pod `uid`: the kubelet knows it as a pod of namespace `prod`
    /// with service account `web` and `labels`; the agent issues the returned SVID
    /// (`/ns/prod/sa/web`) for exactly the selectors `k8s:ns:prod` and `k8s:sa:web`.
    pub fn serve_selectors(
        &self,
        kubelet: &FakeKubelet,
        uid: &str,
        labels: &[(&str, &str)],
    ) -> X509Svid {
        kubelet.add_pod(uid, "web", labels);
        let svid = self.svid("/ns/prod/sa/web");
        self.serve_prod_web(svid.clone());
        svid
    }

    /// Scripts the agent's answer for the selectors `k8s:ns:prod` and `k8s:sa:web` (a
    /// rotation when they were served before).
    pub fn serve_prod_web(&self, svid: X509Svid) {
        self.agent.set_svids(
            WorkloadKey::Selectors(
                ["k8s:ns:prod", "k8s:sa:web"]
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect(),
            ),
            SvidUpdate {
                svids: vec![svid],
                federates_with: vec![],
            },
        );
    }

    /// A fake container process in the container's cgroup, running as `uid`.
    pub fn process(&self, pid: u32, container_id: &str, uid: u32) {
        self.host.procs.add_process(
            pid,
            format!("12:pids:/kubepods/besteffort/podx/{container_id}\n"),
        );
        self.host
            .procs
            .set_process_owner(pid, Owner { uid, gid: uid });
    }

    pub fn dir(&self, pod_uid: &str, container_id: &str) -> PathBuf {
        self.root.join(pod_uid).join(container_id)
    }

    pub async fn create(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::CreateContainerResponse, Status> {
        self.conn.create_container(pod, c).await
    }

    pub async fn start(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::Empty, Status> {
        self.conn.start_container(pod, c).await
    }

    pub async fn stop(&self, pod: &pb::PodSandbox, c: &pb::Container) {
        let _: pb::StopContainerResponse = self
            .conn
            .call(
                "StopContainer",
                &pb::StopContainerRequest {
                    pod: Some(pod.clone()),
                    container: Some(c.clone()),
                },
            )
            .await
            .unwrap();
    }

    pub async fn remove(&self, pod: &pb::PodSandbox, c: &pb::Container) {
        let _: pb::Empty = self
            .conn
            .call(
                "RemoveContainer",
                &pb::RemoveContainerRequest {
                    pod: Some(pod.clone()),
                    container: Some(c.clone()),
                },
            )
            .await
            .unwrap();
    }

    /// Waits until `file` in a container's directory has `predicate`-satisfying contents.
    /// Waits up to 5 s for the certificate file at `path` to lead with `svid`'s leaf.
    pub async fn wait_leaf(&self, path: &Path, svid: &X509Svid) -> bool {
        let leaf = &svid.cert_chain[0];
        self.wait_file(path, Duration::from_secs(5), |b| {
            pem_blocks(b, "CERTIFICATE").first() == Some(leaf)
        })
        .await
    }

    pub async fn wait_file(
        &self,
        path: &Path,
        timeout: Duration,
        predicate: impl Fn(&[u8]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(bytes) = std::fs::read(path)
                && predicate(&bytes)
            {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The fake runtime's settings when it calls itself `name` (with CRI-O's version and NRI
/// library where it is CRI-O).
fn runtime_settings(name: &str) -> RuntimeSettings {
    match name {
        "cri-o" => RuntimeSettings {
            name: name.into(),
            version: "1.36.3".into(),
            nri_version: "v0.11.0".into(),
            ..Default::default()
        },
        _ => RuntimeSettings {
            name: name.into(),
            ..Default::default()
        },
    }
}

fn spawn_daemon(
    agent: &FakeAgent,
    root: &Path,
    host: Arc<MixedHost>,
    nri_path: &Path,
    first_svid_timeout: Duration,
    kubelet: Option<std::net::SocketAddr>,
    tweak: &Tweak,
) -> Daemon {
    let metrics = Arc::new(Metrics::default());
    let mut cfg = EngineConfig::new(root, Policy::new(agent.path()));
    if let Some(addr) = kubelet {
        let url = format!("http://{addr}").parse().unwrap();
        cfg.kubelet = Some(Arc::new(nri_identity_injector::k8s::KubeletPods::new(
            nri_identity_injector::k8s::Endpoint::read_only(url),
        )));
        cfg.default_attestation = nri_identity_backends::Attestation::Selectors;
    }
    cfg.first_svid_timeout = first_svid_timeout;
    cfg.retry_initial = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    tweak(&mut cfg);
    let guarded = cfg.start_guard.is_some();
    let engine = Engine::new(
        cfg,
        DelegatedIdentityApi::new(ApiConfig::default()),
        host,
        metrics.clone(),
    );
    if guarded {
        // Its contents never run here: the runtime is fake.
        engine.install_guard(GUARD_STAND_IN).unwrap();
    }
    let mut options = Options::new("identity", "10").socket_path(nri_path);
    options.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    let shutdown = CancellationToken::new();
    let plugin =
        Arc::new(IdentityPlugin::new(engine.clone()).stop_on_wrong_runtime(shutdown.clone()));
    let runner = Runner::new(plugin.clone(), options).unwrap();
    let state = runner.state();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    Daemon {
        engine,
        plugin,
        metrics,
        state,
        shutdown,
        task,
    }
}

pub fn annotated_pod(name: &str, uid: &str, annotations: &[(&str, &str)]) -> pb::PodSandbox {
    pb::PodSandbox {
        id: format!("sandbox-{name}"),
        name: name.into(),
        uid: uid.into(),
        namespace: "default".into(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

pub fn container(pod: &pb::PodSandbox, name: &str, id: &str, pid: u32) -> pb::Container {
    pb::Container {
        id: id.into(),
        pod_sandbox_id: pod.id.clone(),
        name: name.into(),
        pid,
        ..Default::default()
    }
}

/// The design proposal's annotation for container `name`, with `agent` as the socket.
pub fn identity_annotation(agent: &Path, cert_dir: &str) -> String {
    format!(
        "- spire_agent_address: {}\n  cert_dir: {cert_dir}\n  svid_file_name: svid.pem\n  svid_key_file_name: svid_key.pem\n  svid_bundle_file_name: svid_bundle.pem\n",
        agent.display()
    )
}

/// PEM blocks of `label` in `pem`, decoded.
pub fn pem_blocks(pem: &[u8], label: &str) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(pem);
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text.as_ref();
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let Some(j) = after.find(&end) else { break };
        let b64: String = after[..j].chars().filter(|c| !c.is_whitespace()).collect();
        out.push(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        );
        rest = &after[j + end.len()..];
    }
    out
}
