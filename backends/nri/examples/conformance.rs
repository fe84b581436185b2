//! The plugin the conformance harness (tests/conformance) drives through the real Go runtime
//! library. Its behaviour is a contract with that harness:
//! - logs every call it receives as a JSON line (`--log`, else `$NRI_CONFORMANCE_LOG`, else
//!   `/tmp/nri-conformance.log`);
//! - CreateContainer adds a read-only bind mount at /run/conformance and NRI_CONFORMANCE=<name>;
//! - StartContainer refuses containers whose name starts with `fail-start`.
//!
//! Usage: conformance [--socket PATH] [--name NAME] [--idx NN] [--log FILE] [--create-delay-ms N]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nri_plugin::api::{
    Container, ContainerAdjustment, ContainerUpdate, KeyValue, Mount, PodSandbox,
};
use nri_plugin::{Context, CreateReply, Delivery, Options, Plugin, Runner, RuntimeInfo, Status};
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Conformance {
    log: Mutex<std::fs::File>,
    create_delay: Duration,
}

impl Conformance {
    fn record(&self, value: serde_json::Value) {
        let mut line = value.to_string();
        line.push('\n');
        let mut file = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = file.write_all(line.as_bytes());
    }

    fn event(&self, ctx: &Context, event: &str, pod: &PodSandbox, container: Option<&Container>) {
        let via = match ctx.delivery() {
            Delivery::Rpc => "rpc",
            Delivery::StateChange => "state_change",
        };
        self.record(json!({
            "event": event,
            "pod": pod.name,
            "container": container.map(|c| c.name.as_str()).unwrap_or(""),
            "pid": container.map(|c| c.pid).unwrap_or(pod.pid),
            "via": via,
        }));
    }
}

#[nri_plugin::plugin]
impl Plugin for Conformance {
    async fn configure(&self, _ctx: &Context, runtime: &RuntimeInfo) -> Result<(), Status> {
        self.record(json!({"event": "Configure", "runtime": runtime.name, "nri_version": runtime.nri_version}));
        Ok(())
    }

    async fn synchronize(
        &self,
        _ctx: &Context,
        pods: Vec<PodSandbox>,
        containers: Vec<Container>,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        self.record(
            json!({"event": "Synchronize", "pods": pods.len(), "containers": containers.len()}),
        );
        Ok(Vec::new())
    }

    async fn run_pod_sandbox(&self, ctx: &Context, pod: PodSandbox) -> Result<(), Status> {
        self.event(ctx, "RunPodSandbox", &pod, None);
        Ok(())
    }

    async fn stop_pod_sandbox(&self, ctx: &Context, pod: PodSandbox) -> Result<(), Status> {
        self.event(ctx, "StopPodSandbox", &pod, None);
        Ok(())
    }

    async fn remove_pod_sandbox(&self, ctx: &Context, pod: PodSandbox) -> Result<(), Status> {
        self.event(ctx, "RemovePodSandbox", &pod, None);
        Ok(())
    }

    async fn create_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<CreateReply, Status> {
        if !self.create_delay.is_zero() {
            tokio::time::sleep(self.create_delay).await;
        }
        self.event(ctx, "CreateContainer", &pod, Some(&c));
        let mount = Mount {
            destination: "/run/conformance".into(),
            r#type: "bind".into(),
            source: format!("/tmp/nri-conformance/{}", c.id),
            options: ["rbind", "ro", "nosuid", "nodev"]
                .map(String::from)
                .to_vec(),
        };
        let env = KeyValue {
            key: "NRI_CONFORMANCE".into(),
            value: c.name,
        };
        Ok(ContainerAdjustment {
            mounts: vec![mount],
            env: vec![env],
            ..Default::default()
        }
        .into())
    }

    async fn post_create_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.event(ctx, "PostCreateContainer", &pod, Some(&c));
        Ok(())
    }

    async fn start_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.event(ctx, "StartContainer", &pod, Some(&c));
        if c.name.starts_with("fail-start") {
            return Err(Status::failed_precondition(format!(
                "conformance: refusing to start {}",
                c.name
            )));
        }
        Ok(())
    }

    async fn post_start_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.event(ctx, "PostStartContainer", &pod, Some(&c));
        Ok(())
    }

    async fn stop_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        self.event(ctx, "StopContainer", &pod, Some(&c));
        Ok(Vec::new())
    }

    async fn remove_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.event(ctx, "RemoveContainer", &pod, Some(&c));
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = Options::new("conformance", "50");
    let mut log = std::env::var("NRI_CONFORMANCE_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| "/tmp/nri-conformance.log".into());
    let mut create_delay = Duration::ZERO;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => options = options.socket_path(value()?),
            "--name" => options.name = value()?,
            "--idx" => options.index = value()?,
            "--log" => log = value()?.into(),
            "--create-delay-ms" => create_delay = Duration::from_millis(value()?.parse()?),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    // A runtime that launched us passes only NRI_PLUGIN_* variables; they win.
    let options = options.from_env()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let plugin = Arc::new(Conformance {
        log: Mutex::new(file),
        create_delay,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
                signal.cancel();
            }
        });
        Runner::new(plugin, options)?.run(shutdown).await
    })?;
    Ok(())
}
