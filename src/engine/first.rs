//! The first delivery of a container's identity, inside a runtime event's deadline: name the
//! workload, wait for its first SVID and the trust bundles, check the process is still the
//! one asked about, write the files.

use std::sync::Arc;

use nri_identity_backends::{Attestation, BackendError, ContainerInfo, Plan, PodInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::{debug, info};

use super::jwt::{JwtProgress, wait_jwks};
use super::maintain::{Delivered, WorkloadCtx};
use super::{Engine, EngineError, blocking_here};
use crate::annotation::IdentityRequest;
use crate::artifacts::Material;
use crate::host::Owner;
use crate::k8s;
use crate::metrics::{Phase, PhaseTimes};
use crate::spiffe::TrustDomain;
use crate::spire::{
    BundleSet, IdentitySource, JwtBundleSet, SourceError, SvidUpdate, Workload, X509Svid,
};

impl<S: IdentitySource> Engine<S> {
    /// The `k8s` selectors SPIRE's k8s attestor would produce for this container, and the
    /// user its pod spec gives it.
    pub(super) async fn derive_selectors(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        until: Instant,
    ) -> Result<k8s::Naming, EngineError> {
        let kubelet = self
            .inner
            .cfg
            .kubelet
            .as_ref()
            .ok_or(EngineError::NoKubelet)?;
        Ok(k8s::derive_selectors(kubelet, &self.runtime(), pod, c, until).await?)
    }

    pub(super) async fn deliver_first(
        &self,
        pod: &PodInfo,
        c: &ContainerInfo,
        request: Arc<IdentityRequest>,
        plan: Plan,
        deadline: Option<Instant>,
        started: Instant,
    ) -> Result<(), EngineError> {
        let inner = &self.inner;
        let mut watch = Stopwatch::new(started);
        let mut budget = inner.cfg.first_svid_timeout;
        if let Some(d) = deadline {
            budget = budget.min(
                d.saturating_duration_since(Instant::now())
                    .saturating_sub(inner.cfg.deadline_margin),
            );
        }
        let until = Instant::now() + budget;
        let mut spec_user = None;
        let (workload, pidfd) = match plan.attestation {
            Attestation::Pid => {
                let pid = c.pid.filter(|p| *p > 0).ok_or(BackendError::NoPid)? as u32;
                // The pidfd is opened before the agent is asked: if it is still alive after
                // the answer, the answer was about this very process, not a recycled PID.
                (
                    Workload::Pid(pid as i32),
                    Some(Arc::new(inner.host.open_pidfd(pid)?)),
                )
            }
            Attestation::Selectors => {
                let naming = self.derive_selectors(pod, c, until).await?;
                spec_user = naming.spec_user;
                (Workload::Selectors(naming.selectors), None)
            }
        };
        watch.lap(Phase::Named);
        let agent = request.agent_address.clone();
        let bundles = self.bundles_for::<BundleSet>(&agent);
        let agent_err = |error| EngineError::Agent {
            agent: agent.clone(),
            error,
        };

        // Failures that may heal before the deadline (the agent restarting, or refusing the
        // daemon until its first sync) are retried until then; the last one is the error.
        let mut empty = 0;
        let mut attempt = 0;
        let mut last: Option<SourceError> = None;
        let no_identity = |last: Option<SourceError>, empty| match last {
            Some(e) => agent_err(e),
            None => EngineError::NoIdentity {
                agent: agent.clone(),
                budget,
                empty_updates: empty,
            },
        };
        let (stream, svid, federates_with) = 'answered: loop {
            let subscribed =
                tokio::time::timeout_at(until, inner.source.subscribe_svids(&agent, &workload))
                    .await;
            let error = match subscribed {
                Err(_) => return Err(no_identity(last, empty)),
                Ok(Err(e)) => e,
                Ok(Ok(mut stream)) => {
                    watch.lap(Phase::StreamOpen);
                    loop {
                        match tokio::time::timeout_at(until, stream.next()).await {
                            Err(_) => return Err(no_identity(None, empty)),
                            Ok(None) => break SourceError::StreamEnded,
                            Ok(Some(Err(e))) => break e,
                            Ok(Some(Ok(update))) => {
                                if update.svids.is_empty() {
                                    // The agent answers at once with an empty set when no entry
                                    // matches (yet); an entry may still arrive within the budget.
                                    empty += 1;
                                    continue;
                                }
                                watch.lap(Phase::FirstSvid);
                                let (svid, federates_with) = pick(&request, update)?;
                                break 'answered (stream, svid, federates_with);
                            }
                        }
                    }
                }
            };
            if error.refusal().is_some() {
                inner.probe_now.notify_one();
            }
            match inner.retry.within_deadline(&error, attempt) {
                Some(delay) if Instant::now() + delay < until => {
                    debug!(%error, ?delay, "no identity yet; asking again");
                    attempt += 1;
                    last = Some(error);
                    tokio::time::sleep(delay).await;
                }
                _ => return Err(agent_err(error)),
            }
        };
        let bundle_set =
            wait_bundles(bundles.clone(), until)
                .await
                .ok_or_else(|| EngineError::NoBundle {
                    agent: agent.clone(),
                    budget,
                })?;
        watch.lap(Phase::Bundle);
        let mut owner = owner_of(c, spec_user);
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
        let dir = self.dir_of(pod, c)?;
        watch.lap(Phase::Checks);
        let mut ctx = WorkloadCtx {
            container_id: c.id.clone(),
            dir: dir.clone(),
            request: request.clone(),
            workload,
            owner,
            pidfd,
            jwt: None,
        };
        // The JWT files first: the X.509 files' last one is what a start guard waits for.
        if let Some(jwt) = &request.jwt {
            let jwt_bundles = self.bundles_for::<JwtBundleSet>(&agent);
            let token = self
                .fetch_jwt(&ctx, jwt, Some(&svid.spiffe_id), until)
                .await?;
            let td = token.spiffe_id.trust_domain();
            let jwks = wait_jwks(jwt_bundles, td, until).await.ok_or_else(|| {
                EngineError::NoJwtBundle {
                    agent: agent.clone(),
                    trust_domain: td.clone(),
                    budget,
                }
            })?;
            self.write_jwt(&ctx, jwt, Some(&token), Some(&jwks)).await?;
            inner.metrics.jwt_refreshed();
            info!(spiffe_id = %token.spiffe_id, audience = ?jwt.audience, expires_at = token.expires_at, "JWT-SVID written");
            ctx.jwt = Some(JwtProgress::delivered(&token, jwks));
        }
        watch.lap(Phase::Jwt);
        let (writer, target, req) = (inner.writer.clone(), dir.clone(), request.clone());
        blocking_here(move || Ok(writer.deliver(&target, &req, &material, owner)?)).await?;
        watch.lap(Phase::Written);
        inner.metrics.served(started.elapsed());
        inner.metrics.set_expiry(&c.id, svid.expires_at);
        let spiffe_id = svid.spiffe_id.clone();
        let delivered = Delivered {
            chain: svid.cert_chain.clone(),
            federates_with,
            bundles: Some(bundle_set),
        };
        self.spawn_maintenance(ctx, Some(stream), Some(delivered), tracing::Span::current());
        watch.lap(Phase::Reply);
        let t = watch.times;
        inner.metrics.delivery_phases(&t);
        let ms = |p| ms_of(t.get(p));
        info!(%spiffe_id, attestation = %plan.attestation, elapsed_ms = ms_of(t.total()),
            workload_named_ms = ms(Phase::Named), stream_open_ms = ms(Phase::StreamOpen),
            first_svid_ms = ms(Phase::FirstSvid), bundle_ready_ms = ms(Phase::Bundle),
            checks_ms = ms(Phase::Checks), jwt_ms = ms(Phase::Jwt), files_written_ms = ms(Phase::Written),
            reply_ms = ms(Phase::Reply), "identity delivered");
        Ok(())
    }
}

/// Splits a first delivery's time into its phases: each lap ends a phase. A phase lapped more
/// than once (a stream opened again after a failure) adds up, so the phases always sum to the
/// time since the event.
struct Stopwatch {
    last: Instant,
    times: PhaseTimes,
}

impl Stopwatch {
    fn new(started: Instant) -> Self {
        Stopwatch {
            last: started,
            times: PhaseTimes::default(),
        }
    }

    fn lap(&mut self, phase: Phase) {
        let now = Instant::now();
        let took = self.times.get(phase) + now.saturating_duration_since(self.last);
        self.times.set(phase, took);
        self.last = now;
    }
}

/// Milliseconds with microsecond resolution, for the log.
fn ms_of(d: std::time::Duration) -> f64 {
    (d.as_micros() as f64) / 1e3
}

/// Who owns a container's files: the user the runtime reports (it resolved the image's
/// `USER`), else the one the pod spec sets; `None` leaves them the daemon's. PID mode adds the
/// process's own owner as a last resort.
pub(super) fn owner_of(c: &ContainerInfo, spec_user: Option<(u32, u32)>) -> Option<Owner> {
    c.user.or(spec_user).map(Owner::from)
}

/// Chooses the SVID for a request from a complete update.
pub(super) fn pick(
    request: &IdentityRequest,
    update: SvidUpdate,
) -> Result<(X509Svid, Vec<TrustDomain>), EngineError> {
    let SvidUpdate {
        svids,
        federates_with,
    } = update;
    let available: Vec<String> = svids.iter().map(|s| s.spiffe_id.to_string()).collect();
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
        && *expected != svid.spiffe_id
    {
        return Err(EngineError::UnexpectedSpiffeId {
            expected: expected.to_string(),
            got: svid.spiffe_id.to_string(),
        });
    }
    Ok((svid, federates_with))
}

pub(super) fn material(
    svid: &X509Svid,
    federates_with: &[TrustDomain],
    bundles: &BundleSet,
) -> Result<Material, EngineError> {
    let own = svid.spiffe_id.trust_domain();
    let own_bundle =
        bundles
            .bundles
            .get(own)
            .cloned()
            .ok_or_else(|| EngineError::MissingTrustDomain {
                trust_domain: own.clone(),
            })?;
    let federated = federates_with
        .iter()
        .filter(|td| *td != own)
        .filter_map(|td| Some((td.clone(), bundles.bundles.get(td)?.clone())))
        .collect();
    Ok(Material {
        trust_domain: own.clone(),
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
