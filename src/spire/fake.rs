//! A scriptable stand-in for the SPIRE agent's Delegated Identity API, for tests and benchmarks
//! (compiled under `cfg(test)` or the `testing` feature).
//!
//! [`FakeAgent`] serves the generated gRPC server on a unix socket in a fresh temporary
//! directory and reproduces the agent behaviour the engine depends on, as the SPIRE agent
//! implements the Delegated Identity API:
//!
//! - PID and selector subscriptions, with the agent's argument checks (`InvalidArgument` for
//!   both or neither, PID 0, malformed selectors). Selector requests match every scripted
//!   selector set that is a *subset* of the request, as registration entries do.
//! - Like a Go gRPC server, the call is answered only together with the first message, which
//!   is the complete current set and is empty at once when nothing matches.
//! - Every change pushes the new complete set to the affected open streams, coalesced: a
//!   stream that is not read does not build up a backlog.
//! - Bundles keyed by `spiffe://<td>` with concatenated DER values.
//! - Scripted call errors, stream failures, clean stream ends, and an abrupt stop (every
//!   connection dropped, as when the agent process dies) and restart on the same path.
//! - The agent refusing the daemon itself, with SPIRE's own words for each of the two
//!   deployment mistakes ([`FakeAgent::refuse_delegate`]): new calls fail, and open streams
//!   end with the refusal, as the agent re-checks its caller before every update.
//!
//! - JWT-SVIDs minted on each `FetchJWTSVIDs` for every X.509 identity the workload matches
//!   (same SPIFFE ID and hint), with the requested audiences and a scripted lifetime
//!   ([`FakeAgent::set_jwt_ttl`]); the tokens are well-formed but unsigned (`alg: none`).
//!   JWT bundles are scripted JWKS documents ([`FakeAgent::set_jwt_bundle`]).
//!
//! [`TestCa`] mints real certificates (rcgen) with SPIFFE URI SANs and PKCS#8 keys.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use super::proto::api::agent::delegatedidentity::v1::{
    FetchJwtsviDsRequest, FetchJwtsviDsResponse, SubscribeToJwtBundlesRequest,
    SubscribeToJwtBundlesResponse, SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse,
    SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse, X509svidWithKey,
    delegated_identity_server::{DelegatedIdentity, DelegatedIdentityServer},
};
use super::proto::api::types;
use super::{DelegateRefusal, Selector, SvidUpdate, Workload, X509Svid};
use crate::spiffe::{SpiffeId, TrustDomain};

/// What scripted identities are keyed by: a PID, or a selector set (like a registration
/// entry's selectors).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKey {
    Pid(i32),
    Selectors(BTreeSet<Selector>),
}

impl From<&Workload> for WorkloadKey {
    fn from(workload: &Workload) -> Self {
        match workload {
            Workload::Pid(pid) => WorkloadKey::Pid(*pid),
            Workload::Selectors(s) => WorkloadKey::Selectors(s.iter().cloned().collect()),
        }
    }
}

impl From<Workload> for WorkloadKey {
    fn from(workload: Workload) -> Self {
        WorkloadKey::from(&workload)
    }
}

/// One `SubscribeToX509SVIDs` call as the fake received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub pid: i32,
    pub selectors: Vec<Selector>,
}

/// Counters of what clients did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// SVID streams currently open (decremented when the client goes away).
    pub open_svid_streams: usize,
    /// Bundle streams currently open.
    pub open_bundle_streams: usize,
    /// Every SVID call received, in order, including refused ones.
    pub svid_subscriptions: Vec<Subscription>,
    /// Number of bundle calls received.
    pub bundle_subscriptions: usize,
    /// Connections accepted since the fake was created.
    pub connections: usize,
    /// The audience of every `FetchJWTSVIDs` call received, in order, including refused ones.
    pub jwt_fetches: Vec<Vec<String>>,
    /// JWT bundle streams currently open.
    pub open_jwt_bundle_streams: usize,
}

#[derive(Default)]
struct State {
    workloads: BTreeMap<WorkloadKey, SvidUpdate>,
    call_errors: BTreeMap<WorkloadKey, Status>,
    deny_all: Option<Status>,
    bundles: BTreeMap<String, Vec<u8>>,
    jwt_bundles: BTreeMap<String, Vec<u8>>,
    /// Lifetime of minted JWT-SVIDs; `None` is 5 minutes.
    jwt_ttl: Option<Duration>,
    jwt_error: Option<Status>,
    initial_delay: Duration,
    /// Streams opened before this epoch end (with `close_status`, if any) on their next wake.
    close_epoch: u64,
    close_status: Option<Status>,
    /// Streams resend their set even if unchanged when this passes what they have seen.
    force_epoch: u64,
    stats: Stats,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every scripted change; each open stream re-evaluates its set when it moves.
    version: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Test scaffolding: a panicking test must not cascade into every other caller.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn change(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.version.send_modify(|v| *v += 1);
    }
}

struct Running {
    accept: JoinHandle<()>,
    server: JoinHandle<()>,
    /// Clones of every accepted socket, to cut them all at once on stop.
    connections: Arc<Mutex<Vec<StdUnixStream>>>,
}

/// A fake SPIRE agent. Dropping it stops the server and removes its directory.
pub struct FakeAgent {
    dir: PathBuf,
    path: PathBuf,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl FakeAgent {
    /// Starts a fake agent on `<tmp>/nri-fake-spire-<pid>-<n>/admin.sock`. Needs a Tokio
    /// runtime.
    pub async fn start() -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "nri-fake-spire-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let agent = FakeAgent {
            path: dir.join("admin.sock"),
            dir,
            shared: Arc::new(Shared {
                state: Mutex::default(),
                version: watch::Sender::new(0),
            }),
            running: Mutex::new(None),
        };
        agent.resume()?;
        Ok(agent)
    }

    /// The socket path to give to the identity source.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops abruptly, like a killed agent: stops accepting and cuts every open connection,
    /// so open streams fail with a transport error. The socket file stays, so new connections
    /// are refused rather than not found. Idempotent.
    pub fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(running) = running {
            running.accept.abort();
            running.server.abort();
            let connections = running
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for conn in connections.iter() {
                // Shuts the socket itself down, not just this descriptor: the connection's
                // task sees end of file and the client sees the connection drop.
                let _ = conn.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Starts serving again on the same path (after [`stop`](Self::stop)), keeping the
    /// script: the agent came back. No-op when running.
    pub fn resume(&self) -> std::io::Result<()> {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.is_some() {
            return Ok(());
        }
        // The real agent also removes a stale socket before binding.
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&self.path)?;
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<std::io::Result<UnixStream>>(16);
        let accept = tokio::spawn(accept_loop(
            listener,
            tx,
            Arc::clone(&connections),
            Arc::clone(&self.shared),
        ));
        let service = FakeService {
            shared: Arc::clone(&self.shared),
        };
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                // Benchmarks open one stream per workload on one connection.
                .max_concurrent_streams(Some(100_000))
                .add_service(DelegatedIdentityServer::new(service))
                .serve_with_incoming(ReceiverStream::new(rx))
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "fake SPIRE agent server failed");
            }
        });
        *running = Some(Running {
            accept,
            server,
            connections,
        });
        Ok(())
    }

    /// [`stop`](Self::stop) then [`resume`](Self::resume): an agent restart.
    pub fn restart(&self) -> std::io::Result<()> {
        self.stop();
        self.resume()
    }

    /// Sets (replaces) the identities for a workload key and pushes the new complete set to
    /// every open stream it affects: this is how a rotation or an entry change looks. An
    /// empty `update` keeps the key but matches nothing.
    pub fn set_svids(&self, key: impl Into<WorkloadKey>, update: SvidUpdate) {
        let key = key.into();
        self.shared.change(|s| {
            s.workloads.insert(key, update);
        });
    }

    /// Removes a workload key (its entries were deleted); open streams get the reduced set.
    pub fn remove_svids(&self, key: impl Into<WorkloadKey>) {
        let key = key.into();
        self.shared.change(|s| {
            s.workloads.remove(&key);
        });
    }

    /// Makes new SVID calls for exactly this key fail with `code` (e.g. `Unavailable` for a PID
    /// whose attestation fails); `None` clears it.
    pub fn set_call_error(&self, key: impl Into<WorkloadKey>, error: Option<(Code, &str)>) {
        let key = key.into();
        self.shared.change(|s| match error {
            Some((code, message)) => {
                s.call_errors.insert(key, Status::new(code, message));
            }
            None => {
                s.call_errors.remove(&key);
            }
        });
    }

    /// Makes every new call (SVIDs and bundles) fail, and every open stream end, with this
    /// status; `None` clears it. See [`refuse_delegate`](Self::refuse_delegate) for SPIRE's
    /// own refusals.
    pub fn set_deny_all(&self, error: Option<(Code, &str)>) {
        self.shared.change(|s| {
            s.deny_all = error.map(|(code, message)| Status::new(code, message));
        });
    }

    /// Makes the agent refuse the daemon itself, as SPIRE's delegated identity service words
    /// it: `NoEntry` is "no identity issued" (no entry matches the caller), `NotAuthorized`
    /// "caller not configured as an authorized delegate". Every new call fails with it and
    /// every open stream ends with it; `None` serves again.
    pub fn refuse_delegate(&self, refusal: Option<DelegateRefusal>) {
        let message = match refusal {
            None => None,
            Some(DelegateRefusal::NoEntry) => Some("no identity issued"),
            Some(DelegateRefusal::NotAuthorized) => {
                Some("caller not configured as an authorized delegate")
            }
            Some(other) => panic!("the Delegated Identity API never refuses with {other:?}"),
        };
        self.set_deny_all(message.map(|m| (Code::PermissionDenied, m)));
    }

    /// Delay before the first message of every new stream (attestation, SVID minting). The
    /// call itself resolves only then, as with the real agent.
    pub fn set_initial_delay(&self, delay: Duration) {
        self.shared.change(|s| s.initial_delay = delay);
    }

    /// Sets one trust domain's bundle (key as the agent sends it, `spiffe://<td>`).
    pub fn set_bundle(&self, trust_domain: &str, certs: &[Vec<u8>]) {
        self.set_bundle_raw(trust_domain, certs.concat());
    }

    /// Sets one trust domain's bundle to arbitrary bytes (to send malformed DER).
    pub fn set_bundle_raw(&self, trust_domain: &str, der: Vec<u8>) {
        let key = trust_domain.to_owned();
        self.shared.change(|s| {
            s.bundles.insert(key, der);
        });
    }

    /// Removes a trust domain. (The real agent never removes one from an open stream.)
    pub fn remove_bundle(&self, trust_domain: &str) {
        self.shared.change(|s| {
            s.bundles.remove(trust_domain);
        });
    }

    /// Lifetime of the JWT-SVIDs minted from now on (default 5 minutes; at least a second).
    pub fn set_jwt_ttl(&self, ttl: Duration) {
        self.shared.change(|s| s.jwt_ttl = Some(ttl));
    }

    /// Makes every new `FetchJWTSVIDs` call fail with this status; `None` clears it.
    pub fn set_jwt_error(&self, error: Option<(Code, &str)>) {
        self.shared.change(|s| {
            s.jwt_error = error.map(|(code, message)| Status::new(code, message));
        });
    }

    /// Sets one trust domain's JWT bundle (key as the agent sends it, `spiffe://<td>`) to
    /// these bytes (a JWKS document, or anything, to send a malformed one).
    pub fn set_jwt_bundle(&self, trust_domain: &str, jwks: &[u8]) {
        let (key, jwks) = (trust_domain.to_owned(), jwks.to_vec());
        self.shared.change(|s| {
            s.jwt_bundles.insert(key, jwks);
        });
    }

    /// Resends the current set to every open SVID and bundle stream even if unchanged, as the
    /// agent does to all SVID subscribers when its local bundle changes.
    pub fn notify_all(&self) {
        self.shared.change(|s| s.force_epoch += 1);
    }

    /// Ends every open stream with `code` (e.g. `Internal` "could not serialize response").
    pub fn fail_streams(&self, code: Code, message: &str) {
        self.close_streams_with(Some(Status::new(code, message)));
    }

    /// Ends every open stream cleanly (status OK), as on a graceful agent shutdown.
    pub fn close_streams(&self) {
        self.close_streams_with(None);
    }

    fn close_streams_with(&self, status: Option<Status>) {
        self.shared.change(|s| {
            s.close_epoch += 1;
            s.close_status = status;
        });
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Polls the counters until `condition` holds or `timeout` passes; returns whether it held.
    /// Stream counters move asynchronously after a client drops a stream.
    pub async fn wait_until(&self, timeout: Duration, condition: impl Fn(&Stats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(&self.stats()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<std::io::Result<UnixStream>>,
    connections: Arc<Mutex<Vec<StdUnixStream>>>,
    shared: Arc<Shared>,
) {
    loop {
        let accepted = listener.accept().await.and_then(|(stream, _)| {
            // Keep a duplicate of the descriptor so `stop` can shut the socket down.
            let std = stream.into_std()?;
            let duplicate = std.try_clone()?;
            connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(duplicate);
            UnixStream::from_std(std)
        });
        if accepted.is_ok() {
            shared.lock().stats.connections += 1;
        }
        if tx.send(accepted).await.is_err() {
            return;
        }
    }
}

struct FakeService {
    shared: Arc<Shared>,
}

type SvidItem = Result<SubscribeToX509sviDsResponse, Status>;
type BundleItem = Result<SubscribeToX509BundlesResponse, Status>;
type JwtBundleItem = Result<SubscribeToJwtBundlesResponse, Status>;

#[tonic::async_trait]
impl DelegatedIdentity for FakeService {
    type SubscribeToX509SVIDsStream = ReceiverStream<SvidItem>;
    type SubscribeToX509BundlesStream = ReceiverStream<BundleItem>;
    type SubscribeToJWTBundlesStream = ReceiverStream<JwtBundleItem>;

    async fn fetch_jwtsvi_ds(
        &self,
        request: Request<FetchJwtsviDsRequest>,
    ) -> Result<Response<FetchJwtsviDsResponse>, Status> {
        let request = request.into_inner();
        let selectors: Vec<Selector> = request
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value))
            .collect();
        let (response, delay) = {
            let mut state = self.shared.lock();
            state.stats.jwt_fetches.push(request.audience.clone());
            if let Some(status) = &state.deny_all {
                return Err(status.clone());
            }
            if request.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            let key = check_request(request.pid, selectors)?;
            if let Some(status) = state.call_errors.get(&key).or(state.jwt_error.as_ref()) {
                return Err(status.clone());
            }
            let ttl = state.jwt_ttl.unwrap_or(Duration::from_secs(300));
            let svids = svid_response(&state, &key)
                .x509_svids
                .iter()
                .filter_map(|s| s.x509_svid.as_ref())
                .map(|s| mint_jwt(s, &request.audience, ttl))
                .collect();
            (FetchJwtsviDsResponse { svids }, state.initial_delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(Response::new(response))
    }

    async fn subscribe_to_jwt_bundles(
        &self,
        _request: Request<SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        let delay = {
            let state = self.shared.lock();
            if let Some(status) = &state.deny_all {
                return Err(status.clone());
            }
            state.initial_delay
        };
        let stream = open_stream(
            Arc::clone(&self.shared),
            delay,
            |state| SubscribeToJwtBundlesResponse {
                bundles: state.jwt_bundles.clone(),
            },
            |stats, delta| {
                stats.open_jwt_bundle_streams =
                    stats.open_jwt_bundle_streams.wrapping_add_signed(delta)
            },
        )
        .await;
        Ok(Response::new(stream))
    }

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        let request = request.into_inner();
        let selectors: Vec<Selector> = request
            .selectors
            .iter()
            .map(|s| Selector::new(&s.r#type, &s.value))
            .collect();
        let (key, delay) = {
            let mut state = self.shared.lock();
            state.stats.svid_subscriptions.push(Subscription {
                pid: request.pid,
                selectors: selectors.clone(),
            });
            if let Some(status) = &state.deny_all {
                return Err(status.clone());
            }
            let key = check_request(request.pid, selectors)?;
            if let Some(status) = state.call_errors.get(&key) {
                return Err(status.clone());
            }
            (key, state.initial_delay)
        };
        let stream = open_stream(
            Arc::clone(&self.shared),
            delay,
            move |state| svid_response(state, &key),
            |stats, delta| {
                stats.open_svid_streams = stats.open_svid_streams.wrapping_add_signed(delta)
            },
        )
        .await;
        Ok(Response::new(stream))
    }

    async fn subscribe_to_x509_bundles(
        &self,
        _request: Request<SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        let delay = {
            let mut state = self.shared.lock();
            state.stats.bundle_subscriptions += 1;
            if let Some(status) = &state.deny_all {
                return Err(status.clone());
            }
            state.initial_delay
        };
        let stream = open_stream(
            Arc::clone(&self.shared),
            delay,
            |state| SubscribeToX509BundlesResponse {
                ca_certificates: state.bundles.clone(),
            },
            |stats, delta| {
                stats.open_bundle_streams = stats.open_bundle_streams.wrapping_add_signed(delta)
            },
        )
        .await;
        Ok(Response::new(stream))
    }
}

/// An unsigned compact JWS with the claims a JWT-SVID carries, for the SVID's identity.
fn mint_jwt(svid: &types::X509svid, audience: &[String], ttl: Duration) -> types::Jwtsvid {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let exp = now + (ttl.as_secs() as i64).max(1);
    let id = svid.id.clone().unwrap_or_default();
    let sub = format!("spiffe://{}{}", id.trust_domain, id.path);
    let claims = serde_json::json!({ "sub": sub, "aud": audience, "iat": now, "exp": exp });
    let token = format!(
        "{}.{}.{}",
        B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims.to_string()),
        B64.encode(b"unsigned"),
    );
    types::Jwtsvid {
        token,
        id: Some(id),
        expires_at: exp,
        issued_at: now,
        hint: svid.hint.clone(),
    }
}

/// The agent's checks of a request, in its order; gives the key the request reads.
fn check_request(pid: i32, selectors: Vec<Selector>) -> Result<WorkloadKey, Status> {
    match (pid, selectors.is_empty()) {
        (0, true) => Err(Status::invalid_argument(
            "must specify either selectors or non-zero pid",
        )),
        (0, false) => {
            for s in &selectors {
                if s.kind.is_empty() || s.kind.contains(':') || s.value.is_empty() {
                    return Err(Status::invalid_argument(format!("invalid selector {s}")));
                }
            }
            Ok(WorkloadKey::Selectors(selectors.into_iter().collect()))
        }
        (_, false) => Err(Status::invalid_argument(
            "cannot specify both selectors and pid",
        )),
        (pid, true) => Ok(WorkloadKey::Pid(pid)),
    }
}

/// The complete set a request sees: for a PID, its own script; for selectors, every scripted
/// selector set contained in the request, in key order.
fn svid_response(state: &State, key: &WorkloadKey) -> SubscribeToX509sviDsResponse {
    let matching: Vec<&SvidUpdate> = match key {
        WorkloadKey::Pid(_) => state.workloads.get(key).into_iter().collect(),
        WorkloadKey::Selectors(requested) => state
            .workloads
            .iter()
            .filter_map(|(k, update)| match k {
                WorkloadKey::Selectors(entry) if entry.is_subset(requested) => Some(update),
                _ => None,
            })
            .collect(),
    };
    let federates_with: BTreeSet<String> = matching
        .iter()
        .flat_map(|u| &u.federates_with)
        .map(TrustDomain::id)
        .collect();
    SubscribeToX509sviDsResponse {
        x509_svids: matching
            .iter()
            .flat_map(|u| &u.svids)
            .map(wire_svid)
            .collect(),
        federates_with: federates_with.into_iter().collect(),
    }
}

fn wire_svid(svid: &X509Svid) -> X509svidWithKey {
    let (trust_domain, path) = (svid.spiffe_id.trust_domain().name(), svid.spiffe_id.path());
    X509svidWithKey {
        x509_svid: Some(types::X509svid {
            cert_chain: svid.cert_chain.clone(),
            id: Some(types::Spiffeid {
                trust_domain: trust_domain.to_owned(),
                path: path.to_owned(),
            }),
            expires_at: svid.expires_at,
            hint: svid.hint.clone(),
        }),
        x509_svid_key: svid.private_key.to_vec(),
    }
}

/// Counts an open stream for as long as its task runs.
struct OpenGuard {
    shared: Arc<Shared>,
    count: fn(&mut Stats, isize),
}

impl OpenGuard {
    fn new(shared: Arc<Shared>, count: fn(&mut Stats, isize)) -> Self {
        count(&mut shared.lock().stats, 1);
        Self { shared, count }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        (self.count)(&mut self.shared.lock().stats, -1);
    }
}

/// What a stream does after a scripted change.
enum Next<M> {
    Close(Option<Status>),
    Send(M),
    Nothing,
}

/// Waits `delay`, queues the first message, and spawns the task that feeds the stream. The
/// channel holds one message and the task recomputes the set when it wakes, so a slow reader
/// gets at most one stale set and then the latest rather than a backlog, much like the agent's
/// capacity-1 subscriber queue.
async fn open_stream<M>(
    shared: Arc<Shared>,
    delay: Duration,
    compute: impl Fn(&State) -> M + Send + 'static,
    count: fn(&mut Stats, isize),
) -> ReceiverStream<Result<M, Status>>
where
    M: Clone + PartialEq + Send + 'static,
{
    let mut version = shared.version.subscribe();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (tx, rx) = mpsc::channel(1);
    let guard = OpenGuard::new(Arc::clone(&shared), count);
    // Before reading the state: a change that lands after the read must still wake the task.
    version.mark_unchanged();
    let (first, mut close_seen, mut force_seen) = {
        let state = shared.lock();
        (compute(&state), state.close_epoch, state.force_epoch)
    };
    let mut last = first.clone();
    // Cannot fail: the channel is new and empty.
    let _ = tx.try_send(Ok(first));
    tokio::spawn(async move {
        let _guard = guard;
        loop {
            tokio::select! {
                changed = version.changed() => if changed.is_err() { return },
                () = tx.closed() => return,
            }
            let next = {
                let state = shared.lock();
                if let Some(status) = &state.deny_all {
                    // The agent authorizes its caller again before every update.
                    Next::Close(Some(status.clone()))
                } else if state.close_epoch != close_seen {
                    close_seen = state.close_epoch;
                    Next::Close(state.close_status.clone())
                } else {
                    let current = compute(&state);
                    let forced = state.force_epoch != force_seen;
                    force_seen = state.force_epoch;
                    if forced || current != last {
                        Next::Send(current)
                    } else {
                        Next::Nothing
                    }
                }
            };
            match next {
                Next::Close(status) => {
                    if let Some(status) = status {
                        let _ = tx.send(Err(status)).await;
                    }
                    return;
                }
                Next::Send(message) => {
                    last = message.clone();
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                Next::Nothing => {}
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A test certificate authority for one trust domain.
pub struct TestCa {
    trust_domain: TrustDomain,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: Vec<u8>,
    /// This CA's certificate and those of intermediate CAs above it, not the root: what an
    /// SVID chain carries after the leaf.
    chain: Vec<Vec<u8>>,
}

impl TestCa {
    /// A self-signed root CA for `trust_domain` (a bare name such as `example.org`). Panics
    /// when it is no valid trust domain.
    pub fn new(trust_domain: &str) -> Result<Self, rcgen::Error> {
        let trust_domain = TrustDomain::parse(trust_domain)
            .unwrap_or_else(|e| panic!("TestCa::new: {trust_domain:?} {e}"));
        let key = rcgen::KeyPair::generate()?;
        let params = ca_params(&trust_domain)?;
        let cert = params.self_signed(&key)?.der().to_vec();
        Ok(Self {
            trust_domain,
            issuer: rcgen::Issuer::new(params, key),
            cert,
            chain: Vec::new(),
        })
    }

    /// An intermediate CA signed by this one; SVIDs it mints carry it in their chain.
    pub fn intermediate(&self) -> Result<Self, rcgen::Error> {
        let key = rcgen::KeyPair::generate()?;
        let params = ca_params(&self.trust_domain)?;
        let cert = params.signed_by(&key, &self.issuer)?.der().to_vec();
        let mut chain = vec![cert.clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Self {
            trust_domain: self.trust_domain.clone(),
            issuer: rcgen::Issuer::new(params, key),
            cert,
            chain,
        })
    }

    /// This CA's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert
    }

    /// `spiffe://<trust domain>`, the bundle key the agent uses.
    pub fn trust_domain_id(&self) -> String {
        self.trust_domain.id()
    }

    /// Mints an SVID for `spiffe://<td><path>` valid for `ttl` from now: a leaf with the
    /// SPIFFE ID as its only URI SAN, the chain up to (not including) the root, and a fresh
    /// P-256 key in PKCS#8 DER. Panics when `path` makes no valid SPIFFE ID.
    pub fn mint(&self, path: &str, ttl: Duration) -> Result<X509Svid, rcgen::Error> {
        let spiffe_id = SpiffeId::from_parts(self.trust_domain.name(), path)
            .unwrap_or_else(|e| panic!("TestCa::mint: {path:?}: the SPIFFE ID {e}"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let expires_at = now + ttl.as_secs();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.to_string().try_into()?)];
        params.not_before = epoch + Duration::from_secs(now.saturating_sub(60));
        params.not_after = epoch + Duration::from_secs(expires_at);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = rcgen::KeyPair::generate()?;
        let leaf = params.signed_by(&key, &self.issuer)?.der().to_vec();
        let mut cert_chain = vec![leaf];
        cert_chain.extend(self.chain.iter().cloned());
        Ok(X509Svid {
            spiffe_id,
            cert_chain,
            private_key: Zeroizing::new(key.serialize_der()),
            expires_at: i64::try_from(expires_at).unwrap_or(i64::MAX),
            hint: String::new(),
        })
    }
}

fn ca_params(trust_domain: &TrustDomain) -> Result<rcgen::CertificateParams, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.distinguished_name.push(
        rcgen::DnType::OrganizationName,
        "nri-identity-injector test CA",
    );
    params.subject_alt_names = vec![rcgen::SanType::URI(trust_domain.id().try_into()?)];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}
