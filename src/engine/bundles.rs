//! The bundles of each agent, X.509 trust bundles and JWT bundles alike: one watch per agent
//! and kind, fed by one task for the daemon's life, started by the first container that needs
//! it. Every workload of the agent reads the same watch, so a start waits for no subscription
//! of its own, and the last bundles stay in use while the stream is down.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tracing::{Instrument, debug, info, info_span, warn};

use super::maintain::Wait;
use super::retry::{self, Retry};
use super::{Engine, Inner, lock};
use crate::spire::{BundleSet, IdentitySource, JwtBundleSet, SourceError};

/// The watches of one kind of bundle, by agent socket.
pub(super) type Watches<B> = Mutex<HashMap<PathBuf, watch::Receiver<Option<Arc<B>>>>>;

type Updates<B> = Pin<Box<dyn Stream<Item = Result<B, SourceError>> + Send>>;

/// A kind of bundle set an agent streams.
pub(super) trait Bundles: PartialEq + Send + Sync + Sized + 'static {
    /// How the logs name it.
    const WHAT: &'static str;
    /// The span of its task.
    const SPAN: &'static str;

    fn trust_domains(&self) -> usize;

    fn watches<S>(inner: &Inner<S>) -> &Watches<Self>;

    fn subscribe<S: IdentitySource>(
        source: &S,
        agent: &Path,
    ) -> impl Future<Output = Result<Updates<Self>, SourceError>> + Send;
}

impl Bundles for BundleSet {
    const WHAT: &'static str = "trust bundles";
    const SPAN: &'static str = "bundles";

    fn trust_domains(&self) -> usize {
        self.bundles.len()
    }

    fn watches<S>(inner: &Inner<S>) -> &Watches<Self> {
        &inner.bundles
    }

    fn subscribe<S: IdentitySource>(
        source: &S,
        agent: &Path,
    ) -> impl Future<Output = Result<Updates<Self>, SourceError>> + Send {
        source.subscribe_bundles(agent)
    }
}

impl Bundles for JwtBundleSet {
    const WHAT: &'static str = "JWT bundles";
    const SPAN: &'static str = "jwt_bundles";

    fn trust_domains(&self) -> usize {
        self.bundles.len()
    }

    fn watches<S>(inner: &Inner<S>) -> &Watches<Self> {
        &inner.jwt_bundles
    }

    fn subscribe<S: IdentitySource>(
        source: &S,
        agent: &Path,
    ) -> impl Future<Output = Result<Updates<Self>, SourceError>> + Send {
        source.subscribe_jwt_bundles(agent)
    }
}

impl<S: IdentitySource> Engine<S> {
    /// The watch of `agent`'s bundles of kind `B`, started on first use and kept for the
    /// daemon's life.
    pub(super) fn bundles_for<B: Bundles>(&self, agent: &Path) -> watch::Receiver<Option<Arc<B>>> {
        let mut map = lock(B::watches(&self.inner));
        if let Some(rx) = map.get(agent) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        map.insert(agent.to_owned(), rx.clone());
        let engine = self.clone();
        let agent = agent.to_owned();
        let span = info_span!("bundles", kind = B::SPAN, agent = %agent.display());
        self.inner
            .tasks
            .spawn(async move { engine.follow_bundles(agent, tx).await }.instrument(span));
        rx
    }

    async fn follow_bundles<B: Bundles>(&self, agent: PathBuf, tx: watch::Sender<Option<Arc<B>>>) {
        let inner = &self.inner;
        let mut failures = 0u32;
        let mut reported: Option<&'static str> = None;
        loop {
            let result = tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                r = B::subscribe(&inner.source, &agent) => r,
            };
            let error = match result {
                Ok(mut stream) => loop {
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        item = stream.next() => match item {
                            Some(Ok(set)) => {
                                if reported.take().is_some() {
                                    info!("the SPIRE agent sends {} again", B::WHAT);
                                }
                                failures = 0;
                                if tx.borrow().as_deref() != Some(&set) {
                                    debug!(trust_domains = set.trust_domains(), "{} updated", B::WHAT);
                                    tx.send_replace(Some(Arc::new(set)));
                                }
                            }
                            Some(Err(error)) => break error,
                            None => break SourceError::StreamEnded,
                        }
                    }
                },
                Err(error) => error,
            };
            // Reported once per kind of failure; the last bundles stay in use.
            if reported != Some(error.kind()) {
                warn!(%error, "cannot follow {}; retrying", B::WHAT);
                reported = Some(error.kind());
            }
            let attempt = failures;
            failures = failures.saturating_add(1);
            let since = inner.agent.borrow().probes;
            // Every workload of the agent needs its bundles, and a start waits for them: a
            // refusal of the daemon is asked again after the backoff, or as soon as the probe
            // finds the agent serving the daemon again, whichever comes first.
            let delay = inner.retry.backoff(attempt);
            let wait: Wait = match inner.retry.after(&error, attempt) {
                Retry::After(delay) => Box::pin(tokio::time::sleep(delay)),
                Retry::WhenAgentChanges => {
                    let rx = inner.agent.subscribe();
                    Box::pin(async move {
                        let _ =
                            tokio::time::timeout(delay, retry::agent_changed(rx, &error, since))
                                .await;
                    })
                }
            };
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = wait => {}
            }
        }
    }
}
