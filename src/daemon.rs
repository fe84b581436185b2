//! The daemon: wires configuration, the engine, the NRI connection, health endpoints and
//! signal handling together.

use std::sync::Arc;
use std::time::Duration;

use nri_plugin::{ConnectionState, Options, Runner};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Config, IdentityApi};
use crate::engine::{AgentStatus, Engine, EngineConfig, Report, RuntimeError};
use crate::host::RealHost;
use crate::metrics::Metrics;
use crate::nri::IdentityPlugin;
use crate::selinux::{LabelPolicy, SELINUXFS, SHARED_CONTAINER_FILE_LABEL, selinux_enabled};
use crate::spire::{ApiConfig, BrokerApi, DelegatedIdentityApi, IdentitySource};

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
    let selinuxfs = std::path::Path::new(SELINUXFS);
    engine_cfg.selinux_label = config.selinux_label.resolve(selinuxfs);
    engine_cfg.runtime_state_dir = config.runtime_state_dir.clone();
    log_label_choice(
        &config,
        engine_cfg.selinux_label,
        selinux_enabled(selinuxfs),
    );
    engine_cfg.kubelet = config
        .kubelet_endpoint()
        .map(|e| Arc::new(crate::k8s::KubeletPods::new(e).with_metrics(metrics.clone())));
    match config.identity_api {
        IdentityApi::Delegated => {
            let source = DelegatedIdentityApi::new(ApiConfig::default());
            serve(config, engine_cfg, source, metrics, shutdown).await
        }
        IdentityApi::Broker => {
            info!(broker_socket = %config.broker_socket.display(),
                workload_api_socket = %config.workload_api_socket.display(),
                "identities from the SPIFFE Broker API");
            let source = BrokerApi::new(config.broker_config());
            serve(config, engine_cfg, source, metrics, shutdown).await
        }
    }
}

/// Runs the daemon with the chosen identity source.
async fn serve<S: IdentitySource>(
    config: Config,
    engine_cfg: EngineConfig,
    source: S,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let engine = Engine::new(
        engine_cfg,
        source,
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
    // ...and whether the agent serves the daemon: a real call, so that an agent that refuses
    // the daemon (not an authorized delegate, no entry of its own) keeps it unready and the
    // log says which mistake it is and how to fix it. A container that the agent refused
    // asks for a probe at once, so that readiness follows within moments.
    let e = engine.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let (status, error) = e.probe_agent().await;
            if last != Some(status) {
                match (status, &error) {
                    (AgentStatus::Ready, _) => info!("the SPIRE agent serves the daemon"),
                    (AgentStatus::Refused(refusal), Some(error)) => {
                        warn!(
                            reason = refusal.kind(),
                            "not ready: the SPIRE agent {error}"
                        )
                    }
                    (_, Some(error)) => {
                        warn!(error = %Report(error), "not ready: the SPIRE agent does not answer")
                    }
                    _ => {}
                }
            }
            last = Some(status);
            let every = if status == AgentStatus::Ready {
                Duration::from_secs(10)
            } else {
                Duration::from_secs(2)
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = e.probe_wanted() => {}
            }
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

/// Says once, at startup, which label the files get and why.
fn log_label_choice(config: &Config, policy: LabelPolicy, selinux: bool) {
    let configured = format!("{:?}", config.selinux_label).to_lowercase();
    let label = match policy {
        LabelPolicy::Off => "none".to_owned(),
        LabelPolicy::Shared => SHARED_CONTAINER_FILE_LABEL.to_owned(),
        LabelPolicy::Private => {
            let dir = config
                .runtime_state_dir
                .as_ref()
                .map_or("the runtime's default state directory".to_owned(), |d| {
                    d.display().to_string()
                });
            format!(
                "container_file_t at each pod's MCS level, from its sandbox's OCI configuration under {dir}"
            )
        }
    };
    info!(selinux_label = %configured, policy = %policy, host_selinux = selinux, %label, "identity file label");
    if policy != LabelPolicy::Off && !selinux {
        info!("SELinux is not enabled on this host: the labels are set but nothing enforces them");
    }
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
