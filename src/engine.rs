//! The identity engine: for every annotated container, the SPIFFE identity is on disk in the
//! container's directory before its process runs, kept fresh while it runs, and removed with
//! it.
//!
//! The engine knows no runtime. It is driven by lifecycle calls carrying [`PodInfo`] and
//! [`ContainerInfo`], asks an [`IdentitySource`] for identities, writes files through the
//! artifact writer and the [`HostOps`] seam, and leaves runtime policy (mounts, labels, how a
//! workload is named) to a [`Backend`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nri_identity_backends::k8s::{self, K8sSelectorError, K8sWorkload};
use nri_identity_backends::{
    AnyBackend, Backend, BackendError, ContainerInfo, DeliveryPoint, MountSpec, NamingMode, PodInfo,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::annotation::{
    self, Attestation, IdentityRequest, InvalidAnnotation, OnFailure, PodRef, Policy,
};
use crate::artifacts::{ArtifactDir, ArtifactError, ArtifactWriter, Material};
use crate::host::{HostError, HostOps, Owner, Pidfd, validate_component};
use crate::k8s::{KubeletPods, LookupError};
use crate::metrics::Metrics;
use crate::spire::{
    self, BundleSet, IdentitySource, SourceError, SvidStream, SvidUpdate, Workload, X509Svid,
};

/// Engine settings, taken from the daemon configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub artifact_root: PathBuf,
    pub policy: Policy,
    /// Upper bound on waiting for the first SVID inside a start event.
    pub first_svid_timeout: Duration,
    /// Kept free of the runtime's deadline for writing files and answering.
    pub deadline_margin: Duration,
    /// The naming mode when the pod does not choose; `None` takes the backend's default.
    pub default_mode: Option<NamingMode>,
    /// Reconnection backoff for broken agent streams.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Where selectors mode learns what NRI does not carry (service account, owners).
    pub kubelet: Option<Arc<KubeletPods>>,
}

impl EngineConfig {
    pub fn new(artifact_root: impl Into<PathBuf>, policy: Policy) -> Self {
        EngineConfig {
            artifact_root: artifact_root.into(),
            policy,
            first_svid_timeout: Duration::from_millis(1500),
            deadline_margin: Duration::from_millis(150),
            default_mode: None,
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            kubelet: None,
        }
    }
}

/// Why a container could not get its identity. Messages name what failed; the pod and
/// container are added by [`ContainerError`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    InvalidAnnotation(Box<InvalidAnnotation>),
    #[error(
        "the container was created without its identity directory mount (the plugin was not connected at CreateContainer); recreate it"
    )]
    MissingMount,
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("the container's process {pid} exited before its identity was delivered")]
    ProcessGone { pid: u32 },
    #[error("the container's process {pid} is not in the container any more (cgroup {cgroup:?})")]
    ProcessMoved { pid: u32, cgroup: String },
    #[error("{}", match source {
        // Already names the agent.
        SourceError::Connect { .. } => source.to_string(),
        _ => format!("the SPIRE agent at {}: {source}", agent.display()),
    })]
    Agent {
        agent: PathBuf,
        #[source]
        source: SourceError,
    },
    #[error("no identity from the SPIRE agent at {agent} within {budget:?}{}", if *.empty_updates > 0 { " (the agent has no registration entry matching this workload)" } else { "" })]
    NoIdentity {
        agent: PathBuf,
        budget: Duration,
        empty_updates: u32,
    },
    #[error("no trust bundle from the SPIRE agent at {agent} within {budget:?}")]
    NoBundle { agent: PathBuf, budget: Duration },
    #[error("no SVID with hint {hint:?} among {available:?}")]
    NoSuchHint {
        hint: String,
        available: Vec<String>,
    },
    #[error("the agent issued {got} but the annotation expects {expected}")]
    UnexpectedSpiffeId { expected: String, got: String },
    #[error("the trust bundle of {trust_domain} is missing from the agent's bundles")]
    MissingTrustDomain { trust_domain: String },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error("selectors attestation needs the kubelet's pod list: set kubelet_url")]
    NoKubelet,
    #[error(transparent)]
    Kubelet(#[from] LookupError),
    #[error("cannot name the workload by selectors: {0}")]
    Selectors(#[from] K8sSelectorError),
    #[error("ephemeral (debug) containers get no identity: SPIRE's k8s attestor never names them")]
    EphemeralContainer,
}

impl EngineError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::InvalidAnnotation(_) => "invalid_annotation",
            EngineError::MissingMount => "missing_mount",
            EngineError::Backend(_) => "backend",
            EngineError::ProcessGone { .. } => "process_gone",
            EngineError::ProcessMoved { .. } => "process_moved",
            EngineError::Agent { source, .. } => source.kind(),
            EngineError::NoIdentity { .. } => "no_identity",
            EngineError::NoBundle { .. } => "no_bundle",
            EngineError::NoSuchHint { .. } => "no_such_hint",
            EngineError::UnexpectedSpiffeId { .. } => "unexpected_spiffe_id",
            EngineError::MissingTrustDomain { .. } => "missing_trust_domain",
            EngineError::Host(_) => "host",
            EngineError::Artifacts(_) => "write",
            EngineError::NoKubelet => "no_kubelet",
            EngineError::Kubelet(_) => "kubelet",
            EngineError::Selectors(_) => "selectors",
            EngineError::EphemeralContainer => "ephemeral_container",
        }
    }
}

/// An [`EngineError`] for one container: its message names the pod and container.
#[derive(Debug, thiserror::Error)]
pub struct ContainerError {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    #[source]
    pub error: Box<EngineError>,
}

impl std::fmt::Display for ContainerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.error {
            // Already names the pod, the container, the annotation key and the field.
            EngineError::InvalidAnnotation(e) => write!(f, "{e}"),
            e => write!(
                f,
                "pod {}/{} container {}: {e}",
                self.namespace, self.pod, self.container
            ),
        }
    }
}

impl ContainerError {
    fn new(pod: &PodInfo, container: &ContainerInfo, error: EngineError) -> Self {
        ContainerError {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container: container.name.clone(),
            error: Box::new(error),
        }
    }
}

/// A container the engine looks after.
struct Tracked {
    pod_key: String,
    mode: NamingMode,
    request: Arc<IdentityRequest>,
    /// Opened at CreateContainer and reused, so a start does not walk the path again.
    dir: Option<ArtifactDir>,
    task: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Everything one workload's maintenance task needs.
struct WorkloadCtx {
    container_id: String,
    dir: ArtifactDir,
    request: Arc<IdentityRequest>,
    workload: Workload,
    owner: Option<Owner>,
    pidfd: Option<Arc<Pidfd>>,
}

/// What was last written for a workload, to skip identical updates.
#[derive(Clone, PartialEq)]
struct Delivered {
    chain: Vec<Vec<u8>>,
    federates_with: Vec<String>,
    bundles: Option<Arc<BundleSet>>,
}

pub struct Engine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    cfg: EngineConfig,
    source: S,
    host: Arc<dyn HostOps>,
    writer: ArtifactWriter,
    backend: AnyBackend,
    tracked: Mutex<HashMap<String, Tracked>>,
    bundles: Mutex<HashMap<PathBuf, watch::Receiver<Option<Arc<BundleSet>>>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

/// Containers with a maintenance task, for the active-identities gauge.
fn active_tasks(tracked: &HashMap<String, Tracked>) -> usize {
    tracked.values().filter(|t| t.task.is_some()).count()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: IdentitySource> Engine<S> {
    pub fn new(
        cfg: EngineConfig,
        source: S,
        host: Arc<dyn HostOps>,
        backend: AnyBackend,
        metrics: Arc<Metrics>,
    ) -> Self {
        Engine {
            inner: Arc::new(Inner {
                writer: ArtifactWriter::new(host.clone(), cfg.artifact_root.clone()),
                cfg,
                source,
                host,
                backend,
                tracked: Mutex::new(HashMap::new()),
                bundles: Mutex::new(HashMap::new()),
                metrics,
                shutdown: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The identity request of a container, if its pod asks for one.
    fn request_for(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
    ) -> Result<Option<IdentityRequest>, EngineError> {
        let pod_ref = PodRef {
            namespace: &pod.namespace,
            name: &pod.name,
        };
        annotation::request_for_container(
            &pod.annotations,
            pod_ref,
            &c.name,
            &self.inner.cfg.policy,
        )
        .map_err(EngineError::InvalidAnnotation)
    }

    fn mode_for(&self, request: &IdentityRequest) -> NamingMode {
        match request.attestation {
            Some(Attestation::Pid) => NamingMode::Pid,
            Some(Attestation::Selectors) => NamingMode::Selectors,
            None => self
                .inner
                .cfg
                .default_mode
                .unwrap_or_else(|| self.inner.backend.default_mode()),
        }
    }

    fn container_dir_path(&self, pod_key: &str, container_id: &str) -> PathBuf {
        self.inner
            .cfg
            .artifact_root
            .join(pod_key)
            .join(container_id)
    }

    /// CreateContainer: validates the annotation, creates the container's directory and
    /// returns the mount to add. `Ok(None)` for containers that ask for no identity. In
    /// selectors mode the identity is delivered here, before the container exists.
    pub async fn create_container(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        deadline: Option<Instant>,
    ) -> Result<Option<MountSpec>, ContainerError> {
        let started = Instant::now();
        let err = |e| self.fail(pod, c, e);
        let Some(request) = self.request_for(pod, c).map_err(err)? else {
            return Ok(None);
        };
        let mode = self.mode_for(&request);
        self.inner
            .backend
            .check_mode(mode)
            .map_err(|e| err(e.into()))?;
        let dir = self
            .inner
            .writer
            .create_dir(pod.key(), &c.id)
            .map_err(|e| err(e.into()))?;
        if let Some(label) = self.inner.backend.dir_label(pod, c) {
            self.inner
                .host
                .set_xattr(
                    dir.handle(),
                    None,
                    crate::host::SELINUX_XATTR,
                    label.as_bytes(),
                )
                .map_err(|e| err(e.into()))?;
        }
        let mount = self.inner.backend.mount(dir.path(), &request.cert_dir);
        info!(pod = %pod.name, namespace = %pod.namespace, container = %c.name, container_id = %c.id,
            cert_dir = %request.cert_dir.display(), mode = ?mode, "identity directory prepared");
        let request = Arc::new(request);
        self.track(pod, c, mode, request.clone(), Some(dir));
        if self.inner.backend.delivery_point(mode) == DeliveryPoint::CreateContainer {
            self.deliver_or_fail(pod, c, request, mode, deadline, started, true)
                .await?;
        }
        Ok(Some(mount))
    }

    fn fail(&self, pod: &PodInfo, c: &ContainerInfo, e: EngineError) -> ContainerError {
        self.inner.metrics.failure(e.kind());
        ContainerError::new(pod, c, e)
    }

    /// StartContainer: the container's process exists but has not run. Delivers the first
    /// identity (or, with `on_failure: continue`, keeps trying in the background) and starts
    /// keeping it fresh. `deadline` is when the runtime stops waiting.
    pub async fn start_container(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        deadline: Option<Instant>,
    ) -> Result<(), ContainerError> {
        let started = Instant::now();
        let known = {
            let tracked = lock(&self.inner.tracked);
            tracked
                .get(&c.id)
                .map(|t| (t.request.clone(), t.mode, t.task.is_some()))
        };
        let (request, mode) = match known {
            // Selectors mode delivered at CreateContainer (or keeps trying in the background).
            Some((_, mode, true))
                if self.inner.backend.delivery_point(mode) == DeliveryPoint::CreateContainer =>
            {
                return Ok(());
            }
            Some((r, mode, _)) => (r, mode),
            None => {
                // Not seen at CreateContainer (daemon restarted in between, or it was not
                // connected). Only go on if the runtime did mount our directory.
                let Some(r) = self.request_for(pod, c).map_err(|e| self.fail(pod, c, e))? else {
                    return Ok(());
                };
                let expected = self.container_dir_path(pod.key(), &c.id);
                if !c
                    .mounts
                    .iter()
                    .any(|(dst, src)| dst == &r.cert_dir && src == &expected)
                {
                    let e = EngineError::MissingMount;
                    if r.on_failure == OnFailure::Continue {
                        warn!(pod = %pod.name, container = %c.name, error = %e, "starting without identity (on_failure: continue)");
                        self.inner.metrics.failure(e.kind());
                        return Ok(());
                    }
                    return Err(self.fail(pod, c, e));
                }
                let mode = self.mode_for(&r);
                let r = Arc::new(r);
                self.track(pod, c, mode, r.clone(), None);
                (r, mode)
            }
        };
        self.deliver_or_fail(pod, c, request, mode, deadline, started, false)
            .await
    }

    fn track(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        mode: NamingMode,
        request: Arc<IdentityRequest>,
        dir: Option<ArtifactDir>,
    ) {
        let t = Tracked {
            pod_key: pod.key().to_owned(),
            mode,
            request,
            dir,
            task: None,
        };
        lock(&self.inner.tracked).insert(c.id.clone(), t);
    }

    /// Delivers the first identity, applying the pod's failure policy. At CreateContainer a
    /// failure removes the directory (the container will not exist); at StartContainer it
    /// empties it (it is the mount source of a container that exists).
    #[allow(clippy::too_many_arguments)]
    async fn deliver_or_fail(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        mode: NamingMode,
        deadline: Option<Instant>,
        started: Instant,
        at_create: bool,
    ) -> Result<(), ContainerError> {
        let span = info_span!("identity", pod = %pod.name, namespace = %pod.namespace, container = %c.name, container_id = %c.id);
        let result = self
            .deliver_first(pod, c, request.clone(), mode, deadline, started)
            .instrument(span.clone())
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if request.on_failure == OnFailure::Continue => {
                span.in_scope(|| warn!(error = %e, "going on without identity for now (on_failure: continue); retrying in the background"));
                self.inner.metrics.failure(e.kind());
                self.spawn_background(pod, c, request, mode, span);
                Ok(())
            }
            Err(e) => {
                // Nothing half-delivered stays behind; the runtime retries.
                let w = &self.inner.writer;
                if at_create {
                    lock(&self.inner.tracked).remove(&c.id);
                    let _ = w.remove_container(pod.key(), &c.id);
                } else if let Ok(dir) = w.create_dir(pod.key(), &c.id) {
                    let fresh = w.remove(&dir).and_then(|()| w.create_dir(pod.key(), &c.id));
                    // The old handle names the removed directory: a retried start must use
                    // the new one.
                    if let Some(t) = lock(&self.inner.tracked).get_mut(&c.id) {
                        t.dir = fresh.ok();
                    }
                }
                Err(self.fail(pod, c, e))
            }
        }
    }

    /// The `k8s` selectors SPIRE's k8s attestor would produce for this container, from the
    /// runtime's metadata and the kubelet's pod list.
    async fn derive_selectors(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        until: Instant,
    ) -> Result<Vec<spire::Selector>, EngineError> {
        let kubelet = self
            .inner
            .cfg
            .kubelet
            .as_ref()
            .ok_or(EngineError::NoKubelet)?;
        let asked = Instant::now();
        let facts = tokio::time::timeout_at(until, kubelet.pod(&pod.uid))
            .await
            .map_err(|_| LookupError::Timeout {
                url: kubelet.url().to_string(),
                timeout: asked.elapsed(),
            })??;
        if facts.ephemeral_containers.contains(&c.name) {
            return Err(EngineError::EphemeralContainer);
        }
        let mut w = K8sWorkload::from_runtime(pod, c);
        w.service_account = Some(facts.service_account);
        w.node_name = Some(facts.node_name).filter(|n| !n.is_empty());
        w.owner_references = Some(facts.owners);
        // The kubelet's labels are the pod's own; NRI's also carry the runtime's.
        w.pod_labels = facts.labels;
        let derived = k8s::selectors(&w)?;
        debug!(selectors = ?derived.selectors.iter().map(|s| format!("{}:{}", s.kind, s.value)).collect::<Vec<_>>(), "derived selectors");
        Ok(derived
            .selectors
            .into_iter()
            .map(|s| spire::Selector {
                kind: s.kind,
                value: s.value,
            })
            .collect())
    }

    async fn deliver_first(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        mode: NamingMode,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        let mut budget = inner.cfg.first_svid_timeout;
        if let Some(d) = deadline {
            budget = budget.min(
                d.saturating_duration_since(Instant::now())
                    .saturating_sub(inner.cfg.deadline_margin),
            );
        }
        let until = Instant::now() + budget;
        let (workload, pidfd) = match mode {
            NamingMode::Pid => {
                let pid = c.pid.filter(|p| *p > 0).ok_or(BackendError::NoPid)? as u32;
                // The pidfd is opened before the agent is asked: if it is still alive after
                // the answer, the answer was about this very process, not a recycled PID.
                (
                    Workload::Pid(pid as i32),
                    Some(Arc::new(inner.host.open_pidfd(pid)?)),
                )
            }
            NamingMode::Selectors => (
                Workload::Selectors(self.derive_selectors(pod, c, until).await?),
                None,
            ),
        };
        let agent = request.agent_address.clone();
        let bundles = self.bundles_for(&agent);
        let agent_err = |source| EngineError::Agent {
            agent: agent.clone(),
            source,
        };

        let mut stream =
            tokio::time::timeout_at(until, inner.source.subscribe_svids(&agent, &workload))
                .await
                .map_err(|_| EngineError::NoIdentity {
                    agent: agent.clone(),
                    budget,
                    empty_updates: 0,
                })?
                .map_err(agent_err)?;
        let mut empty = 0;
        let (svid, federates_with) = loop {
            match tokio::time::timeout_at(until, stream.next()).await {
                Err(_) => {
                    return Err(EngineError::NoIdentity {
                        agent: agent.clone(),
                        budget,
                        empty_updates: empty,
                    });
                }
                Ok(None) => return Err(agent_err(SourceError::StreamEnded)),
                Ok(Some(Err(e))) => return Err(agent_err(e)),
                Ok(Some(Ok(update))) => {
                    if update.svids.is_empty() {
                        // The agent answers at once with an empty set when no entry matches
                        // (yet); an entry may still arrive within the budget.
                        empty += 1;
                        continue;
                    }
                    break pick(&request, update)?;
                }
            }
        };
        let bundle_set =
            wait_bundles(bundles.clone(), until)
                .await
                .ok_or_else(|| EngineError::NoBundle {
                    agent: agent.clone(),
                    budget,
                })?;
        let mut owner = c.user.map(Owner::from);
        if let Some(pidfd) = &pidfd {
            let pid = pidfd.pid();
            if !pidfd.is_alive()? {
                return Err(EngineError::ProcessGone { pid });
            }
            let cgroup = inner.host.process_cgroup(pid)?;
            if !in_container(&cgroup, c) {
                return Err(EngineError::ProcessMoved { pid, cgroup });
            }
            // The cgroup text was read after the pidfd was opened; alive now means it was
            // ours.
            if !pidfd.is_alive()? {
                return Err(EngineError::ProcessGone { pid });
            }
            owner = owner.or_else(|| inner.host.process_owner(pid).ok());
        }
        let material = material(&svid, &federates_with, &bundle_set)?;
        let opened = lock(&inner.tracked).get(&c.id).and_then(|t| t.dir.clone());
        let (writer, pod_key, id, req) = (
            inner.writer.clone(),
            pod.key().to_owned(),
            c.id.clone(),
            request.clone(),
        );
        let dir = blocking(move || {
            let dir = match opened {
                Some(dir) => dir,
                None => writer.create_dir(&pod_key, &id)?,
            };
            writer.deliver(&dir, &req, &material, owner)?;
            Ok(dir)
        })
        .await?;
        let elapsed = started.elapsed();
        inner.metrics.served(elapsed);
        inner.metrics.set_expiry(&c.id, svid.expires_at);
        info!(spiffe_id = %svid.spiffe_id, mode = ?mode, elapsed_ms = elapsed.as_secs_f64() * 1e3, "identity delivered");
        let delivered = Delivered {
            chain: svid.cert_chain.clone(),
            federates_with,
            bundles: Some(bundle_set),
        };
        let ctx = WorkloadCtx {
            container_id: c.id.clone(),
            dir,
            request,
            workload,
            owner,
            pidfd,
        };
        self.spawn_maintenance(ctx, Some(stream), Some(delivered), tracing::Span::current());
        Ok(())
    }

    /// Keeps trying in the background: after `on_failure: continue`, and when resuming
    /// after a restart.
    fn spawn_background(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        mode: NamingMode,
        span: tracing::Span,
    ) {
        let inner = &self.inner;
        let dir = match inner.writer.create_dir(pod.key(), &c.id) {
            Ok(d) => d,
            Err(error) => {
                span.in_scope(|| warn!(%error, "cannot open the identity directory; giving up"));
                return;
            }
        };
        let mut owner = c.user.map(Owner::from);
        let (workload, pidfd) = match mode {
            NamingMode::Pid => {
                let Some(pid) = c.pid.filter(|p| *p > 0).map(|p| p as u32) else {
                    return;
                };
                match inner.host.open_pidfd(pid) {
                    Ok(p) => {
                        owner = owner.or_else(|| inner.host.process_owner(pid).ok());
                        (Some(Workload::Pid(pid as i32)), Some(Arc::new(p)))
                    }
                    Err(error) => {
                        span.in_scope(
                            || warn!(%error, "cannot watch the container's process; giving up"),
                        );
                        return;
                    }
                }
            }
            // Derived in the task, where the kubelet may be retried.
            NamingMode::Selectors => (None, None),
        };
        let (pod, c) = (pod.clone(), c.clone());
        let container_id = c.id.clone();
        self.spawn_task(&container_id, span, move |engine, cancel| async move {
            let workload = match workload {
                Some(w) => w,
                None => {
                    let mut attempt = 0;
                    loop {
                        let until = Instant::now() + Duration::from_secs(5);
                        match engine.derive_selectors(&pod, &c, until).await {
                            Ok(s) => break Workload::Selectors(s),
                            Err(error) => {
                                warn!(%error, "cannot derive selectors; retrying");
                                let delay = backoff(
                                    engine.inner.cfg.retry_initial,
                                    engine.inner.cfg.retry_max,
                                    attempt,
                                );
                                attempt += 1;
                                tokio::select! {
                                    _ = cancel.cancelled() => return,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                            }
                        }
                    }
                }
            };
            let ctx = WorkloadCtx {
                container_id: c.id.clone(),
                dir,
                request,
                workload,
                owner,
                pidfd,
            };
            engine.maintain(ctx, None, None, cancel).await;
        });
    }

    /// Runs `task` as the container's maintenance task, replacing any earlier one.
    fn spawn_task<F, Fut>(&self, container_id: &str, span: tracing::Span, task: F)
    where
        F: FnOnce(Self, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.inner.shutdown.child_token();
        let handle = self
            .inner
            .tasks
            .spawn(task(self.clone(), cancel.clone()).instrument(span));
        let mut tracked = lock(&self.inner.tracked);
        if let Some(t) = tracked.get_mut(container_id) {
            if let Some((old, _)) = t.task.replace((cancel, handle)) {
                old.cancel();
            }
        } else {
            // Removed while we were delivering: do not leave a stream behind.
            cancel.cancel();
        }
        self.inner.metrics.set_active(active_tasks(&tracked));
    }

    fn spawn_maintenance(
        &self,
        ctx: WorkloadCtx,
        stream: Option<SvidStream>,
        delivered: Option<Delivered>,
        span: tracing::Span,
    ) {
        let id = ctx.container_id.clone();
        self.spawn_task(&id, span, move |engine, cancel| async move {
            engine.maintain(ctx, stream, delivered, cancel).await
        });
    }

    /// Keeps one workload's files fresh: follows the agent's stream, rewrites on rotation
    /// and bundle changes, reconnects with jittered backoff (the old files stay), and stops
    /// when the process exits or the container goes.
    async fn maintain(
        &self,
        ctx: WorkloadCtx,
        mut stream: Option<SvidStream>,
        mut delivered: Option<Delivered>,
        cancel: CancellationToken,
    ) {
        let inner = &self.inner;
        let agent = ctx.request.agent_address.clone();
        let mut bundles = self.bundles_for(&agent);
        let mut attempt: u32 = 0;
        let exited = async {
            match &ctx.pidfd {
                Some(p) => {
                    let _ = p.exited().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(exited);
        let mut latest: Option<(X509Svid, Vec<String>)> = None;
        loop {
            let Some(s) = stream.as_mut() else {
                match inner.source.subscribe_svids(&agent, &ctx.workload).await {
                    Ok(s) => stream = Some(s),
                    Err(error) => {
                        inner.metrics.failure(error.kind());
                        let delay = backoff(inner.cfg.retry_initial, inner.cfg.retry_max, attempt);
                        attempt = attempt.saturating_add(1);
                        debug!(%error, ?delay, "cannot subscribe; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = cancel.cancelled() => return,
                            _ = &mut exited => { debug!("process exited; stream closed"); return; }
                        }
                    }
                }
                continue;
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut exited => {
                    debug!("process exited; stream closed");
                    return;
                }
                item = s.next() => match item {
                    Some(Ok(update)) => {
                        attempt = 0;
                        if update.svids.is_empty() {
                            debug!("the agent has no identity for this workload now; keeping the last files");
                            continue;
                        }
                        match pick(&ctx.request, update) {
                            Ok(chosen) => latest = Some(chosen),
                            Err(error) => {
                                warn!(%error, "ignoring an update");
                                inner.metrics.failure(error.kind());
                                continue;
                            }
                        }
                    }
                    Some(Err(error)) => {
                        warn!(%error, "identity stream broken; reconnecting");
                        inner.metrics.failure(error.kind());
                        stream = None;
                        continue;
                    }
                    None => {
                        warn!("identity stream ended; reconnecting");
                        inner.metrics.failure("stream_ended");
                        stream = None;
                        continue;
                    }
                },
                changed = bundles.changed() => {
                    if changed.is_err() {
                        bundles = self.bundles_for(&agent);
                    }
                }
            }
            let Some((svid, federates_with)) = latest.as_ref() else {
                continue;
            };
            let bundle_set = bundles.borrow().clone();
            let Some(bundle_set) = bundle_set else {
                continue;
            };
            let next = Delivered {
                chain: svid.cert_chain.clone(),
                federates_with: federates_with.clone(),
                bundles: Some(bundle_set.clone()),
            };
            if delivered.as_ref() == Some(&next) {
                continue;
            }
            if let Some(p) = &ctx.pidfd
                && !p.is_alive().unwrap_or(false)
            {
                return;
            }
            let result = match material(svid, federates_with, &bundle_set) {
                Ok(m) => {
                    let (writer, dir, req, owner) = (
                        inner.writer.clone(),
                        ctx.dir.clone(),
                        ctx.request.clone(),
                        ctx.owner,
                    );
                    blocking(move || Ok(writer.deliver(&dir, &req, &m, owner)?)).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    if delivered.is_none() {
                        inner.metrics.served(Duration::ZERO);
                        info!(spiffe_id = %svid.spiffe_id, "identity delivered");
                    } else {
                        inner.metrics.rotated();
                        info!(spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at, "identity files updated");
                    }
                    inner.metrics.set_expiry(&ctx.container_id, svid.expires_at);
                    delivered = Some(next);
                }
                Err(error) => {
                    warn!(%error, "cannot write identity files");
                    inner.metrics.failure(error.kind());
                }
            }
        }
    }

    /// The bundle watch of an agent, started on first use and kept for the daemon's life.
    fn bundles_for(&self, agent: &Path) -> watch::Receiver<Option<Arc<BundleSet>>> {
        let mut map = lock(&self.inner.bundles);
        if let Some(rx) = map.get(agent) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        map.insert(agent.to_owned(), rx.clone());
        let engine = self.clone();
        let agent = agent.to_owned();
        let span = info_span!("bundles", agent = %agent.display());
        self.inner
            .tasks
            .spawn(async move { engine.follow_bundles(agent, tx).await }.instrument(span));
        rx
    }

    async fn follow_bundles(&self, agent: PathBuf, tx: watch::Sender<Option<Arc<BundleSet>>>) {
        let inner = &self.inner;
        let mut attempt = 0;
        loop {
            let result = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                r = inner.source.subscribe_bundles(&agent) => r,
            };
            match result {
                Ok(mut stream) => loop {
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        item = stream.next() => match item {
                            Some(Ok(set)) => {
                                attempt = 0;
                                let changed = tx.borrow().as_deref() != Some(&set);
                                if changed {
                                    debug!(trust_domains = set.bundles.len(), "trust bundles updated");
                                    tx.send_replace(Some(Arc::new(set)));
                                }
                            }
                            Some(Err(error)) => {
                                warn!(%error, "bundle stream broken; reconnecting");
                                break;
                            }
                            None => break,
                        }
                    }
                },
                Err(error) => {
                    if attempt == 0 {
                        warn!(%error, "cannot subscribe to trust bundles; retrying");
                    }
                }
            }
            let delay = backoff(inner.cfg.retry_initial, inner.cfg.retry_max, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// StopContainer: the stream is closed; the files stay until the container is removed.
    pub fn stop_container(&self, c: &ContainerInfo) {
        let mut tracked = lock(&self.inner.tracked);
        if let Some(t) = tracked.get_mut(&c.id)
            && let Some((cancel, _)) = t.task.take()
        {
            cancel.cancel();
        }
        self.inner.metrics.forget(&c.id);
        self.inner.metrics.set_active(active_tasks(&tracked));
    }

    /// RemoveContainer: stream closed, directory removed.
    pub fn remove_container(&self, pod: &PodInfo, c: &ContainerInfo) {
        let removed = {
            let mut tracked = lock(&self.inner.tracked);
            let t = tracked.remove(&c.id);
            self.inner.metrics.set_active(active_tasks(&tracked));
            t
        };
        if let Some(t) = &removed
            && let Some((cancel, _)) = &t.task
        {
            cancel.cancel();
        }
        self.inner.metrics.forget(&c.id);
        let pod_key = removed
            .as_ref()
            .map(|t| t.pod_key.clone())
            .unwrap_or_else(|| pod.key().to_owned());
        if validate_component(&pod_key).is_ok()
            && validate_component(&c.id).is_ok()
            && let Err(error) = self.inner.writer.remove_container(&pod_key, &c.id)
        {
            warn!(container_id = %c.id, %error, "cannot remove the identity directory");
        }
    }

    /// RemovePodSandbox: the pod's directory goes with whatever is left in it.
    pub fn remove_pod(&self, pod: &PodInfo) {
        let key = pod.key();
        if validate_component(key).is_err() {
            return;
        }
        let result = self
            .inner
            .host
            .open_root(&self.inner.cfg.artifact_root)
            .and_then(|root| self.inner.host.remove_all(&root, key));
        if let Err(error) = result {
            warn!(pod = %pod.name, %error, "cannot remove the pod's identity directory");
        }
    }

    /// After (re)connecting to the runtime: resume streams for running annotated containers
    /// and remove directories of containers that no longer exist.
    pub fn synchronize(&self, pods: &[PodInfo], containers: &[(ContainerInfo, Option<usize>)]) {
        let inner = &self.inner;
        let mut keep: HashMap<String, Vec<String>> = HashMap::new();
        for (c, pod_index) in containers {
            let Some(pod) = pod_index.and_then(|i| pods.get(i)) else {
                continue;
            };
            keep.entry(pod.key().to_owned())
                .or_default()
                .push(c.id.clone());
            let request = match self.request_for(pod, c) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(error) => {
                    debug!(container = %c.name, %error, "skipping a container with an invalid annotation");
                    continue;
                }
            };
            let has_task = lock(&inner.tracked)
                .get(&c.id)
                .is_some_and(|t| t.task.is_some());
            let mode = self.mode_for(&request);
            let request = Arc::new(request);
            lock(&inner.tracked)
                .entry(c.id.clone())
                .or_insert_with(|| Tracked {
                    pod_key: pod.key().to_owned(),
                    mode,
                    request: request.clone(),
                    dir: None,
                    task: None,
                });
            if !c.running || has_task {
                continue;
            }
            let expected = self.container_dir_path(pod.key(), &c.id);
            if !c.mounts.iter().any(|(_, src)| src == &expected) {
                continue;
            }
            let span = info_span!("identity", pod = %pod.name, namespace = %pod.namespace, container = %c.name, container_id = %c.id);
            span.in_scope(|| info!("resuming identity maintenance"));
            self.spawn_background(pod, c, request, mode, span);
        }
        // Directories of containers the runtime no longer knows.
        let Ok(root) = inner.host.open_root(&inner.cfg.artifact_root) else {
            return;
        };
        let Ok(pod_dirs) = inner.host.list(&root) else {
            return;
        };
        for pod_key in pod_dirs {
            match keep.get(&pod_key) {
                None if !pods.iter().any(|p| p.key() == pod_key) => {
                    info!(pod_key = %pod_key, "removing the identity directory of a pod that no longer exists");
                    let _ = inner.host.remove_all(&root, &pod_key);
                }
                _ => {
                    let Ok(Some(pod_dir)) = inner.host.open_dir(&root, &pod_key) else {
                        continue;
                    };
                    let Ok(ids) = inner.host.list(&pod_dir) else {
                        continue;
                    };
                    let live = keep.get(&pod_key).cloned().unwrap_or_default();
                    for id in ids.into_iter().filter(|id| !live.contains(id)) {
                        info!(container_id = %id, "removing the identity directory of a container that no longer exists");
                        let _ = inner.host.remove_all(&pod_dir, &id);
                    }
                }
            }
        }
    }

    /// Whether the agent at the configured default address answers.
    pub async fn probe_agent(&self) -> bool {
        let agent = self.inner.cfg.policy.default_agent_address().to_owned();
        let ok = self.inner.source.probe(&agent).await.is_ok();
        self.inner.metrics.set_agent_ready(ok);
        ok
    }

    /// Whether the kubelet lists the node's pods (`None` without a kubelet); refreshes the
    /// pod cache on the way.
    pub async fn probe_kubelet(&self) -> Option<Result<usize, LookupError>> {
        let kubelet = self.inner.cfg.kubelet.as_ref()?;
        let result = kubelet.refresh().await;
        self.inner.metrics.set_kubelet_ready(result.is_ok());
        Some(result)
    }

    /// Number of containers whose identity is being kept fresh.
    pub fn active(&self) -> usize {
        lock(&self.inner.tracked)
            .values()
            .filter(|t| t.task.as_ref().is_some_and(|(_, h)| !h.is_finished()))
            .count()
    }

    /// Stops every stream and waits up to `drain` for tasks to finish writing.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        tokio::time::timeout(drain, self.inner.tasks.wait())
            .await
            .is_ok()
    }
}

/// Runs file-system work (writes, fsyncs) off the async workers, so a slow disk never holds
/// up another container's events.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(EngineError::Host(HostError::Io {
            op: "writing identity files",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        }))
    })
}

/// Chooses the SVID for a request from a complete update.
fn pick(
    request: &IdentityRequest,
    update: SvidUpdate,
) -> Result<(X509Svid, Vec<String>), EngineError> {
    let SvidUpdate {
        svids,
        federates_with,
    } = update;
    let available: Vec<String> = svids.iter().map(|s| s.spiffe_id.clone()).collect();
    let svid =
        match &request.hint {
            Some(hint) => svids.into_iter().find(|s| &s.hint == hint).ok_or_else(|| {
                EngineError::NoSuchHint {
                    hint: hint.clone(),
                    available,
                }
            })?,
            None => svids.into_iter().next().ok_or(EngineError::NoSuchHint {
                hint: String::new(),
                available: Vec::new(),
            })?,
        };
    if let Some(expected) = &request.spiffe_id
        && expected.as_str() != svid.spiffe_id
    {
        return Err(EngineError::UnexpectedSpiffeId {
            expected: expected.to_string(),
            got: svid.spiffe_id,
        });
    }
    Ok((svid, federates_with))
}

fn trust_domain_key(spiffe_id: &str) -> String {
    let rest = spiffe_id.strip_prefix("spiffe://").unwrap_or(spiffe_id);
    format!("spiffe://{}", rest.split('/').next().unwrap_or(rest))
}

fn material(
    svid: &X509Svid,
    federates_with: &[String],
    bundles: &BundleSet,
) -> Result<Material, EngineError> {
    let own = trust_domain_key(&svid.spiffe_id);
    let own_bundle =
        bundles
            .bundles
            .get(&own)
            .cloned()
            .ok_or_else(|| EngineError::MissingTrustDomain {
                trust_domain: own.clone(),
            })?;
    let federated = federates_with
        .iter()
        .filter(|td| **td != own)
        .filter_map(|td| {
            let certs = bundles.bundles.get(td)?;
            Some((
                td.strip_prefix("spiffe://").unwrap_or(td).to_owned(),
                certs.clone(),
            ))
        })
        .collect();
    Ok(Material {
        chain: svid.cert_chain.clone(),
        key: svid.private_key.clone(),
        own_bundle,
        federated,
    })
}

async fn wait_bundles(
    mut rx: watch::Receiver<Option<Arc<BundleSet>>>,
    until: Instant,
) -> Option<Arc<BundleSet>> {
    let got = tokio::time::timeout_at(until, rx.wait_for(|b| b.is_some()))
        .await
        .ok()?
        .ok()?;
    got.clone()
}

/// Whether a process's `/proc/<pid>/cgroup` places it in the container: the container ID or
/// the last component of its cgroups path appears in it.
fn in_container(cgroup: &str, c: &ContainerInfo) -> bool {
    if !c.id.is_empty() && cgroup.contains(&c.id) {
        return true;
    }
    let last = c.cgroups_path.rsplit([':', '/']).find(|s| !s.is_empty());
    matches!(last, Some(last) if cgroup.contains(last))
}

fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}
