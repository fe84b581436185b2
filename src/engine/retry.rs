//! When to ask the agent again after a failure: the engine's one retry policy, used by the
//! first delivery (inside a runtime event's deadline), by every maintenance task and by the
//! bundle follower.
//!
//! * **Transient** failures ([`SourceError::is_retryable`]: the agent restarting, a broken
//!   connection, attestation that may succeed next time) are retried after a jittered
//!   exponential backoff. Inside a runtime event they are retried until the deadline.
//! * **Refusals** that cannot change by themselves (the agent refuses the daemon itself, or
//!   this request: `PermissionDenied`, `InvalidArgument`, …) are reported once per container
//!   and then wait for the agent to change: for a refusal of the daemon, until the readiness
//!   probe finds the agent serving it again; for any other, until the agent comes back from
//!   being unready (restarted, reconfigured). A slow recheck bounds both, so that nothing
//!   waits forever on a change the probe cannot see (a registration entry fixed on the
//!   server).
//!
//! Right after the agent starts it refuses the daemon ("no identity issued") until its first
//! sync, so inside a runtime event a refusal of the daemon is retried like a transient
//! failure: the deadline bounds it, and the error then says what is wrong if it lasts.

use std::time::Duration;

use tokio::sync::watch;

use crate::spire::{DelegateRefusal, SourceError};

/// The longest pause between two attempts inside a runtime event: its deadline is short.
const WITHIN_DEADLINE_MAX: Duration = Duration::from_millis(200);

/// What the engine does after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Transient: ask again after this delay.
    After(Duration),
    /// Will not change by itself: report once, then wait for the agent (see the module
    /// documentation).
    WhenAgentChanges,
}

/// The engine's retry settings, taken from [`super::EngineConfig`].
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    pub(super) initial: Duration,
    pub(super) max: Duration,
    /// The longest a refused container waits before asking again anyway.
    pub(super) recheck: Duration,
}

impl RetryPolicy {
    /// After the `attempt`-th failure in a row (from 0) outside a runtime event.
    pub(super) fn after(&self, error: &SourceError, attempt: u32) -> Retry {
        if error.is_retryable() {
            Retry::After(self.backoff(attempt))
        } else {
            Retry::WhenAgentChanges
        }
    }

    /// Inside a runtime event: the pause before asking again, or `None` when asking again
    /// cannot help before the deadline.
    pub(super) fn within_deadline(&self, error: &SourceError, attempt: u32) -> Option<Duration> {
        (error.is_retryable() || error.refusal().is_some())
            .then(|| self.backoff(attempt).min(WITHIN_DEADLINE_MAX))
    }

    /// Jittered exponential backoff: uniformly in [d/2, d] for d = initial · 2^attempt,
    /// capped at `max`.
    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// The agent as the readiness probe last found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentStatus {
    /// Not probed yet.
    Unknown,
    /// It answers and serves the daemon.
    Ready,
    /// It answers but refuses the daemon itself.
    Refused(DelegateRefusal),
    /// It does not answer (down, restarting, frozen).
    Unreachable,
}

/// What maintenance tasks wait on: the latest status and how many probes produced it.
#[derive(Debug, Clone, Copy)]
pub(super) struct AgentState {
    pub(super) status: AgentStatus,
    pub(super) probes: u64,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            status: AgentStatus::Unknown,
            probes: 0,
        }
    }
}

/// Waits until the agent may answer `error` differently: for a refusal of the daemon, a probe
/// after `since` (a probe count) finds it serving the daemon; for any other terminal error,
/// the agent turns ready after having been anything else.
pub(super) async fn agent_changed(
    mut rx: watch::Receiver<AgentState>,
    error: &SourceError,
    since: u64,
) {
    if error.refusal().is_some() {
        let _ = rx
            .wait_for(|s| s.probes > since && s.status == AgentStatus::Ready)
            .await;
        return;
    }
    let mut was_ready = rx.borrow_and_update().status == AgentStatus::Ready;
    while rx.changed().await.is_ok() {
        let ready = rx.borrow_and_update().status == AgentStatus::Ready;
        if ready && !was_ready {
            return;
        }
        was_ready = ready;
    }
    // The sender went away with the engine: nothing will change.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            recheck: Duration::from_secs(300),
        }
    }

    fn status(code: tonic::Code, message: &str) -> SourceError {
        tonic::Status::new(code, message).into()
    }

    #[test]
    fn transient_failures_back_off_and_refusals_wait_for_the_agent() {
        let p = policy();
        let unavailable = status(tonic::Code::Unavailable, "attestation failed");
        for attempt in 0..20 {
            let Retry::After(d) = p.after(&unavailable, attempt) else {
                panic!("transient failures are retried");
            };
            let full = Duration::from_millis(100 << attempt.min(16)).min(p.max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        for e in [
            status(tonic::Code::PermissionDenied, "no identity issued"),
            status(
                tonic::Code::PermissionDenied,
                "caller not configured as an authorized delegate",
            ),
            status(tonic::Code::InvalidArgument, "invalid selector"),
            status(tonic::Code::PermissionDenied, "something else"),
            SourceError::InvalidWorkload("x"),
        ] {
            assert_eq!(p.after(&e, 0), Retry::WhenAgentChanges, "{e}");
        }
    }

    #[test]
    fn inside_a_deadline_refusals_of_the_daemon_are_retried_and_bad_requests_are_not() {
        let p = policy();
        // Right after an agent restart it refuses the daemon until its first sync.
        let refused = status(tonic::Code::PermissionDenied, "no identity issued");
        assert!(p.within_deadline(&refused, 9).unwrap() <= WITHIN_DEADLINE_MAX);
        assert!(
            p.within_deadline(&status(tonic::Code::Unavailable, "x"), 0)
                .is_some()
        );
        assert!(
            p.within_deadline(&status(tonic::Code::InvalidArgument, "x"), 0)
                .is_none()
        );
    }

    fn state(status: AgentStatus, probes: u64) -> AgentState {
        AgentState { status, probes }
    }

    /// Publishes `next` and checks that the waiter, once it had time to see it, still waits.
    async fn still_waits(
        tx: &watch::Sender<AgentState>,
        wait: &tokio::task::JoinHandle<()>,
        next: AgentState,
    ) {
        let seen = format!("{next:?}");
        tx.send_replace(next);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!wait.is_finished(), "woken by {seen}");
    }

    /// Publishes `next` and checks that it wakes the waiter.
    async fn wakes(
        tx: &watch::Sender<AgentState>,
        wait: tokio::task::JoinHandle<()>,
        next: AgentState,
        why: &str,
    ) {
        tx.send_replace(next);
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect(why)
            .unwrap();
    }

    #[tokio::test]
    async fn a_refusal_of_the_daemon_waits_for_a_newer_probe_that_finds_it_served() {
        let (tx, rx) = watch::channel(state(AgentStatus::Ready, 4));
        let refused = status(tonic::Code::PermissionDenied, "no identity issued");
        let wait = tokio::spawn(async move { agent_changed(rx, &refused, 4).await });
        tokio::task::yield_now().await;
        // A probe that still finds it refused does not wake it.
        let still_refused = AgentStatus::Refused(DelegateRefusal::NoEntry);
        still_waits(&tx, &wait, state(still_refused, 5)).await;
        wakes(
            &tx,
            wait,
            state(AgentStatus::Ready, 6),
            "woken by the probe that found the agent serving the daemon",
        )
        .await;
    }

    #[tokio::test]
    async fn other_refusals_wait_for_the_agent_to_come_back() {
        let (tx, rx) = watch::channel(state(AgentStatus::Ready, 1));
        let bad = status(tonic::Code::InvalidArgument, "invalid selector");
        let wait = tokio::spawn(async move { agent_changed(rx, &bad, 1).await });
        // Probes that keep finding it ready are no news for this container.
        for probes in 2..5 {
            still_waits(&tx, &wait, state(AgentStatus::Ready, probes)).await;
        }
        still_waits(&tx, &wait, state(AgentStatus::Unreachable, 5)).await;
        wakes(
            &tx,
            wait,
            state(AgentStatus::Ready, 6),
            "woken when the agent came back",
        )
        .await;
    }
}
