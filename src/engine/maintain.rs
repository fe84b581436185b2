//! Keeping a container's identity fresh after its first delivery, and following each
//! agent's trust bundles.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nri_identity_backends::{Attestation, ContainerInfo, Plan, PodInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::first::{material, owner_of, pick};
use super::{Engine, active_tasks, blocking, lock};
use crate::annotation::IdentityRequest;
use crate::artifacts::ArtifactDir;
use crate::host::{Owner, Pidfd};
use crate::spiffe::TrustDomain;
use crate::spire::{BundleSet, IdentitySource, SvidStream, Workload, X509Svid};

/// Everything one workload's maintenance task needs.
pub(super) struct WorkloadCtx {
    pub(super) container_id: String,
    pub(super) dir: ArtifactDir,
    pub(super) request: Arc<IdentityRequest>,
    pub(super) workload: Workload,
    pub(super) owner: Option<Owner>,
    pub(super) pidfd: Option<Arc<Pidfd>>,
}

/// What was last written for a workload, to skip identical updates.
#[derive(Clone, PartialEq)]
pub(super) struct Delivered {
    pub(super) chain: Vec<Vec<u8>>,
    pub(super) federates_with: Vec<TrustDomain>,
    pub(super) bundles: Option<Arc<BundleSet>>,
}

impl<S: IdentitySource> Engine<S> {
    /// Keeps trying in the background: after `on_failure: continue`, and when resuming
    /// after a restart.
    pub(super) fn spawn_background(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        plan: Plan,
        span: tracing::Span,
    ) {
        let inner = &self.inner;
        let dir = match self.dir_of(pod, c) {
            Ok(d) => d,
            Err(error) => {
                span.in_scope(|| warn!(%error, "cannot open the identity directory; giving up"));
                return;
            }
        };
        let mut owner = owner_of(c, None);
        let (workload, pidfd) = match plan.attestation {
            Attestation::Pid => {
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
            Attestation::Selectors => (None, None),
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
                            Ok(naming) => {
                                owner = owner_of(&c, naming.spec_user);
                                break Workload::Selectors(naming.selectors);
                            }
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

    pub(super) fn spawn_maintenance(
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
        let mut latest: Option<(X509Svid, Vec<TrustDomain>)> = None;
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
    pub(super) fn bundles_for(&self, agent: &Path) -> watch::Receiver<Option<Arc<BundleSet>>> {
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
}

fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(max);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}
