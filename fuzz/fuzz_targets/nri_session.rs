//! A hostile runtime on the NRI socket, against the daemon's real plugin and engine: a
//! sequence of requests (Configure, Synchronize, every lifecycle event, with pods and
//! containers whose IDs, UIDs, names, annotations and mounts are hostile), replies to the
//! plugin's own calls, and raw frames, on one connection; the engine writes to the recording
//! host and asks an agent that is not there.
//!
//! Holds: no panic in any task; the session ends when the runtime closes the connection (a
//! hang is a libFuzzer timeout; the clock is virtual); every file-system operation the
//! daemon performs stays strictly under the artifact root, and the root itself is never
//! removed — whatever the runtime says.

#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nri_identity_injector::annotation::Policy;
use nri_identity_injector::engine::{Engine, EngineConfig};
use nri_identity_injector::host::{Op, RecordingHost};
use nri_identity_injector::metrics::Metrics;
use nri_identity_injector::nri::IdentityPlugin;
use nri_identity_injector::spire::{ApiConfig, DelegatedIdentityApi};
use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::fuzzing::{
    Kind, PLUGIN_CONN, RUNTIME_CONN, Request, Response, WireStatus, encode, encode_frames, serve,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROOT: &str = "/run/nri-identity-injector";
const AGENT: &str = "/nonexistent/spire/admin.sock";

const IDS: &[&str] = &[
    "c1",
    "c2",
    "p1",
    "",
    ".",
    "..",
    "../..",
    "a/b",
    "/",
    "/etc",
    ".tmp-x",
    "c1\0x",
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];
const NAMES: &[&str] = &["web", "sidecar", "", "web/x", "..", "init"];
const HANDLERS: &[&str] = &["", "runc", "kata", "kata-fc", "kata-qemu", "gvisor"];
const DESTS: &[&str] = &["/var/certs", "/", "/proc", "", "relative"];

fn pick(list: &[&str], i: u8) -> String {
    list[usize::from(i) % list.len()].to_owned()
}

#[derive(Arbitrary, Debug)]
enum AnnValue {
    Valid,
    Combined,
    ContinueOnFailure,
    Selectors,
    CopyOnce,
    Junk(String),
}

impl AnnValue {
    fn text(&self) -> String {
        let base = format!("cert_dir: /var/certs\nspire_agent_address: {AGENT}\n");
        match self {
            AnnValue::Valid => base,
            AnnValue::Combined => format!("{base}layout: combined\n"),
            AnnValue::ContinueOnFailure => format!("{base}on_failure: continue\n"),
            AnnValue::Selectors => format!("{base}attestation: selectors\n"),
            AnnValue::CopyOnce => format!("{base}copy_once: true\n"),
            AnnValue::Junk(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FPod {
    id: u8,
    uid: u8,
    name: u8,
    namespace: u8,
    handler: u8,
    /// Container name (index into NAMES; 255 for the pod key) and value.
    annotations: Vec<(u8, AnnValue)>,
}

impl FPod {
    fn pb(&self) -> pb::PodSandbox {
        pb::PodSandbox {
            id: pick(IDS, self.id),
            uid: pick(IDS, self.uid),
            name: pick(NAMES, self.name),
            namespace: pick(NAMES, self.namespace),
            runtime_handler: pick(HANDLERS, self.handler),
            annotations: self
                .annotations
                .iter()
                .map(|(c, v)| {
                    let key = if *c == 255 {
                        "identity.noderesource.dev/pod".to_owned()
                    } else {
                        format!("identity.noderesource.dev/container.{}", pick(NAMES, *c))
                    };
                    (key, v.text())
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FContainer {
    id: u8,
    pod: u8,
    name: u8,
    pid: u32,
    state: u8,
    user: Option<(u32, u32)>,
    mounts: Vec<(u8, u8, u8)>,
}

impl FContainer {
    fn pb(&self) -> pb::Container {
        pb::Container {
            id: pick(IDS, self.id),
            pod_sandbox_id: pick(IDS, self.pod),
            name: pick(NAMES, self.name),
            pid: self.pid % 8,
            state: i32::from(self.state % 5),
            user: self.user.map(|(uid, gid)| pb::User {
                uid,
                gid,
                ..Default::default()
            }),
            mounts: self
                .mounts
                .iter()
                .map(|(d, pod, c)| pb::Mount {
                    destination: pick(DESTS, *d),
                    source: format!("{ROOT}/{}/{}", pick(IDS, *pod), pick(IDS, *c)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Call {
    Configure {
        runtime: u8,
    },
    Synchronize {
        pods: Vec<FPod>,
        containers: Vec<FContainer>,
        more: bool,
    },
    /// An event by its index in `nri_plugin::Event::ALL`, as its own method.
    Event {
        event: u8,
        pod: FPod,
        container: Option<FContainer>,
    },
    StateChange {
        event: i32,
        pod: Option<FPod>,
        container: Option<FContainer>,
    },
    Shutdown,
    Unknown {
        method: String,
        payload: Vec<u8>,
    },
}

const RUNTIMES: &[&str] = &["containerd", "cri-o", "", "other"];

impl Call {
    fn method_and_payload(&self) -> (String, Vec<u8>) {
        match self {
            Call::Configure { runtime } => (
                "Configure".into(),
                pb::ConfigureRequest {
                    runtime_name: pick(RUNTIMES, *runtime),
                    runtime_version: "2.3.4".into(),
                    nri_version: "v0.12.0".into(),
                    request_timeout: 2000,
                    registration_timeout: 5000,
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            Call::Synchronize {
                pods,
                containers,
                more,
            } => (
                "Synchronize".into(),
                pb::SynchronizeRequest {
                    pods: pods.iter().map(FPod::pb).collect(),
                    containers: containers.iter().map(FContainer::pb).collect(),
                    more: *more,
                }
                .encode_to_vec(),
            ),
            Call::Event {
                event,
                pod,
                container,
            } => {
                let e = nri_plugin::Event::ALL[usize::from(*event) % nri_plugin::Event::ALL.len()];
                (
                    e.method().to_owned(),
                    pb::StartContainerRequest {
                        pod: Some(pod.pb()),
                        container: container.as_ref().map(FContainer::pb),
                    }
                    .encode_to_vec(),
                )
            }
            Call::StateChange {
                event,
                pod,
                container,
            } => (
                "StateChange".into(),
                pb::StateChangeEvent {
                    event: *event % 16,
                    pod: pod.as_ref().map(FPod::pb),
                    container: container.as_ref().map(FContainer::pb),
                }
                .encode_to_vec(),
            ),
            Call::Shutdown => ("Shutdown".into(), Vec::new()),
            Call::Unknown { method, payload } => (method.clone(), payload.clone()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Frame {
    /// A request on connection 1 with a timeout in milliseconds (0: none).
    Request {
        call: Call,
        timeout_ms: u16,
        plugin_service: bool,
    },
    /// A reply on connection 2 to the plugin's call `stream_id`.
    Reply {
        stream_id: u8,
        code: i32,
        payload: Vec<u8>,
    },
    /// Raw bytes on a connection, as ttrpc messages or as multiplexer payload.
    Raw { conn: u8, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Answer RegisterPlugin (stream 1 on connection 2) first.
    accept_registration: bool,
    frames: Vec<Frame>,
}

fn encode_input(input: &Input) -> Vec<u8> {
    let mut out = Vec::new();
    if input.accept_registration {
        let reply = Response {
            status: None,
            payload: pb::Empty {}.encode_to_vec(),
        };
        encode_frames(
            RUNTIME_CONN,
            &encode(1, Kind::Response, &reply.encode_to_vec()),
            &mut out,
        );
    }
    let mut stream_id = 1u32;
    for f in &input.frames {
        match f {
            Frame::Request {
                call,
                timeout_ms,
                plugin_service,
            } => {
                let (method, payload) = call.method_and_payload();
                let request = Request {
                    service: if *plugin_service {
                        "nri.pkg.api.v1alpha1.Plugin".into()
                    } else {
                        "nri.pkg.api.v1alpha1.Runtime".into()
                    },
                    method,
                    payload,
                    timeout_nano: i64::from(*timeout_ms) * 1_000_000,
                    metadata: Vec::new(),
                };
                encode_frames(
                    PLUGIN_CONN,
                    &encode(stream_id, Kind::Request, &request.encode_to_vec()),
                    &mut out,
                );
                stream_id = stream_id.wrapping_add(2);
            }
            Frame::Reply {
                stream_id,
                code,
                payload,
            } => {
                let reply = Response {
                    status: (*code != 0).then(|| WireStatus {
                        code: *code,
                        message: "refused".into(),
                    }),
                    payload: payload.clone(),
                };
                encode_frames(
                    RUNTIME_CONN,
                    &encode(
                        u32::from(*stream_id),
                        Kind::Response,
                        &reply.encode_to_vec(),
                    ),
                    &mut out,
                );
            }
            Frame::Raw { conn, bytes } => encode_frames(u32::from(*conn % 4), bytes, &mut out),
        }
    }
    out
}

/// Strictly below the root, without `..`, never the root itself.
fn under_root(path: &Path) -> bool {
    let root = Path::new(ROOT);
    path != root
        && path.starts_with(root)
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn check_ops(ops: &[Op]) {
    for op in ops {
        let ok = match op {
            // Creating (or correcting) the root is the writer's first step.
            Op::MkdirAt { path, .. } | Op::Chmod { path, .. } => {
                path == Path::new(ROOT) || under_root(path)
            }
            Op::WriteFile { path, .. }
            | Op::Chown { path, .. }
            | Op::SetXattr { path, .. }
            | Op::Unlink { path }
            | Op::RemoveAll { path }
            | Op::RemoveDir { path } => under_root(path),
            Op::FsyncDir { path } => path == Path::new(ROOT) || under_root(path),
            Op::Rename { dir, from, to } => {
                under_root(dir) && !from.contains('/') && !to.contains('/')
            }
            // Reads change nothing on the host.
            Op::OpenPidfd { .. } | Op::ReadRuntimeFile { .. } => true,
        };
        assert!(ok, "host operation outside the artifact root: {op:?}");
    }
}

fuzz_target!(|input: Input| {
    let bytes = encode_input(&input);
    let rt = nri_identity_injector_fuzz::runtime();
    let host = Arc::new(RecordingHost::new());
    rt.block_on(async {
        let mut cfg = EngineConfig::new(PathBuf::from(ROOT), Policy::new(AGENT));
        cfg.retry_initial = Duration::from_millis(200);
        cfg.retry_max = Duration::from_secs(2);
        let engine = Engine::new(
            cfg,
            DelegatedIdentityApi::new(ApiConfig::default()),
            host.clone(),
            Arc::new(Metrics::default()),
        );
        let plugin = Arc::new(IdentityPlugin::new(engine.clone()));
        let (ours, theirs) = tokio::net::UnixStream::pair().expect("socket pair");
        let session = tokio::spawn(serve(ours, plugin, Duration::from_secs(2)));
        let (mut rd, mut wr) = theirs.into_split();
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        // Requests still in flight when the runtime hung up keep running; give them time
        // (virtual) to reach the host.
        let _ = tokio::time::timeout(Duration::from_secs(30), session).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        engine.shutdown(Duration::from_secs(1)).await;
        drop(wr);
        drain.abort();
    });
    drop(rt);
    check_ops(&host.ops());
});
