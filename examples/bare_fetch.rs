//! The reference for the StartContainer benchmark (tests/e2e/bench.sh): an NRI plugin that,
//! at StartContainer, asks the SPIRE agent for the container's PID through the Delegated
//! Identity API and waits for the first SVID — no files, no checks, no pidfd. The daemon's
//! time is compared with this one's for the same kind of container on the same bed.
//!
//! Usage: bare_fetch --socket NRI_SOCKET --agent ADMIN_SOCKET [--pod-prefix PREFIX] [--hold]
//!        [--connection-per-call]
//! With `--pod-prefix`, only containers of pods whose name starts with PREFIX are served, so
//! that the daemon and this client can take turns in one pass. With `--hold`, each container's
//! subscription stays open until the container stops, as the daemon's does (it keeps the
//! files rotated), instead of being dropped after the first SVID: the agent then serves as
//! many live subscriptions for this client as for the daemon. With `--connection-per-call`,
//! each subscription gets a connection of its own instead of sharing one, as the daemon's do.
//! Logs one line per container: `bare-fetch container=<id> elapsed_ms=<ms>
//! stream_open_ms=<ms> first_svid_ms=<ms> svids=<n>`, the two phases named as the daemon's
//! (the subscription accepted, then its first update carrying an SVID).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nri_identity_injector::spire::{
    ApiConfig, DelegatedIdentityApi, IdentitySource, SvidStream, Workload,
};
use nri_plugin::api::{Container, ContainerUpdate, PodSandbox};
use nri_plugin::{Context, Options, Plugin, Runner, Status};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

struct BareFetch {
    agent: PathBuf,
    api: DelegatedIdentityApi,
    pod_prefix: String,
    connection_per_call: bool,
    /// With `--hold`: the open subscription of each started container, by container ID.
    held: Option<Mutex<HashMap<String, SvidStream>>>,
}

#[nri_plugin::plugin]
impl Plugin for BareFetch {
    async fn start_container(
        &self,
        _: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        if !pod.name.starts_with(&self.pod_prefix) {
            return Ok(());
        }
        let t = Instant::now();
        let own;
        let api = if self.connection_per_call {
            own = DelegatedIdentityApi::new(ApiConfig::default());
            &own
        } else {
            &self.api
        };
        let mut stream = api
            .subscribe_svids(&self.agent, &Workload::Pid(c.pid as i32))
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let opened = t.elapsed();
        let svids = loop {
            match stream.next().await {
                Some(Ok(u)) if !u.svids.is_empty() => break u.svids.len(),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Status::unavailable(e.to_string())),
                None => return Err(Status::unavailable("stream ended")),
            }
        };
        let took = t.elapsed();
        eprintln!(
            "bare-fetch container={} elapsed_ms={:.3} stream_open_ms={:.3} first_svid_ms={:.3} svids={svids}",
            c.id,
            took.as_secs_f64() * 1e3,
            opened.as_secs_f64() * 1e3,
            (took - opened).as_secs_f64() * 1e3
        );
        if let Some(held) = &self.held {
            held.lock().unwrap().insert(c.id, stream);
        }
        Ok(())
    }

    async fn stop_container(
        &self,
        _: &Context,
        _pod: PodSandbox,
        c: Container,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        if let Some(held) = &self.held {
            held.lock().unwrap().remove(&c.id);
        }
        Ok(Vec::new())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut socket = PathBuf::from(nri_plugin::DEFAULT_SOCKET_PATH);
    let mut agent = PathBuf::from("/run/spire/admin/admin.sock");
    let mut pod_prefix = String::new();
    let mut held = None;
    let mut connection_per_call = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or("missing value");
        match flag.as_str() {
            "--hold" => held = Some(Mutex::default()),
            "--connection-per-call" => connection_per_call = true,
            "--socket" => socket = value()?.into(),
            "--agent" => agent = value()?.into(),
            "--pod-prefix" => pod_prefix = value()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let plugin = Arc::new(BareFetch {
            agent,
            api: DelegatedIdentityApi::new(ApiConfig::default()),
            pod_prefix,
            connection_per_call,
            held,
        });
        let runner = Runner::new(plugin, Options::new("bare-fetch", "10").socket_path(socket))?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                stop.cancel();
            }
        });
        runner.run(shutdown).await
    })?;
    Ok(())
}
