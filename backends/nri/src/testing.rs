//! A fake NRI runtime for plugin tests (feature `testing`): the runtime side of the
//! multiplexer over a real unix socket. It cannot reproduce the Go runtime's quirks (tests/conformance does that
//! against the real library), so it asserts them explicitly instead: every frame the plugin
//! sends is checked against the 4096-byte limit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::ttrpc::{Request, Response, Status as WireStatus};
use crate::api::v1alpha1 as pb;
use crate::mux::{encode_frames, read_frame};
use crate::ttrpc::{Decoder, Kind, encode};
use crate::{Code, Status};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc, oneshot};

pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";

pub fn temp_socket(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nri-t-{}-{tag}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("nri.sock")
}

pub struct FakeRuntime {
    listener: UnixListener,
    pub path: PathBuf,
}

#[derive(Clone)]
pub struct RuntimeSettings {
    pub name: String,
    pub version: String,
    pub nri_version: String,
    /// Hold the RegisterPlugin reply until the plugin has answered Configure, as a Go
    /// runtime may.
    pub configure_before_register_reply: bool,
    pub request_timeout_ms: i64,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            name: "containerd".into(),
            version: "2.3.4".into(),
            nri_version: "v0.12.0".into(),
            configure_before_register_reply: false,
            request_timeout_ms: 2000,
        }
    }
}

impl FakeRuntime {
    pub fn bind(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        FakeRuntime {
            listener: UnixListener::bind(path).unwrap(),
            path: path.to_owned(),
        }
    }

    /// Accepts the plugin's connection and waits for its RegisterPlugin call.
    pub async fn accept(&self, settings: RuntimeSettings) -> PluginConn {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(10), self.listener.accept())
            .await
            .expect("plugin connects within 10 s")
            .unwrap();
        PluginConn::start(stream, settings).await
    }
}

struct Shared {
    pending: Mutex<HashMap<u32, oneshot::Sender<Response>>>,
    max_frame: AtomicUsize,
    registrations: Mutex<Vec<pb::RegisterPluginRequest>>,
    registered: Notify,
    configured: Notify,
    configure_answered: AtomicU32,
}

pub struct PluginConn {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    next_id: Mutex<u32>,
    pub settings: RuntimeSettings,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl PluginConn {
    async fn start(stream: UnixStream, settings: RuntimeSettings) -> PluginConn {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                if wr.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            max_frame: AtomicUsize::new(0),
            registrations: Mutex::new(Vec::new()),
            registered: Notify::new(),
            configured: Notify::new(),
            configure_answered: AtomicU32::new(0),
        });
        let (s, t, hold) = (
            shared.clone(),
            tx.clone(),
            settings.configure_before_register_reply,
        );
        let reader = tokio::spawn(async move {
            let mut conn1 = Decoder::default();
            let mut conn2 = Decoder::default();
            while let Ok(Some((conn, payload))) = read_frame(&mut rd).await {
                s.max_frame.fetch_max(payload.len(), Ordering::SeqCst);
                let decoder = if conn == 1 { &mut conn1 } else { &mut conn2 };
                decoder.push(&payload);
                while let Some(m) = decoder.next_message().unwrap() {
                    if conn == 1 {
                        let resp = Response::decode(m.payload).unwrap();
                        if let Some(w) = s.pending.lock().unwrap().remove(&m.stream_id) {
                            let _ = w.send(resp);
                        }
                    } else {
                        let req = Request::decode(m.payload).unwrap();
                        let (s, t) = (s.clone(), t.clone());
                        tokio::spawn(
                            async move { serve_runtime(s, t, m.stream_id, req, hold).await },
                        );
                    }
                }
            }
        });
        let conn = PluginConn {
            shared,
            tx,
            next_id: Mutex::new(1),
            settings,
            reader,
            writer,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while conn.shared.registrations.lock().unwrap().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "plugin registers within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        conn
    }

    pub fn registration(&self) -> pb::RegisterPluginRequest {
        self.shared
            .registrations
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap()
    }

    /// Largest frame payload the plugin has sent so far.
    pub fn max_frame(&self) -> usize {
        self.shared.max_frame.load(Ordering::SeqCst)
    }

    pub async fn call_raw(
        &self,
        service: &str,
        method: &str,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, Status> {
        let (wtx, wrx) = oneshot::channel();
        {
            let mut id = self.next_id.lock().unwrap();
            let req = Request {
                service: service.into(),
                method: method.into(),
                payload,
                timeout_nano: self.settings.request_timeout_ms * 1_000_000,
                metadata: vec![],
            };
            self.shared.pending.lock().unwrap().insert(*id, wtx);
            let mut framed = Vec::new();
            // The Go runtime writes a whole message as one frame, whatever its size.
            let msg = encode(*id, Kind::Request, &req.encode_to_vec());
            framed.extend_from_slice(&1u32.to_be_bytes());
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            self.tx
                .send(framed)
                .map_err(|_| Status::new(Code::Unavailable, "closed"))?;
            *id += 2;
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), wrx)
            .await
            .map_err(|_| Status::new(Code::DeadlineExceeded, "no reply within 10 s"))?
            .map_err(|_| Status::new(Code::Unavailable, "closed"))?;
        match resp.status {
            Some(WireStatus { code, message }) if code != 0 => {
                Err(Status::new(Code::from_i32(code), message))
            }
            _ => Ok(resp.payload),
        }
    }

    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        req: &Req,
    ) -> Result<Resp, Status> {
        let payload = self
            .call_raw(PLUGIN_SERVICE, method, req.encode_to_vec())
            .await?;
        Ok(Resp::decode(&payload[..]).unwrap())
    }

    /// CreateContainer for `c` in `pod`, as the runtime sends it.
    pub async fn create_container(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::CreateContainerResponse, Status> {
        let req = pb::CreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.call("CreateContainer", &req).await
    }

    /// StartContainer for `c` in `pod`, as the runtime sends it.
    pub async fn start_container(
        &self,
        pod: &pb::PodSandbox,
        c: &pb::Container,
    ) -> Result<pb::Empty, Status> {
        let req = pb::StartContainerRequest {
            pod: Some(pod.clone()),
            container: Some(c.clone()),
        };
        self.call("StartContainer", &req).await
    }

    pub async fn configure(&self) -> pb::ConfigureResponse {
        let req = pb::ConfigureRequest {
            config: String::new(),
            runtime_name: self.settings.name.clone(),
            runtime_version: self.settings.version.clone(),
            registration_timeout: 5000,
            request_timeout: self.settings.request_timeout_ms,
            nri_version: self.settings.nri_version.clone(),
        };
        let r = self
            .call("Configure", &req)
            .await
            .expect("configure succeeds");
        self.shared.configure_answered.store(1, Ordering::SeqCst);
        self.shared.configured.notify_waiters();
        r
    }

    /// Sends a synchronization in chunks of `chunk` pods (all containers in the last chunk).
    pub async fn synchronize(
        &self,
        pods: Vec<pb::PodSandbox>,
        containers: Vec<pb::Container>,
        chunk: usize,
    ) -> Vec<pb::SynchronizeResponse> {
        let mut replies = Vec::new();
        let chunks: Vec<_> = pods.chunks(chunk.max(1)).map(|c| c.to_vec()).collect();
        let n = chunks.len().max(1);
        for i in 0..n {
            let last = i + 1 == n;
            let req = pb::SynchronizeRequest {
                pods: chunks.get(i).cloned().unwrap_or_default(),
                containers: if last { containers.clone() } else { vec![] },
                more: !last,
            };
            replies.push(
                self.call("Synchronize", &req)
                    .await
                    .expect("synchronize succeeds"),
            );
        }
        replies
    }

    /// Configure + an empty Synchronize: what every runtime does after registration.
    pub async fn handshake(&self) -> pb::ConfigureResponse {
        let r = self.configure().await;
        self.synchronize(vec![], vec![], 1).await;
        r
    }

    pub async fn close(self) {
        self.reader.abort();
        self.writer.abort();
        let _ = self.reader.await;
        let _ = self.writer.await;
    }
}

async fn serve_runtime(
    s: Arc<Shared>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    id: u32,
    req: Request,
    hold: bool,
) {
    assert_eq!(req.service, "nri.pkg.api.v1alpha1.Runtime");
    assert!(id % 2 == 1, "client stream IDs are odd");
    let payload = match req.method.as_str() {
        "RegisterPlugin" => {
            let r = pb::RegisterPluginRequest::decode(&req.payload[..]).unwrap();
            s.registrations.lock().unwrap().push(r);
            let wait = s.configured.notified();
            s.registered.notify_waiters();
            if hold && s.configure_answered.load(Ordering::SeqCst) == 0 {
                wait.await;
            }
            pb::Empty {}.encode_to_vec()
        }
        "UpdateContainers" => pb::UpdateContainersResponse { failed: vec![] }.encode_to_vec(),
        other => panic!("unexpected runtime method {other}"),
    };
    let resp = Response {
        status: None,
        payload,
    };
    let mut framed = Vec::new();
    encode_frames(
        2,
        &encode(id, Kind::Response, &resp.encode_to_vec()),
        &mut framed,
    );
    let _ = tx.send(framed);
}

pub fn pod(name: &str) -> pb::PodSandbox {
    pb::PodSandbox {
        id: format!("pod-{name}"),
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        ..Default::default()
    }
}

pub fn container(name: &str) -> pb::Container {
    pb::Container {
        id: format!("ctr-{name}"),
        name: name.into(),
        pod_sandbox_id: "pod-p".into(),
        ..Default::default()
    }
}
