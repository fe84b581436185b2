//! The in-process test bed of the benchmarks: the real engine and NRI plugin (on their own
//! tokio runtime, shaped like the daemon's: two workers), driven by the fake NRI runtime and
//! the fake SPIRE agent (on the benchmark's runtime), with real files in a temporary artifact
//! root and fake processes.
//!
//! `MixedHost` is the idea of `tests/common/mod.rs` (benches cannot import tests/).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nri_identity_injector::annotation::Policy;
use nri_identity_injector::engine::{Engine, EngineConfig};
use nri_identity_injector::limits::IdentityLimits;
use nri_identity_injector::metrics::Metrics;
use nri_identity_injector::nri::IdentityPlugin;
use nri_identity_injector::spire::fake::{FakeAgent, TestCa};
use nri_identity_injector::spire::{ApiConfig, DelegatedIdentityApi};
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::testing::{FakeRuntime, PluginConn, RuntimeSettings, temp_socket};
use nri_plugin::{Options, Runner};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub const KEY: &str = "identity.noderesource.dev/container.c0";
pub const TD: &str = "example.org";

/// Real files, fake processes.
pub type MixedHost = nri_identity_injector::host::SplitHost;

/// A fresh directory under `base` (removed by [`Bed::finish`]).
pub fn unique_dir(base: &Path, tag: &str) -> PathBuf {
    let dir = base.join(format!(
        "nii-bench-{}-{tag}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Bed {
    pub agent: FakeAgent,
    pub ca: TestCa,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub host: Arc<MixedHost>,
    pub conn: Arc<PluginConn>,
    pub engine: Engine<DelegatedIdentityApi>,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), nri_plugin::Error>>,
    runtime: FakeRuntime,
}

impl Bed {
    /// Runs on the benchmark's runtime; the daemon side is spawned on `daemon`.
    pub async fn new(daemon: &Handle, root_base: &Path) -> Bed {
        let agent = FakeAgent::start().await.unwrap();
        let ca = TestCa::new(TD).unwrap();
        agent.set_bundle(&ca.trust_domain_id(), &[ca.cert_der().to_vec()]);
        let dir = unique_dir(root_base, "root");
        let root = dir.join("artifacts");
        let host = Arc::new(MixedHost::default());
        let nri_path = temp_socket("bench");
        let runtime = FakeRuntime::bind(&nri_path);

        let metrics = Arc::new(Metrics::default());
        let mut cfg = EngineConfig::new(&root, Policy::new(agent.path()));
        // The create benchmark holds thousands of identities at once, more than the node's
        // default limit; counting them (the limit's own cost) stays in the figures.
        cfg.limits = IdentityLimits {
            total: usize::MAX,
            ..IdentityLimits::DEFAULT
        };
        let engine = Engine::new(
            cfg,
            DelegatedIdentityApi::new(ApiConfig::default()),
            host.clone(),
            metrics.clone(),
        );
        let options = Options::new("identity", "10").socket_path(&nri_path);
        let runner = Runner::new(Arc::new(IdentityPlugin::new(engine.clone())), options).unwrap();
        let shutdown = CancellationToken::new();
        let task = daemon.spawn(runner.run(shutdown.clone()));
        let conn = Arc::new(runtime.accept(RuntimeSettings::default()).await);
        conn.handshake().await;
        Bed {
            agent,
            ca,
            dir,
            root,
            host,
            conn,
            engine,
            metrics,
            shutdown,
            task,
            runtime,
        }
    }

    pub fn annotated_pod(&self, uid: &str) -> pb::PodSandbox {
        annotated_pod(uid, &identity_annotation(self.agent.path()))
    }

    pub async fn create(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::CreateContainerResponse, nri_plugin::Status> {
        self.conn.create_container(pod, c).await
    }

    pub async fn start(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::Empty, nri_plugin::Status> {
        self.conn.start_container(pod, c).await
    }

    /// Stops the daemon side and removes the artifact root.
    pub async fn finish(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.engine.shutdown(Duration::from_secs(2)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.runtime.path.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// The design proposal's annotation, with `agent` as the socket.
pub fn identity_annotation(agent: &Path) -> String {
    format!(
        "- spire_agent_address: {}\n  cert_dir: /var/certs\n  svid_file_name: svid.pem\n  svid_key_file_name: svid_key.pem\n  svid_bundle_file_name: svid_bundle.pem\n",
        agent.display()
    )
}

pub fn plain_pod(uid: &str) -> pb::PodSandbox {
    pb::PodSandbox {
        id: format!("sandbox-{uid}"),
        name: format!("pod-{uid}"),
        uid: uid.into(),
        namespace: "default".into(),
        ..Default::default()
    }
}

pub fn annotated_pod(uid: &str, annotation: &str) -> pb::PodSandbox {
    pb::PodSandbox {
        id: format!("sandbox-{uid}"),
        name: format!("pod-{uid}"),
        uid: uid.into(),
        namespace: "default".into(),
        annotations: [(KEY.to_owned(), annotation.to_owned())].into(),
        ..Default::default()
    }
}

pub fn container(pod: &pb::PodSandbox, id: &str, pid: u32) -> pb::Container {
    pb::Container {
        id: id.into(),
        pod_sandbox_id: pod.id.clone(),
        name: "c0".into(),
        pid,
        ..Default::default()
    }
}

/// Latency figures in microseconds.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Nearest-rank percentiles of `samples` (µs).
pub fn summarize(samples: &[f64]) -> Summary {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    assert!(n > 0, "no samples");
    let pct = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    Summary {
        n,
        p50: pct(0.50),
        p90: pct(0.90),
        p99: pct(0.99),
        max: v[n - 1],
        mean: v.iter().sum::<f64>() / n as f64,
    }
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The load average, to tell a disturbed run when reading the figures.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
