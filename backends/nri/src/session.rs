//! One connection to the runtime: the multiplexer, the Plugin service we serve on
//! connection 1 and the Runtime client we use on connection 2.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, trace, warn};

use crate::api::ttrpc as env;
use crate::api::v1alpha1 as pb;
use crate::api::{
    Container, Event, EventSet, NRI_VERSION, PLUGIN_SERVICE, PodSandbox, RUNTIME_SERVICE,
};
use crate::mux::{self, PLUGIN_CONN, RUNTIME_CONN};
use crate::ttrpc::{self, Decoder, Kind};
use crate::{Code, ConnectionState, Context, Delivery, Error, Plugin, RuntimeInfo, Status};

/// Sends whole ttrpc messages; the writer task puts them on the socket in order.
#[derive(Clone)]
struct Outgoing {
    tx: mpsc::Sender<Vec<u8>>,
}

impl Outgoing {
    async fn send(
        &self,
        conn: u32,
        stream_id: u32,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), Error> {
        let message = ttrpc::encode(stream_id, kind, payload);
        let mut framed = Vec::new();
        mux::encode_frames(conn, &message, &mut framed);
        self.tx.send(framed).await.map_err(|_| Error::Closed)
    }
}

/// How long a shutdown waits for the answers to calls in flight, and then for them to be
/// written: a handler that asked for the shutdown (a refused Configure) must still be heard.
const DRAIN: Duration = Duration::from_secs(1);

/// Writes queued messages in order; once `drain` fires, writes what is queued and returns.
async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    drain: CancellationToken,
) {
    loop {
        let buf = tokio::select! {
            biased;
            buf = rx.recv() => match buf {
                Some(buf) => buf,
                None => return,
            },
            _ = drain.cancelled() => match rx.try_recv() {
                Ok(buf) => buf,
                Err(_) => return,
            },
        };
        if let Err(error) = writer.write_all(&buf).await {
            debug!(%error, "writing to the runtime failed");
            return;
        }
    }
}

/// A client of the runtime's `Runtime` service over the current connection.
#[derive(Clone)]
pub struct RuntimeClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    out: Outgoing,
    pending: Mutex<HashMap<u32, oneshot::Sender<env::Response>>>,
    /// The Go ttrpc server rejects stream IDs that are even or not increasing, so an ID is
    /// taken and its request queued under one lock.
    next_id: tokio::sync::Mutex<u32>,
    calls: AtomicU32,
}

impl fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeClient")
            .field("calls", &self.inner.calls.load(Ordering::Relaxed))
            .finish()
    }
}

impl RuntimeClient {
    fn new(out: Outgoing) -> Self {
        RuntimeClient {
            inner: Arc::new(ClientInner {
                out,
                pending: Mutex::new(HashMap::new()),
                next_id: tokio::sync::Mutex::new(1),
                calls: AtomicU32::new(0),
            }),
        }
    }

    pub(crate) async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &'static str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, Error> {
        let envelope = env::Request {
            service: RUNTIME_SERVICE.to_owned(),
            method: method.to_owned(),
            payload: request.encode_to_vec(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            metadata: Vec::new(),
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut next = self.inner.next_id.lock().await;
            let id = *next;
            *next = next.wrapping_add(2);
            lock(&self.inner.pending).insert(id, tx);
            self.inner
                .out
                .send(RUNTIME_CONN, id, Kind::Request, &envelope.encode_to_vec())
                .await?;
            id
        };
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let response = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return Err(Error::Closed),
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                return Err(Error::Timeout {
                    what: method,
                    timeout,
                });
            }
        };
        if let Some(status) = response.status.filter(|s| s.code != 0) {
            return Err(Error::Call {
                method,
                status: Status::new(Code::from_i32(status.code), status.message),
            });
        }
        Resp::decode(&response.payload[..])
            .map_err(|e| Error::Protocol(format!("undecodable {method} reply: {e}")))
    }

    fn complete(&self, message: ttrpc::Message) -> Result<(), Error> {
        if message.kind != Kind::Response as u8 {
            return Err(Error::Protocol(format!(
                "unexpected message type {} on connection 2",
                message.kind
            )));
        }
        let response = env::Response::decode(message.payload)
            .map_err(|e| Error::Protocol(format!("undecodable ttrpc response: {e}")))?;
        match lock(&self.inner.pending).remove(&message.stream_id) {
            Some(waiter) => {
                let _ = waiter.send(response);
            }
            None => trace!(
                stream_id = message.stream_id,
                "reply to a call nobody waits for"
            ),
        }
        Ok(())
    }

    fn close(&self) {
        lock(&self.inner.pending).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not wedge the connection: the data stays consistent because
    // every critical section is a single insert/remove/take.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the Plugin service for one connection.
struct Dispatcher<P> {
    plugin: Arc<P>,
    out: Outgoing,
    /// The handlers of calls being answered.
    inflight: TaskTracker,
    runtime: RuntimeClient,
    subscribed: AtomicU32,
    pending_sync: Mutex<(Vec<PodSandbox>, Vec<Container>)>,
    runtime_info: Mutex<Option<Arc<RuntimeInfo>>>,
    state: watch::Sender<ConnectionState>,
}

impl<P: Plugin> Dispatcher<P> {
    fn subscribed(&self, event: Event) -> bool {
        self.subscribed.load(Ordering::Acquire) & event.bit() != 0
    }

    fn spawn_request(self: &Arc<Self>, message: ttrpc::Message) {
        if message.kind != Kind::Request as u8 {
            debug!(
                kind = message.kind,
                "ignoring non-request message on connection 1"
            );
            return;
        }
        let request = match env::Request::decode(message.payload) {
            Ok(r) => r,
            Err(error) => {
                warn!(%error, "undecodable ttrpc request");
                let this = self.clone();
                self.inflight.spawn(async move {
                    let status =
                        Status::invalid_argument(format!("undecodable ttrpc request: {error}"));
                    this.reply(message.stream_id, Err(status)).await;
                });
                return;
            }
        };
        let deadline = (request.timeout_nano > 0)
            .then(|| Instant::now() + Duration::from_nanos(request.timeout_nano as u64));
        let span =
            debug_span!("nri.request", method = %request.method, stream_id = message.stream_id);
        let this = self.clone();
        self.inflight.spawn(
            async move {
                let started = Instant::now();
                let result = this.dispatch(request, deadline).await;
                if let Err(status) = &result {
                    debug!(code = ?status.code, message = %status.message, "answering with an error");
                }
                this.reply(message.stream_id, result).await;
                trace!(elapsed_us = started.elapsed().as_micros() as u64, "answered");
            }
            .instrument(span),
        );
    }

    async fn reply(&self, stream_id: u32, result: Result<Vec<u8>, Status>) {
        let response = match result {
            Ok(payload) => env::Response {
                status: None,
                payload,
            },
            Err(s) => env::Response {
                status: Some(env::Status {
                    code: s.code as i32,
                    message: s.message,
                }),
                payload: Vec::new(),
            },
        };
        if self
            .out
            .send(
                PLUGIN_CONN,
                stream_id,
                Kind::Response,
                &response.encode_to_vec(),
            )
            .await
            .is_err()
        {
            debug!(
                stream_id,
                "connection closed before the reply could be sent"
            );
        }
    }

    fn context(&self, deadline: Option<Instant>, delivery: Delivery) -> Context {
        Context {
            deadline,
            delivery,
            runtime: self.runtime.clone(),
        }
    }

    async fn dispatch(
        &self,
        request: env::Request,
        deadline: Option<Instant>,
    ) -> Result<Vec<u8>, Status> {
        if request.service != PLUGIN_SERVICE {
            return Err(Status::unimplemented(format!(
                "service {} is not served",
                request.service
            )));
        }
        let ctx = self.context(deadline, Delivery::Rpc);
        let payload = &request.payload[..];
        match request.method.as_str() {
            "Configure" => self.configure(&ctx, decode(payload)?).await,
            "Synchronize" => self.synchronize(&ctx, decode(payload)?).await,
            "Shutdown" => Ok(Vec::new()),
            "StateChange" => {
                let change: pb::StateChangeEvent = decode(payload)?;
                match Event::from_wire(change.event) {
                    Some(event) if self.subscribed(event) => {
                        let ctx = self.context(deadline, Delivery::StateChange);
                        let pod = change.pod.unwrap_or_default();
                        self.event(event, &ctx, pod, change.container).await?;
                    }
                    _ => trace!(event = change.event, "state change not subscribed"),
                }
                Ok(Vec::new())
            }
            method => match Event::from_method(method) {
                Some(event) if self.subscribed(event) => {
                    // Every pod event request is {pod = 1}, every container event request
                    // {pod = 1, container = 2}: one shape decodes them all.
                    let req: pb::StartContainerRequest = decode(payload)?;
                    self.event(event, &ctx, req.pod.unwrap_or_default(), req.container)
                        .await
                }
                // Unimplemented, never NotFound: a v0.12 runtime then falls back to
                // StateChange, while NotFound would fail the container.
                _ => Err(Status::unimplemented(format!(
                    "{method} is not handled by this plugin"
                ))),
            },
        }
    }

    async fn event(
        &self,
        event: Event,
        ctx: &Context,
        pod: PodSandbox,
        container: Option<Container>,
    ) -> Result<Vec<u8>, Status> {
        let p = &self.plugin;
        let c = || container.clone().unwrap_or_default();
        let empty = |r: Result<(), Status>| r.map(|()| Vec::new());
        match event {
            Event::RunPodSandbox => empty(p.run_pod_sandbox(ctx, pod).await),
            Event::UpdatePodSandbox => empty(p.update_pod_sandbox(ctx, pod).await),
            Event::PostUpdatePodSandbox => empty(p.post_update_pod_sandbox(ctx, pod).await),
            Event::StopPodSandbox => empty(p.stop_pod_sandbox(ctx, pod).await),
            Event::RemovePodSandbox => empty(p.remove_pod_sandbox(ctx, pod).await),
            Event::CreateContainer => {
                let reply = p.create_container(ctx, pod, c()).await?;
                Ok(pb::CreateContainerResponse::from(reply).encode_to_vec())
            }
            Event::PostCreateContainer => empty(p.post_create_container(ctx, pod, c()).await),
            Event::StartContainer => empty(p.start_container(ctx, pod, c()).await),
            Event::PostStartContainer => empty(p.post_start_container(ctx, pod, c()).await),
            Event::UpdateContainer => {
                let update = p.update_container(ctx, pod, c()).await?;
                Ok(pb::UpdateContainerResponse {
                    update,
                    evict: Vec::new(),
                }
                .encode_to_vec())
            }
            Event::PostUpdateContainer => empty(p.post_update_container(ctx, pod, c()).await),
            Event::StopContainer => {
                let update = p.stop_container(ctx, pod, c()).await?;
                Ok(pb::StopContainerResponse { update }.encode_to_vec())
            }
            Event::RemoveContainer => empty(p.remove_container(ctx, pod, c()).await),
        }
    }

    async fn configure(&self, ctx: &Context, req: pb::ConfigureRequest) -> Result<Vec<u8>, Status> {
        let info = RuntimeInfo {
            name: req.runtime_name,
            version: req.runtime_version,
            nri_version: req.nri_version,
            config: req.config,
            registration_timeout: Duration::from_millis(req.registration_timeout.max(0) as u64),
            request_timeout: Duration::from_millis(req.request_timeout.max(0) as u64),
        };
        self.plugin.configure(ctx, &info).await?;
        let valid = crate::api::valid_events(&info.nri_version, &info.name, &info.version);
        let wanted = self.plugin.events();
        let mask = wanted.wire_mask(valid);
        let dropped = EventSet::from_iter(wanted.iter().filter(|e| e.bit() & valid == 0));
        if !dropped.is_empty() {
            warn!(events = ?dropped.iter().collect::<Vec<_>>(), runtime = %info.name, version = %info.version,
                "the runtime is too old for some subscribed events; they will not be delivered");
        }
        self.subscribed.store(mask as u32, Ordering::Release);
        debug!(runtime = %info.name, version = %info.version, nri_version = %info.nri_version, mask = format!("{mask:#x}"), "configured");
        *lock(&self.runtime_info) = Some(Arc::new(info));
        Ok(pb::ConfigureResponse { events: mask }.encode_to_vec())
    }

    async fn synchronize(
        &self,
        ctx: &Context,
        req: pb::SynchronizeRequest,
    ) -> Result<Vec<u8>, Status> {
        let (pods, containers) = {
            let mut pending = lock(&self.pending_sync);
            pending.0.extend(req.pods);
            pending.1.extend(req.containers);
            if req.more {
                // Echo `more` with no updates until the last chunk; any other answer makes
                // the runtime close the plugin ("does not handle split sync requests").
                return Ok(pb::SynchronizeResponse {
                    update: Vec::new(),
                    more: true,
                }
                .encode_to_vec());
            }
            std::mem::take(&mut *pending)
        };
        debug!(
            pods = pods.len(),
            containers = containers.len(),
            "synchronizing"
        );
        let update = self.plugin.synchronize(ctx, pods, containers).await?;
        let info = lock(&self.runtime_info).clone().unwrap_or_default();
        self.state.send_replace(ConnectionState::Ready(info));
        Ok(pb::SynchronizeResponse {
            update,
            more: false,
        }
        .encode_to_vec())
    }
}

fn decode<M: prost::Message + Default>(payload: &[u8]) -> Result<M, Status> {
    M::decode(payload).map_err(|e| Status::invalid_argument(format!("undecodable request: {e}")))
}

async fn read_loop<P: Plugin>(
    reader: OwnedReadHalf,
    dispatcher: Arc<Dispatcher<P>>,
    client: RuntimeClient,
) -> Result<(), Error> {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut plugin_conn = Decoder::default();
    let mut runtime_conn = Decoder::default();
    while let Some((conn, payload)) = mux::read_frame(&mut reader).await? {
        match conn {
            PLUGIN_CONN => {
                plugin_conn.push(&payload);
                while let Some(message) = plugin_conn.next_message()? {
                    dispatcher.spawn_request(message);
                }
            }
            RUNTIME_CONN => {
                runtime_conn.push(&payload);
                while let Some(message) = runtime_conn.next_message()? {
                    client.complete(message)?;
                }
            }
            other => trace!(
                conn = other,
                "dropping a frame for a connection that was never opened"
            ),
        }
    }
    Ok(())
}

/// Who we are to the runtime.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub name: String,
    pub index: String,
    pub timeout: Duration,
}

/// Runs one connection until the runtime closes it, it fails, or `shutdown` fires.
/// `registered` is set once the runtime accepted the registration.
pub(crate) async fn run<P: Plugin>(
    stream: UnixStream,
    plugin: Arc<P>,
    registration: &Registration,
    state: &watch::Sender<ConnectionState>,
    shutdown: &CancellationToken,
    registered: &mut bool,
) -> Result<(), Error> {
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(1024);
    let drain = CancellationToken::new();
    let mut writer = tokio::spawn(write_loop(wr, rx, drain.clone()));
    let out = Outgoing { tx };
    let client = RuntimeClient::new(out.clone());
    let inflight = TaskTracker::new();
    let dispatcher = Arc::new(Dispatcher {
        plugin,
        out,
        inflight: inflight.clone(),
        runtime: client.clone(),
        subscribed: AtomicU32::new(0),
        pending_sync: Mutex::new((Vec::new(), Vec::new())),
        runtime_info: Mutex::new(None),
        state: state.clone(),
    });
    // Serve connection 1 before registering: the runtime may call Configure before it
    // answers RegisterPlugin.
    let mut reader = tokio::spawn(read_loop(rd, dispatcher, client.clone()));
    let request = pb::RegisterPluginRequest {
        plugin_name: registration.name.clone(),
        plugin_idx: registration.index.clone(),
        nri_version: NRI_VERSION.to_owned(),
    };
    let result = async {
        tokio::select! {
            r = client.call::<_, pb::Empty>("RegisterPlugin", &request, registration.timeout) => {
                r.map_err(|e| match e {
                    Error::Call { status, .. } => Error::Registration(status),
                    e => e,
                })?;
            }
            r = &mut reader => return Err(flatten(r).err().unwrap_or(Error::Closed)),
            _ = shutdown.cancelled() => return Ok(()),
        }
        *registered = true;
        // Synchronize may already have completed (the runtime can run the whole handshake
        // before its RegisterPlugin reply arrives): never step back from Ready. The check and
        // the update happen under the watch's lock.
        state.send_if_modified(|s| {
            let step = !matches!(s, ConnectionState::Ready(_));
            if step {
                *s = ConnectionState::Registered;
            }
            step
        });
        tokio::select! {
            r = &mut reader => flatten(r),
            _ = shutdown.cancelled() => Ok(()),
        }
    }
    .await;
    reader.abort();
    if shutdown.is_cancelled() {
        inflight.close();
        if tokio::time::timeout(DRAIN, inflight.wait()).await.is_err() {
            debug!("shutting down with calls still unanswered");
        }
        drain.cancel();
        let _ = tokio::time::timeout(DRAIN, &mut writer).await;
    }
    writer.abort();
    client.close();
    result
}

fn flatten(r: Result<Result<(), Error>, tokio::task::JoinError>) -> Result<(), Error> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::Protocol(format!("connection reader stopped: {e}"))),
    }
}
