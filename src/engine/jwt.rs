//! JWT-SVIDs as files: minted for the container's audience set when its identity is first
//! delivered, asked for again at half their lifetime (the agent does not push new ones: the
//! Delegated Identity API has no JWT-SVID stream), and removed when they expire before a new
//! one came. The JWT bundle (JWKS) of the SVID's trust domain is followed like the X.509
//! bundles and written next to the token.
//!
//! The files are written by the container's maintenance task, between its X.509 writes, so
//! one task still writes each directory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::maintain::WorkloadCtx;
use super::{Engine, EngineError, Report, blocking};
use crate::annotation::{IdentityRequest, JwtRequest};
use crate::artifacts::RenderedFiles;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::spire::{IdentitySource, JwtBundleSet, JwtSvid, unix_now};

/// Bound on one `FetchJWTSVIDs` call during maintenance (the first one has the event's
/// deadline): minting is a signature on the agent, so this only covers a loaded agent.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The moment a Unix time (seconds) comes, on the tokio clock.
fn instant_at(unix: i64) -> Instant {
    let ahead = unix.saturating_sub(unix_now()).max(0) as u64;
    Instant::now() + Duration::from_secs(ahead)
}

/// When to ask for a new token: at half its lifetime, never later.
fn half_life(svid: &JwtSvid) -> Instant {
    let lifetime = svid.expires_at.saturating_sub(svid.issued_at).max(0);
    instant_at(svid.issued_at.saturating_add(lifetime / 2))
}

/// One container's JWT-SVID file as its maintenance task knows it.
#[derive(Debug, Clone, Default)]
pub(super) struct JwtProgress {
    /// `exp` of the token on disk; `None` when no token is on disk.
    pub(super) expires_at: Option<i64>,
    /// When to ask again; `None` is now.
    pub(super) due: Option<Instant>,
    /// The trust domain whose JWKS goes next to the token, once known.
    pub(super) trust_domain: Option<TrustDomain>,
    /// The JWKS document on disk.
    pub(super) jwks: Option<Vec<u8>>,
    /// Failed refreshes in a row.
    failures: u32,
    /// A token may be on disk from before the daemon restarted, of unknown age.
    unknown_on_disk: bool,
}

impl JwtProgress {
    /// After the first delivery wrote `svid` and `jwks`.
    pub(super) fn delivered(svid: &JwtSvid, jwks: Vec<u8>) -> Self {
        JwtProgress {
            expires_at: Some(svid.expires_at),
            due: Some(half_life(svid)),
            trust_domain: Some(svid.spiffe_id.trust_domain().clone()),
            jwks: Some(jwks),
            failures: 0,
            unknown_on_disk: false,
        }
    }

    /// When maintenance resumes without a first delivery (a restart, `on_failure: continue`):
    /// ask at once; a token already on disk is of unknown age.
    pub(super) fn resumed() -> Self {
        JwtProgress {
            unknown_on_disk: true,
            ..JwtProgress::default()
        }
    }
}

/// Chooses the container's token: the one for the X.509-SVID's SPIFFE ID when known, else
/// the annotation's `spiffe_id`, else by hint, else the first.
fn pick_jwt(
    svids: Vec<JwtSvid>,
    request: &IdentityRequest,
    x509_id: Option<&SpiffeId>,
) -> Option<JwtSvid> {
    let mut svids = svids.into_iter();
    match (x509_id.or(request.spiffe_id.as_ref()), &request.hint) {
        (Some(id), _) => svids.find(|s| &s.spiffe_id == id),
        (None, Some(hint)) => svids.find(|s| &s.hint == hint),
        (None, None) => svids.next(),
    }
}

impl<S: IdentitySource> Engine<S> {
    /// Mints the container's token. With a PID, an answer that came after the process exited
    /// is about whichever process has the PID now, so it is refused.
    pub(super) async fn fetch_jwt(
        &self,
        ctx: &WorkloadCtx,
        jwt: &JwtRequest,
        x509_id: Option<&SpiffeId>,
        until: Instant,
    ) -> Result<JwtSvid, EngineError> {
        let (agent, request) = (&ctx.request.agent_address, &*ctx.request);
        let (workload, pidfd) = (&ctx.workload, ctx.pidfd.as_deref());
        let no_jwt = |timed_out| EngineError::NoJwt {
            agent: agent.to_owned(),
            spiffe_id: x509_id
                .or(request.spiffe_id.as_ref())
                .map_or_else(|| "the workload".to_owned(), |id| id.to_string()),
            audience: jwt.audience.clone(),
            timed_out,
        };
        let fetched = tokio::time::timeout_at(
            until,
            self.inner
                .source
                .fetch_jwt_svids(agent, workload, &jwt.audience),
        )
        .await
        .map_err(|_| no_jwt(true))?
        .map_err(|error| EngineError::Agent {
            agent: agent.to_owned(),
            error,
        })?;
        if let Some(p) = pidfd
            && !p.is_alive()?
        {
            return Err(EngineError::ProcessGone { pid: p.pid() });
        }
        pick_jwt(fetched, request, x509_id).ok_or_else(|| no_jwt(false))
    }

    /// Writes the token and/or the JWKS document.
    pub(super) async fn write_jwt(
        &self,
        ctx: &WorkloadCtx,
        jwt: &JwtRequest,
        token: Option<&JwtSvid>,
        jwks: Option<&[u8]>,
    ) -> Result<(), EngineError> {
        let files = RenderedFiles::jwt(
            token.map(|t| (&jwt.token, t.token.as_str())),
            jwks.map(|j| (&jwt.bundle, j)),
        )?;
        let (writer, dir, owner) = (self.inner.writer.clone(), ctx.dir.clone(), ctx.owner);
        blocking(move || Ok(writer.deliver_jwt(&dir, &files, owner)?)).await
    }

    /// Asks for a new token when one is due, writes it, and removes the token on disk once it
    /// expired without a successor. Returns when to come back.
    pub(super) async fn refresh_jwt(
        &self,
        ctx: &WorkloadCtx,
        jwt: &JwtRequest,
        progress: &mut JwtProgress,
        x509_id: Option<&SpiffeId>,
        bundles: &watch::Receiver<Option<Arc<JwtBundleSet>>>,
    ) {
        let inner = &self.inner;
        let until = Instant::now() + FETCH_TIMEOUT;
        let fetched = self.fetch_jwt(ctx, jwt, x509_id, until).await;
        let result = match fetched {
            Ok(svid) => {
                let td = svid.spiffe_id.trust_domain().clone();
                let jwks = bundles
                    .borrow()
                    .as_ref()
                    .and_then(|set| set.bundles.get(&td).cloned())
                    .filter(|j| progress.jwks.as_ref() != Some(j));
                match self.write_jwt(ctx, jwt, Some(&svid), jwks.as_deref()).await {
                    Ok(()) => Ok((svid, td, jwks)),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((svid, td, jwks)) => {
                if progress.failures > 0 || progress.expires_at.is_none() {
                    info!(spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at, failed_attempts = progress.failures, "JWT-SVID written");
                } else {
                    debug!(spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at, "JWT-SVID refreshed");
                }
                inner.metrics.jwt_refreshed();
                progress.failures = 0;
                progress.unknown_on_disk = false;
                progress.expires_at = Some(svid.expires_at);
                progress.due = Some(half_life(&svid));
                progress.trust_domain = Some(td);
                if jwks.is_some() {
                    progress.jwks = jwks;
                }
            }
            Err(error) => {
                if progress.failures == 0 {
                    warn!(error = %Report(&error), "cannot refresh the JWT-SVID; retrying before it expires");
                    inner.metrics.failure(error.kind());
                } else {
                    debug!(error = %Report(&error), attempt = progress.failures, "still cannot refresh the JWT-SVID");
                }
                let mut due = Instant::now() + inner.retry.backoff(progress.failures);
                progress.failures = progress.failures.saturating_add(1);
                match progress.expires_at {
                    Some(exp) if exp <= unix_now() => {
                        // Never leave a token the workload would present after its `exp`.
                        match inner.writer.remove_file(&ctx.dir, &jwt.token.name) {
                            Ok(()) => {
                                warn!(file = %jwt.token.name, expired_at = exp, "JWT-SVID expired before a new one could be fetched; file removed");
                                inner.metrics.jwt_expired_removed();
                                inner.metrics.failure("jwt_expired");
                                progress.expires_at = None;
                            }
                            Err(error) => {
                                warn!(%error, "cannot remove the expired JWT-SVID; retrying");
                                due = Instant::now() + inner.retry.backoff(0);
                            }
                        }
                    }
                    // Come back at the latest when it expires.
                    Some(exp) => due = due.min(instant_at(exp)),
                    // Its `exp` is not known here, so it cannot be kept past it.
                    None if progress.unknown_on_disk
                        && inner.writer.remove_file(&ctx.dir, &jwt.token.name).is_ok() =>
                    {
                        warn!(file = %jwt.token.name, "JWT-SVID of unknown age (from before a restart) removed until a new one can be fetched");
                        progress.unknown_on_disk = false;
                    }
                    None => {}
                }
                progress.due = Some(due);
            }
        }
    }

    /// Writes the JWKS next to the token when the agent's JWT bundle of its trust domain
    /// changed.
    pub(super) async fn follow_jwks(
        &self,
        ctx: &WorkloadCtx,
        jwt: &JwtRequest,
        progress: &mut JwtProgress,
        set: Option<Arc<JwtBundleSet>>,
    ) {
        let Some(td) = &progress.trust_domain else {
            return;
        };
        let Some(jwks) = set.and_then(|s| s.bundles.get(td).cloned()) else {
            return;
        };
        if progress.jwks.as_ref() == Some(&jwks) {
            return;
        }
        match self.write_jwt(ctx, jwt, None, Some(&jwks)).await {
            Ok(()) => {
                debug!(trust_domain = %td, "JWT bundle written");
                progress.jwks = Some(jwks);
            }
            Err(error) => {
                warn!(error = %Report(&error), "cannot write the JWT bundle; retrying with the next refresh");
                self.inner.metrics.failure(error.kind());
            }
        }
    }
}

/// Waits until the agent's JWT bundles hold `trust_domain`'s, up to `until`.
pub(super) async fn wait_jwks(
    mut rx: watch::Receiver<Option<Arc<JwtBundleSet>>>,
    trust_domain: &TrustDomain,
    until: Instant,
) -> Option<Vec<u8>> {
    let got = tokio::time::timeout_at(
        until,
        rx.wait_for(|b| {
            b.as_ref()
                .is_some_and(|s| s.bundles.contains_key(trust_domain))
        }),
    )
    .await
    .ok()?
    .ok()?;
    got.as_ref()?.bundles.get(trust_domain).cloned()
}
