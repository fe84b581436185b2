//! The daemon: wires configuration, the engine, the NRI connection, health endpoints and
//! signal handling together.

use std::sync::Arc;
use std::time::Duration;

use nri_plugin::{ConnectionState, Options, Runner};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::config::SelinuxLabel;
use crate::engine::{Engine, EngineConfig, RuntimeError};
use crate::host::RealHost;
use crate::metrics::Metrics;
use crate::nri::IdentityPlugin;
use crate::selinux::{SELINUXFS, SHARED_CONTAINER_FILE_LABEL};
use crate::spire::{ApiConfig, DelegatedIdentityApi};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot listen on {addr} for health and metrics: {error}")]
    Http {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Nri(#[from] nri_plugin::Error),
    #[error("unsafe artifact_root {}: {error}", root.display())]
    ArtifactRoot {
        root: std::path::PathBuf,
        error: crate::host::HostError,
    },
    #[error("cannot read the daemon's own executable for the start guard: {0}")]
    GuardExecutable(std::io::Error),
    #[error(transparent)]
    Guard(#[from] crate::artifacts::ArtifactError),
}

/// Runs until SIGTERM/SIGINT (or `shutdown` is cancelled).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    warn_unless_tmpfs(&config.artifact_root);
    RealHost::check_root_ancestors(&config.artifact_root).map_err(|error| {
        DaemonError::ArtifactRoot {
            root: config.artifact_root.clone(),
            error,
        }
    })?;
    let metrics = Arc::new(Metrics::default());
    let mut engine_cfg = EngineConfig::new(&config.artifact_root, config.annotation_policy());
    engine_cfg.runtime = config.runtime;
    engine_cfg.sandboxes = config.sandbox_classes();
    engine_cfg.first_svid_timeout = config.first_svid_timeout();
    engine_cfg.default_attestation = config.default_attestation();
    engine_cfg.limits = config.identity_limits();
    engine_cfg.start_guard = config.start_guard();
    engine_cfg.selinux_label = match config
        .selinux_label
        .resolve(std::path::Path::new(SELINUXFS))
    {
        SelinuxLabel::Shared => Some(SHARED_CONTAINER_FILE_LABEL.to_owned()),
        _ => None,
    };
    info!(
        selinux_label = engine_cfg.selinux_label.as_deref().unwrap_or("none"),
        "identity file label"
    );
    engine_cfg.kubelet = config
        .kubelet_endpoint()
        .map(|e| Arc::new(crate::k8s::KubeletPods::new(e)));
    let engine = Engine::new(
        engine_cfg,
        DelegatedIdentityApi::new(ApiConfig::default()),
        Arc::new(RealHost::new()),
        metrics.clone(),
    );
    if let Some(timeout) = config.start_guard() {
        // In a DaemonSet the binary lives in the daemon's image; its copy under the (host)
        // artifact root is a host path the runtime can bind-mount into containers.
        let executable = std::fs::read("/proc/self/exe").map_err(DaemonError::GuardExecutable)?;
        let path = engine.install_guard(&executable)?;
        info!(path = %path.display(), timeout_ms = timeout.as_millis() as u64, "start guard installed");
    }

    let mut options =
        Options::new(&config.plugin_name, &config.plugin_index).socket_path(&config.nri_socket);
    options = options.from_env()?;
    let plugin =
        Arc::new(IdentityPlugin::new(engine.clone()).stop_on_wrong_runtime(shutdown.clone()));
    let runner = Runner::new(plugin.clone(), options)?;

    if let Some(addr) = config.http_address {
        let listener = crate::http::bind(addr)
            .await
            .map_err(|error| DaemonError::Http { addr, error })?;
        info!(%addr, "serving /healthz, /readyz and /metrics");
        tokio::spawn(crate::http::serve(
            listener,
            metrics.clone(),
            shutdown.clone(),
        ));
    }

    // Readiness follows the runtime connection...
    let mut state = runner.state();
    let m = metrics.clone();
    tokio::spawn(async move {
        loop {
            let ready = state.borrow_and_update().is_ready();
            m.set_nri_ready(ready);
            if let ConnectionState::Disconnected { reason } = &*state.borrow() {
                warn!(%reason, "not connected to the runtime");
            }
            if state.changed().await.is_err() {
                m.set_nri_ready(false);
                return;
            }
        }
    });
    // ...and whether the agent answers...
    let e = engine.clone();
    watch(shutdown.clone(), Duration::from_secs(10), move |last| {
        let e = e.clone();
        async move {
            let ok = e.probe_agent().await;
            match (ok, last) {
                (true, l) if l != Some(true) => info!("the SPIRE agent answers"),
                (false, l) if l != Some(false) => warn!("the SPIRE agent does not answer"),
                _ => {}
            }
            Some(ok)
        }
    });
    // ...and, in selectors mode, whether the kubelet lists the node's pods: without it no
    // selectors-mode container can start, and the log says why (refused token, unknown CA).
    let e = engine.clone();
    watch(shutdown.clone(), Duration::from_secs(30), move |last| {
        let e = e.clone();
        async move {
            let result = e.probe_kubelet().await?;
            match (&result, last) {
                (Ok(pods), l) if l != Some(true) => {
                    info!(pods, "the kubelet lists this node's pods")
                }
                (Err(error), l) if l != Some(false) => {
                    warn!(%error, "the kubelet does not list this node's pods")
                }
                _ => {}
            }
            Some(result.is_ok())
        }
    });

    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = signals.cancelled() => {}
        }
        signals.cancel();
    });

    let result = runner.run(shutdown.clone()).await;
    shutdown.cancel();
    let drained = engine.shutdown(config.drain_timeout()).await;
    if drained {
        info!("stopped gracefully");
    } else {
        warn!(
            timeout_ms = config.drain_timeout_ms,
            "drain timed out; exiting anyway"
        );
    }
    if let Some(e) = plugin.wrong_runtime() {
        return Err(e.into());
    }
    // Files stay in place: containers keep their identity across a daemon restart, and the
    // next instance resumes rotation from the runtime's Synchronize.
    result.map_err(DaemonError::from)
}

/// Private keys belong in memory: a tmpfs never writes them to a disk, and its fsync is free
/// (StartContainer waits on it). `/run` is a tmpfs on every mainstream distribution.
fn warn_unless_tmpfs(root: &std::path::Path) {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(std::path::Path::new("/"));
    match rustix::fs::statfs(existing) {
        Ok(st) if [TMPFS_MAGIC, RAMFS_MAGIC].contains(&{ st.f_type }) => {}
        Ok(_) => warn!(artifact_root = %root.display(),
            "the artifact root is not on a tmpfs: private keys will be written to disk and every delivery waits for fsync"),
        Err(error) => {
            warn!(artifact_root = %root.display(), %error, "cannot tell which filesystem holds the artifact root")
        }
    }
}

/// Probes a dependency until `stop`: every `every_ok` while it answers, every 2 s while it
/// does not. `probe` gets the previous answer (to log changes) and returns whether it
/// answered, or `None` when there is nothing to probe.
fn watch<F, Fut>(stop: CancellationToken, every_ok: Duration, mut probe: F)
where
    F: FnMut(Option<bool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<bool>> + Send,
{
    tokio::spawn(async move {
        let mut last = None;
        while let Some(ok) = probe(last).await {
            last = Some(ok);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(if ok { every_ok } else { Duration::from_secs(2) }) => {}
            }
        }
    });
}
