//! Keeping a container's identity fresh after its first delivery, and following each
//! agent's trust bundles.

use std::sync::Arc;
use std::time::Duration;

use nri_identity_backends::{Attestation, ContainerInfo, Plan, PodInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use super::first::{material, owner_of, pick};
use super::jwt::JwtProgress;
use super::retry::{self, Retry};
use super::{Engine, Report, active_tasks, blocking, lock};
use crate::annotation::IdentityRequest;
use crate::artifacts::ArtifactDir;
use crate::host::{Owner, Pidfd};
use crate::spiffe::TrustDomain;
use crate::spire::{
    BundleSet, IdentitySource, JwtBundleSet, SourceError, SvidStream, Workload, X509Svid,
};

/// Everything one workload's maintenance task needs.
pub(super) struct WorkloadCtx {
    pub(super) container_id: String,
    pub(super) dir: ArtifactDir,
    pub(super) request: Arc<IdentityRequest>,
    pub(super) workload: Workload,
    pub(super) owner: Option<Owner>,
    pub(super) pidfd: Option<Arc<Pidfd>>,
    /// The JWT-SVID file as the first delivery left it; `None`: ask at once (when the
    /// request wants one).
    pub(super) jwt: Option<JwtProgress>,
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
                                let delay = engine.inner.retry.backoff(attempt);
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
                jwt: None,
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
    /// and bundle changes, reconnects as the retry policy says (the old files stay), retries
    /// failed writes (a full disk) until they succeed, and stops when the process exits or
    /// the container goes.
    async fn maintain(
        &self,
        mut ctx: WorkloadCtx,
        mut stream: Option<SvidStream>,
        mut delivered: Option<Delivered>,
        cancel: CancellationToken,
    ) {
        let inner = &self.inner;
        let agent = ctx.request.agent_address.clone();
        let mut bundles = self.bundles_for::<BundleSet>(&agent);
        let exited = async {
            match &ctx.pidfd {
                Some(p) => {
                    let _ = p.exited().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(exited);
        let mut failures = Failures::new(&ctx.container_id);
        let mut latest: Option<(X509Svid, Vec<TrustDomain>)> = None;
        // The JWT-SVID is due on its own timer, also while the X.509 stream is down: an
        // expired token must go even when the agent is away.
        let jwt = ctx.request.jwt.clone();
        let mut jwt_progress = ctx.jwt.take().unwrap_or_else(JwtProgress::resumed);
        let mut jwt_bundles = jwt
            .as_ref()
            .map(|_| self.bundles_for::<JwtBundleSet>(&agent));
        macro_rules! jwt_due {
            () => {
                jwt_progress.due.unwrap_or_else(Instant::now)
            };
        }
        let jwt_on = jwt.is_some();
        // A write that failed is tried again after a backoff, not only at the next update:
        // with short-lived SVIDs the next update may come after the files expired.
        let mut write_retry: Option<Instant> = None;
        let mut write_failures: u32 = 0;
        loop {
            let Some(s) = stream.as_mut() else {
                let subscribed = tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = &mut exited => { debug!("process exited; stream closed"); return; }
                    r = inner.source.subscribe_svids(&agent, &ctx.workload) => r,
                };
                match subscribed {
                    Ok(s) => stream = Some(s),
                    Err(error) => {
                        let mut wait = self.after_failure(&mut failures, error);
                        loop {
                            tokio::select! {
                                _ = &mut wait => break,
                                _ = cancel.cancelled() => return,
                                _ = &mut exited => { debug!("process exited; stream closed"); return; }
                                _ = tokio::time::sleep_until(jwt_due!()), if jwt_on => {
                                    if let (Some(j), Some(rx)) = (&jwt, &jwt_bundles) {
                                        let id = latest.as_ref().map(|(s, _)| s.spiffe_id.clone());
                                        self.refresh_jwt(&ctx, j, &mut jwt_progress, id.as_ref(), rx).await;
                                    }
                                }
                            }
                        }
                    }
                }
                continue;
            };
            let retry_at = write_retry.unwrap_or_else(far_future);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut exited => {
                    debug!("process exited; stream closed");
                    return;
                }
                item = s.next() => match item {
                    Some(Ok(update)) => {
                        failures.answered(inner);
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
                        stream = None;
                        if error.is_retryable() && failures.in_a_row == 0 {
                            // Reconnect at once after a stream that worked.
                            warn!(%error, "identity stream broken; reconnecting");
                            inner.metrics.failure(error.kind());
                            failures.in_a_row = 1;
                            continue;
                        }
                        let mut wait = self.after_failure(&mut failures, error);
                        loop {
                            tokio::select! {
                                _ = &mut wait => break,
                                _ = cancel.cancelled() => return,
                                _ = &mut exited => { debug!("process exited; stream closed"); return; }
                                _ = tokio::time::sleep_until(jwt_due!()), if jwt_on => {
                                    if let (Some(j), Some(rx)) = (&jwt, &jwt_bundles) {
                                        let id = latest.as_ref().map(|(s, _)| s.spiffe_id.clone());
                                        self.refresh_jwt(&ctx, j, &mut jwt_progress, id.as_ref(), rx).await;
                                    }
                                }
                            }
                        }
                        continue;
                    }
                    None => {
                        // The source's contract: every stream ends with an error.
                        stream = None;
                        continue;
                    }
                },
                changed = bundles.changed() => {
                    if changed.is_err() {
                        bundles = self.bundles_for::<BundleSet>(&agent);
                    }
                }
                _ = tokio::time::sleep_until(retry_at), if write_retry.is_some() => {
                    write_retry = None;
                }
                _ = tokio::time::sleep_until(jwt_due!()), if jwt_on => {
                    if let (Some(j), Some(rx)) = (&jwt, &jwt_bundles) {
                        let id = latest.as_ref().map(|(s, _)| s.spiffe_id.clone());
                        self.refresh_jwt(&ctx, j, &mut jwt_progress, id.as_ref(), rx).await;
                    }
                    continue;
                }
                changed = changed_or_pending(&mut jwt_bundles) => {
                    if changed.is_err() {
                        jwt_bundles = Some(self.bundles_for::<JwtBundleSet>(&agent));
                    } else if let (Some(j), Some(rx)) = (&jwt, &jwt_bundles) {
                        let set = rx.borrow().clone();
                        self.follow_jwks(&ctx, j, &mut jwt_progress, set).await;
                    }
                    continue;
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
                    if write_failures > 0 {
                        info!(
                            failed_attempts = write_failures,
                            "identity files written again"
                        );
                    }
                    write_failures = 0;
                    write_retry = None;
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
                    // Reported once per episode; the old files stay whole (staged writes).
                    if write_failures == 0 {
                        warn!(error = %Report(&error), "cannot write identity files; retrying");
                        inner.metrics.failure(error.kind());
                    } else {
                        debug!(error = %Report(&error), attempt = write_failures, "still cannot write identity files");
                    }
                    write_retry = Some(Instant::now() + inner.retry.backoff(write_failures));
                    write_failures = write_failures.saturating_add(1);
                }
            }
        }
    }

    /// Reports a failed subscription as the retry policy says and returns what to wait for
    /// before asking again: a backoff for transient failures; for refusals, the agent
    /// changing (reported once per container, with the probe asked to look now).
    fn after_failure(&self, failures: &mut Failures, error: SourceError) -> Wait {
        let inner = &self.inner;
        let attempt = failures.in_a_row;
        failures.in_a_row = failures.in_a_row.saturating_add(1);
        let backoff = inner.retry.backoff(attempt);
        let (agent, recheck) = (inner.agent.subscribe(), inner.retry.recheck);
        let since = inner.agent.borrow().probes;
        match inner.retry.after(&error, attempt) {
            Retry::After(delay) => {
                inner.metrics.failure(error.kind());
                debug!(error = %error, ?delay, "cannot subscribe; retrying");
                Box::pin(tokio::time::sleep(delay))
            }
            Retry::WhenAgentChanges => {
                if failures.refused != Some(error.kind()) {
                    warn!(error = %error, "the SPIRE agent refuses this identity; asking again when the agent changes");
                    inner.metrics.failure(error.kind());
                    inner.metrics.set_refused(&failures.container_id, true);
                    failures.refused = Some(error.kind());
                }
                if error.refusal().is_some() {
                    inner.probe_now.notify_one();
                }
                Box::pin(async move {
                    // Never faster than the backoff, never longer than the recheck.
                    tokio::time::sleep(backoff).await;
                    let _ =
                        tokio::time::timeout(recheck, retry::agent_changed(agent, &error, since))
                            .await;
                })
            }
        }
    }
}

/// The next change of an optional watch; never, without one.
async fn changed_or_pending<T>(
    rx: &mut Option<watch::Receiver<T>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// What a failed task waits for before asking the agent again.
pub(super) type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A moment that never comes, for a timer that is off.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// One container's run of failed subscriptions, so that each failure is reported once.
struct Failures {
    container_id: String,
    /// Failures since the agent last answered.
    in_a_row: u32,
    /// The kind of the refusal reported, while the agent refuses this identity.
    refused: Option<&'static str>,
}

impl Failures {
    fn new(container_id: &str) -> Self {
        Failures {
            container_id: container_id.to_owned(),
            in_a_row: 0,
            refused: None,
        }
    }

    /// The agent answered: the run is over.
    fn answered<S>(&mut self, inner: &super::Inner<S>) {
        if self.refused.take().is_some() {
            info!("the SPIRE agent serves this identity again");
            inner.metrics.set_refused(&self.container_id, false);
        }
        self.in_a_row = 0;
    }
}
