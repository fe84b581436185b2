//! The first delivery of a container's identity, inside a runtime event's deadline: name the
//! workload, wait for its first SVID and the trust bundles, check the process is still the
//! one asked about, write the files.

use std::sync::Arc;

use nri_identity_backends::{Attestation, BackendError, ContainerInfo, Plan, PodInfo};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tracing::info;

use super::maintain::{Delivered, WorkloadCtx};
use super::{Engine, EngineError, blocking};
use crate::annotation::IdentityRequest;
use crate::artifacts::Material;
use crate::host::Owner;
use crate::k8s;
use crate::spiffe::TrustDomain;
use crate::spire::{BundleSet, IdentitySource, SourceError, SvidUpdate, Workload, X509Svid};

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
        let agent = request.agent_address.clone();
        let bundles = self.bundles_for(&agent);
        let agent_err = |error| EngineError::Agent {
            agent: agent.clone(),
            error,
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
        let (writer, target, req) = (inner.writer.clone(), dir.clone(), request.clone());
        blocking(move || Ok(writer.deliver(&target, &req, &material, owner)?)).await?;
        let elapsed = started.elapsed();
        inner.metrics.served(elapsed);
        inner.metrics.set_expiry(&c.id, svid.expires_at);
        info!(spiffe_id = %svid.spiffe_id, attestation = %plan.attestation, elapsed_ms = elapsed.as_secs_f64() * 1e3, "identity delivered");
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
