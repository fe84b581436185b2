//! The identity engine: for every annotated container, the SPIFFE identity is on disk in the
//! container's directory before its process runs, kept fresh while it runs, and removed with
//! it.
//!
//! The engine knows no runtime and no sandbox kind. It is driven by lifecycle calls carrying
//! [`PodInfo`] and [`ContainerInfo`], asks [`Backends::plan`] how to serve each container,
//! names workloads (by PID, or by selectors through [`crate::k8s`]), asks an
//! [`IdentitySource`] for identities and hands them to the [`ArtifactWriter`], which owns the
//! per-container directory from creation to removal.
//!
//! * this module: the lifecycle (create, start, stop, remove, synchronize);
//! * [`first`]: the first delivery, inside a runtime event's deadline;
//! * [`maintain`]: keeping files fresh afterwards, and following trust bundles;
//! * [`jwt`]: JWT-SVID files, refreshed at half their lifetime, and the JWT bundle;
//! * [`retry`]: when to ask the agent again after a failure, and the agent's status as the
//!   readiness probe finds it.

mod bundles;
mod error;
mod first;
mod jwt;
mod maintain;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use nri_identity_backends::{
    AnyRuntime, Attestation, Backends, ContainerInfo, DeliveryPoint, Injection, MountSpec, Plan,
    PodChoices, PodInfo, RuntimeBackend, RuntimeKind, SandboxClasses,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub use error::{ContainerError, EngineError, Report, RuntimeError};
pub use retry::AgentStatus;

use crate::annotation::{self, IdentityRequest, OnFailure, PodRef, Policy};
use crate::artifacts::{ArtifactDir, ArtifactError, ArtifactWriter, LiveContainers};
use crate::guard::{self, GuardSpec};
use crate::host::{HostError, HostOps};
use crate::k8s::{KubeletPods, LookupError};
use crate::limits::{Admissions, IdentityLimits};
use crate::metrics::Metrics;
use crate::selinux::{LabelPolicy, LabelSource};
use crate::spire::{BundleSet, IdentitySource, JwtBundleSet, SourceError};
use retry::{AgentState, RetryPolicy};

/// Engine settings, taken from the daemon configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub artifact_root: PathBuf,
    pub policy: Policy,
    /// The runtime the daemon was configured for; `None` serves whichever connects.
    pub runtime: Option<RuntimeKind>,
    /// Which runtime handlers run pods in VMs.
    pub sandboxes: SandboxClasses,
    /// How workloads are named when the pod does not choose.
    pub default_attestation: Attestation,
    /// Which SELinux label directories and files get (`auto` resolved).
    pub selinux_label: LabelPolicy,
    /// Where the runtime keeps its sandboxes' OCI configurations (private labels read the
    /// pod's MCS level there); `None`: the runtime's default.
    pub runtime_state_dir: Option<PathBuf>,
    /// Upper bound on waiting for the first SVID inside a runtime event.
    pub first_svid_timeout: Duration,
    /// Kept free of the runtime's deadline for writing files and answering.
    pub deadline_margin: Duration,
    /// Reconnection backoff for broken agent streams (and failed writes).
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// The longest a container whose identity the agent refuses for good waits before
    /// asking again, when nothing the probe sees has changed.
    pub refused_recheck: Duration,
    /// Where selectors mode learns what NRI does not carry (service account, owners).
    pub kubelet: Option<Arc<KubeletPods>>,
    /// How many identities a pod, and the node, may hold at once.
    pub limits: IdentityLimits,
    /// The start guard's timeout, where containers served at StartContainer get one
    /// ([`crate::guard`]); `None`: no guard. Its binary must be installed
    /// ([`Engine::install_guard`]) before the first container.
    pub start_guard: Option<Duration>,
}

impl EngineConfig {
    pub fn new(artifact_root: impl Into<PathBuf>, policy: Policy) -> Self {
        EngineConfig {
            artifact_root: artifact_root.into(),
            policy,
            runtime: None,
            sandboxes: SandboxClasses::default(),
            default_attestation: Attestation::Pid,
            selinux_label: LabelPolicy::Off,
            runtime_state_dir: None,
            first_svid_timeout: Duration::from_millis(1500),
            deadline_margin: Duration::from_millis(150),
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            refused_recheck: Duration::from_secs(300),
            kubelet: None,
            limits: IdentityLimits::DEFAULT,
            start_guard: None,
        }
    }

    fn backends(&self, runtime: RuntimeKind) -> Backends {
        Backends::new(runtime, self.sandboxes.clone()).with_start_guard(self.start_guard.is_some())
    }
}

/// A container the engine looks after.
struct Tracked {
    pod_key: String,
    plan: Plan,
    request: Arc<IdentityRequest>,
    /// Opened at CreateContainer and reused, so a start does not walk the path again.
    dir: Option<ArtifactDir>,
    task: Option<(CancellationToken, JoinHandle<()>)>,
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
    labels: LabelSource,
    /// Set again when the runtime connects (NRI Configure names it).
    backends: RwLock<Backends>,
    /// Host path of the installed start-guard binary.
    guard_binary: OnceLock<PathBuf>,
    tracked: Mutex<HashMap<String, Tracked>>,
    /// Counted at CreateContainer, before anything is written.
    admissions: Admissions,
    bundles: bundles::Watches<BundleSet>,
    jwt_bundles: bundles::Watches<JwtBundleSet>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    retry: RetryPolicy,
    /// The default agent as the readiness probe last found it.
    agent: watch::Sender<AgentState>,
    /// Asks the readiness probe to look now (a container was refused).
    probe_now: tokio::sync::Notify,
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
        metrics: Arc<Metrics>,
    ) -> Self {
        // Until the runtime says who it is, the configured one (events never come before
        // NRI Configure; this only serves direct callers).
        let backends = cfg.backends(cfg.runtime.unwrap_or(RuntimeKind::Containerd));
        let retry = RetryPolicy {
            initial: cfg.retry_initial,
            max: cfg.retry_max,
            recheck: cfg.refused_recheck,
        };
        Engine {
            inner: Arc::new(Inner {
                writer: ArtifactWriter::new(host.clone(), cfg.artifact_root.clone()),
                labels: LabelSource::new(cfg.selinux_label, host.clone()),
                retry,
                agent: watch::Sender::new(AgentState::default()),
                probe_now: tokio::sync::Notify::new(),
                admissions: Admissions::new(cfg.limits),
                cfg,
                source,
                host,
                backends: RwLock::new(backends),
                guard_binary: OnceLock::new(),
                tracked: Mutex::new(HashMap::new()),
                bundles: Mutex::new(HashMap::new()),
                jwt_bundles: Mutex::new(HashMap::new()),
                metrics,
                shutdown: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Installs `executable` (the daemon's own binary) as the start guard under the artifact
    /// root, unless an identical copy is there, and returns its host path. One copy serves
    /// every pod, so it carries the shared label even where files get private ones.
    pub fn install_guard(&self, executable: &[u8]) -> Result<PathBuf, ArtifactError> {
        let label = self.inner.labels.shared_label();
        let path = self
            .inner
            .writer
            .install_guard(executable, label.as_deref())?;
        let _ = self.inner.guard_binary.set(path.clone());
        Ok(path)
    }

    /// The runtime connected and said its name (NRI Configure). A configured runtime that
    /// differs, or a runtime without a backend, is refused: serving one runtime with another's
    /// rules would break promises silently (a CRI-O start error is only logged).
    pub fn runtime_connected(&self, name: &str) -> Result<RuntimeKind, RuntimeError> {
        let reported =
            RuntimeKind::from_nri_runtime_name(name).ok_or_else(|| RuntimeError::Unknown {
                name: name.to_owned(),
            })?;
        if let Some(configured) = self.inner.cfg.runtime
            && configured != reported
        {
            return Err(RuntimeError::Mismatch {
                configured,
                reported,
            });
        }
        let mut backends = self
            .inner
            .backends
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *backends = self.inner.cfg.backends(reported);
        Ok(reported)
    }

    fn runtime(&self) -> AnyRuntime {
        self.inner
            .backends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .runtime
            .clone()
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

    fn plan(&self, pod: &PodInfo, request: &IdentityRequest) -> Result<Plan, EngineError> {
        let backends = self
            .inner
            .backends
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let choices = PodChoices {
            attestation: request.attestation,
            accepts_copy_once: request.copy_once,
            fail_closed: request.on_failure == OnFailure::Fail,
        };
        Ok(backends.plan(pod, choices, self.inner.cfg.default_attestation)?)
    }

    /// The SELinux label of the pod's directories and files, learnt again on every call so
    /// that a directory (re)created for any reason gets it.
    fn label(&self, pod: &PodInfo) -> Result<Option<Arc<str>>, EngineError> {
        let runtime = self.runtime();
        let state_dir = self.inner.cfg.runtime_state_dir.as_deref();
        Ok(self
            .inner
            .labels
            .label(&pod.id, |id| runtime.sandbox_spec_path(state_dir, id))?)
    }

    fn container_dir_path(&self, pod_key: &str, container_id: &str) -> PathBuf {
        self.inner
            .cfg
            .artifact_root
            .join(pod_key)
            .join(container_id)
    }

    /// CreateContainer: validates the annotation, creates the container's directory and
    /// returns what to add to the container: the directory's mount and, where the plan says
    /// so, the start guard (its binary's mount and its hook). `Ok(None)` for containers that
    /// ask for no identity. When the plan says so (selectors), the identity is delivered
    /// here, before the container exists.
    pub async fn create_container(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        deadline: Option<Instant>,
    ) -> Result<Option<Injection>, ContainerError> {
        let started = Instant::now();
        let err = |e| self.fail(pod, c, e);
        let Some(request) = self.request_for(pod, c).map_err(err)? else {
            return Ok(None);
        };
        let plan = self.plan(pod, &request).map_err(err)?;
        let label = self.label(pod).map_err(err)?;
        let guard = if plan.start_guard {
            let binary = self
                .inner
                .guard_binary
                .get()
                .ok_or(EngineError::GuardNotInstalled)
                .map_err(err)?;
            let timeout = self.inner.cfg.start_guard.unwrap_or_default();
            Some((
                MountSpec::executable_file(binary, Path::new(guard::CONTAINER_PATH)),
                GuardSpec::for_container(&request, pod, c, timeout).hook(),
            ))
        } else {
            None
        };
        let admissions = &self.inner.admissions;
        admissions
            .admit(pod.key(), &c.id)
            .map_err(|e| err(e.into()))?;
        let dir = self
            .inner
            .writer
            .create_dir(pod.key(), &c.id, label.as_deref())
            .map_err(|e| {
                admissions.release(pod.key(), &c.id);
                err(e.into())
            })?;
        let mut injection = Injection {
            mounts: vec![MountSpec::identity_dir(dir.path(), &request.cert_dir)],
            start_container_hooks: Vec::new(),
        };
        if let Some((mount, hook)) = guard {
            injection.mounts.push(mount);
            injection.start_container_hooks.push(hook);
        }
        info!(pod = %pod.name, namespace = %pod.namespace, container = %c.name, container_id = %c.id,
            cert_dir = %request.cert_dir.display(), attestation = %plan.attestation, sandbox = %plan.sandbox,
            start_guard = plan.start_guard, "identity directory prepared");
        let request = Arc::new(request);
        self.track(pod, c, plan, request.clone(), Some(dir));
        if plan.delivery == DeliveryPoint::CreateContainer {
            self.deliver_or_fail(pod, c, request, plan, deadline, started, true)
                .await?;
        }
        Ok(Some(injection))
    }

    fn fail(&self, pod: &PodInfo, c: &ContainerInfo, e: EngineError) -> ContainerError {
        self.inner.metrics.failure(e.kind());
        ContainerError::new(pod, c, e)
    }

    /// StartContainer: the container's process exists but has not run. Delivers the first
    /// identity where the plan says so (or, with `on_failure: continue`, keeps trying in the
    /// background) and starts keeping it fresh. `deadline` is when the runtime stops waiting.
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
                .map(|t| (t.request.clone(), t.plan, t.task.is_some()))
        };
        let (request, plan) = match known {
            // Delivered at CreateContainer (or kept trying in the background since).
            Some((_, plan, true)) if plan.delivery == DeliveryPoint::CreateContainer => {
                return Ok(());
            }
            Some((r, plan, _)) => (r, plan),
            None => {
                // Not seen at CreateContainer (daemon restarted in between, or it was not
                // connected). Only go on if the runtime did mount our directory.
                let err = |e| self.fail(pod, c, e);
                let Some(r) = self.request_for(pod, c).map_err(err)? else {
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
                    return Err(err(e));
                }
                let plan = self.plan(pod, &r).map_err(err)?;
                let r = Arc::new(r);
                self.track(pod, c, plan, r.clone(), None);
                (r, plan)
            }
        };
        self.deliver_or_fail(pod, c, request, plan, deadline, started, false)
            .await
    }

    fn track(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        plan: Plan,
        request: Arc<IdentityRequest>,
        dir: Option<ArtifactDir>,
    ) {
        let t = Tracked {
            pod_key: pod.key().to_owned(),
            plan,
            request,
            dir,
            task: None,
        };
        lock(&self.inner.tracked).insert(c.id.clone(), t);
    }

    /// The container's directory: the one opened at CreateContainer, else opened (and
    /// labelled) again.
    fn dir_of(&self, pod: &PodInfo, c: &ContainerInfo) -> Result<ArtifactDir, EngineError> {
        if let Some(dir) = lock(&self.inner.tracked)
            .get(&c.id)
            .and_then(|t| t.dir.clone())
        {
            return Ok(dir);
        }
        let label = self.label(pod)?;
        Ok(self
            .inner
            .writer
            .create_dir(pod.key(), &c.id, label.as_deref())?)
    }

    /// Delivers the first identity, applying the pod's failure policy. At CreateContainer a
    /// failure removes the directory (the container will not exist); at StartContainer it
    /// empties it in place (it is the mount source of a container that exists, and a VM
    /// guest's share pins its inode). Where the runtime starts the container despite a failed
    /// StartContainer, the start guard holds the workload and delivery goes on in the
    /// background; the error is still answered, for the runtime's log.
    #[allow(clippy::too_many_arguments)]
    async fn deliver_or_fail(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        plan: Plan,
        deadline: Option<Instant>,
        started: Instant,
        at_create: bool,
    ) -> Result<(), ContainerError> {
        let span = info_span!("identity", pod = %pod.name, namespace = %pod.namespace, container = %c.name, container_id = %c.id);
        let result = self
            .deliver_first(pod, c, request.clone(), plan, deadline, started)
            .instrument(span.clone())
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if request.on_failure == OnFailure::Continue => {
                span.in_scope(|| warn!(error = %e, "going on without identity for now (on_failure: continue); retrying in the background"));
                self.inner.metrics.failure(e.kind());
                self.spawn_background(pod, c, request, plan, span);
                Ok(())
            }
            Err(e) if !at_create && plan.start_guard && !plan.start_error_stops_container => {
                span.in_scope(|| warn!(error = %e, "no identity yet; the runtime starts the container anyway and its start guard holds the workload: retrying in the background"));
                self.spawn_background(pod, c, request, plan, span);
                Err(self.fail(pod, c, e))
            }
            Err(e) => {
                // Nothing half-delivered stays behind; the runtime retries.
                let w = &self.inner.writer;
                if at_create {
                    lock(&self.inner.tracked).remove(&c.id);
                    let _ = w.remove_container(pod.key(), &c.id);
                    self.inner.admissions.release(pod.key(), &c.id);
                } else if let Ok(dir) = self.dir_of(pod, c)
                    && let Err(error) = w.empty(&dir)
                {
                    span.in_scope(|| warn!(%error, "cannot empty the identity directory"));
                }
                Err(self.fail(pod, c, e))
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
        self.inner.admissions.release(&pod_key, &c.id);
        if let Err(error) = self.inner.writer.remove_container(&pod_key, &c.id) {
            warn!(container_id = %c.id, %error, "cannot remove the identity directory");
        }
    }

    /// RemovePodSandbox: the pod's directory goes with whatever is left in it.
    pub fn remove_pod(&self, pod: &PodInfo) {
        self.inner.admissions.release_pod(pod.key());
        if let Err(error) = self.inner.writer.remove_pod(pod.key()) {
            warn!(pod = %pod.name, %error, "cannot remove the pod's identity directory");
        }
    }

    /// After (re)connecting to the runtime: resume streams for running annotated containers
    /// and remove directories of containers that no longer exist.
    pub fn synchronize(&self, pods: &[PodInfo], containers: &[(ContainerInfo, Option<usize>)]) {
        let inner = &self.inner;
        let mut live = LiveContainers {
            pods: pods.iter().map(|p| p.key().to_owned()).collect(),
            containers: HashSet::new(),
        };
        for (c, pod_index) in containers {
            let Some(pod) = pod_index.and_then(|i| pods.get(i)) else {
                continue;
            };
            live.containers.insert((pod.key().to_owned(), c.id.clone()));
            let request = match self.request_for(pod, c) {
                Ok(Some(r)) => r,
                Ok(None) => continue,
                Err(error) => {
                    debug!(container = %c.name, %error, "skipping a container with an invalid annotation");
                    continue;
                }
            };
            let plan = match self.plan(pod, &request) {
                Ok(p) => p,
                Err(error) => {
                    debug!(container = %c.name, %error, "skipping a container that cannot be served");
                    continue;
                }
            };
            inner.admissions.restore(pod.key(), &c.id);
            let has_task = lock(&inner.tracked)
                .get(&c.id)
                .is_some_and(|t| t.task.is_some());
            let request = Arc::new(request);
            lock(&inner.tracked)
                .entry(c.id.clone())
                .or_insert_with(|| Tracked {
                    pod_key: pod.key().to_owned(),
                    plan,
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
            self.spawn_background(pod, c, request, plan, span);
        }
        inner.admissions.retain(&live.containers);
        match inner.writer.sweep(&live) {
            Ok(removed) => {
                for (pod_key, container_id) in removed {
                    match container_id {
                        None => {
                            info!(pod_key = %pod_key, "removed the identity directory of a pod that no longer exists")
                        }
                        Some(id) => {
                            info!(pod_key = %pod_key, container_id = %id, "removed the identity directory of a container that no longer exists")
                        }
                    }
                }
            }
            Err(error) => warn!(%error, "cannot clean up identity directories"),
        }
    }

    /// Asks the default agent whether it serves the daemon, and records the answer for
    /// readiness, metrics and the containers waiting for the agent to change. Returns the
    /// status and, unless ready, the error that says why.
    pub async fn probe_agent(&self) -> (AgentStatus, Option<SourceError>) {
        let agent = self.inner.cfg.policy.default_agent_address().to_owned();
        let (status, error) = match self.inner.source.probe(&agent).await {
            Ok(()) => (AgentStatus::Ready, None),
            Err(e) => match e.refusal() {
                Some(r) => (AgentStatus::Refused(r), Some(e)),
                None => (AgentStatus::Unreachable, Some(e)),
            },
        };
        let m = &self.inner.metrics;
        m.set_agent_ready(status != AgentStatus::Unreachable);
        m.set_agent_refusal(match status {
            AgentStatus::Refused(r) => Some(r),
            _ => None,
        });
        self.inner.agent.send_modify(|s| {
            s.status = status;
            s.probes += 1;
        });
        (status, error)
    }

    /// Resolves when a container's refusal asks for the agent to be probed now.
    pub async fn probe_wanted(&self) {
        self.inner.probe_now.notified().await;
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

/// Runs the file-system work of an answer the runtime waits for on this very thread, after
/// the runtime handed this worker's other tasks to another thread (so a slow disk still holds
/// up no other container's events). Unlike [`blocking`], the answer then waits neither for a
/// blocking-pool thread to wake up nor for a worker to wake up again afterwards: two thread
/// wake-ups that cost milliseconds on a busy node. A current-thread runtime has no other
/// worker to hand its tasks to, so there the work goes to the blocking pool.
async fn blocking_here<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => blocking(f).await,
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
            error: std::io::Error::other(e.to_string()),
        }))
    })
}
