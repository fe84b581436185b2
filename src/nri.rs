//! The NRI backend: turns runtime events into engine calls and engine errors into NRI
//! statuses. This is the one place where errors become wire codes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

use nri_identity_backends::{ContainerInfo, Injection, PodInfo};
use nri_plugin::api::v1alpha1::OptionalInt;
use nri_plugin::api::{
    Container, ContainerAdjustment, ContainerUpdate, Hook, Hooks, Mount, PodSandbox,
};
use nri_plugin::{Code, Context, CreateReply, Plugin, RuntimeInfo, Status};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::engine::{ContainerError, Engine, EngineError, Report, RuntimeError};
use crate::k8s::NamingError;
use crate::spire::{IdentitySource, SourceError};

/// The daemon as an NRI plugin.
pub struct IdentityPlugin<S> {
    engine: Engine<S>,
    /// Cancelled when a runtime the daemon must not serve connects.
    stop: Option<CancellationToken>,
    wrong_runtime: Mutex<Option<RuntimeError>>,
}

impl<S> IdentityPlugin<S> {
    pub fn new(engine: Engine<S>) -> Self {
        IdentityPlugin {
            engine,
            stop: None,
            wrong_runtime: Mutex::new(None),
        }
    }

    /// Cancels `stop` when the runtime that connects cannot be served, instead of
    /// reconnecting to it forever.
    pub fn stop_on_wrong_runtime(mut self, stop: CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Why the daemon refused the runtime that connected, if it did.
    pub fn wrong_runtime(&self) -> Option<RuntimeError> {
        self.wrong_runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn pod_info(pod: &PodSandbox) -> PodInfo {
    PodInfo {
        id: pod.id.clone(),
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        labels: pod.labels.clone(),
        annotations: pod.annotations.clone(),
        runtime_handler: pod.runtime_handler.clone(),
    }
}

pub fn container_info(c: &Container) -> ContainerInfo {
    ContainerInfo {
        id: c.id.clone(),
        name: c.name.clone(),
        pid: (c.pid > 0).then_some(c.pid as i32),
        user: c.user.as_ref().map(|u| (u.uid, u.gid)),
        labels: c.labels.clone(),
        annotations: c.annotations.clone(),
        cgroups_path: c
            .linux
            .as_ref()
            .map(|l| l.cgroups_path.clone())
            .unwrap_or_default(),
        image: c.image.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
        mounts: c
            .mounts
            .iter()
            .map(|m| (PathBuf::from(&m.destination), PathBuf::from(&m.source)))
            .collect(),
        running: c.state == nri_plugin::api::v1alpha1::ContainerState::ContainerRunning as i32,
    }
}

/// What CreateContainer adds, as NRI carries it.
pub fn adjustment(injection: Injection) -> ContainerAdjustment {
    let mounts = injection
        .mounts
        .into_iter()
        .map(|m| Mount {
            destination: m.destination.to_string_lossy().into_owned(),
            r#type: m.kind.to_owned(),
            source: m.source.to_string_lossy().into_owned(),
            options: m.options.iter().map(|o| (*o).to_owned()).collect(),
        })
        .collect();
    let start_container: Vec<Hook> = injection
        .start_container_hooks
        .into_iter()
        .map(|h| Hook {
            path: h.path.to_string_lossy().into_owned(),
            args: h.args,
            env: h.env,
            timeout: Some(OptionalInt {
                value: i64::from(h.timeout_s),
            }),
        })
        .collect();
    let hooks = (!start_container.is_empty()).then(|| Hooks {
        start_container,
        ..Default::default()
    });
    ContainerAdjustment {
        mounts,
        hooks,
        ..Default::default()
    }
}

/// The single mapping from errors to the status the runtime sees. containerd fails
/// CreateContainer and StartContainer on any status; the code tells operators what kind of
/// problem it is. Messages are complete (every error prints its cause), so the status carries
/// the message as is.
pub fn status(e: &ContainerError) -> Status {
    Status::new(code(&e.error), format!("nri-identity-injector: {e}"))
}

/// A runtime the daemon will not serve (NRI Configure).
pub fn runtime_status(e: &RuntimeError) -> Status {
    Status::new(
        Code::FailedPrecondition,
        format!("nri-identity-injector: {e}"),
    )
}

fn code(e: &EngineError) -> Code {
    match e {
        EngineError::InvalidAnnotation(_) | EngineError::NoSuchHint { .. } => Code::InvalidArgument,
        EngineError::UnexpectedSpiffeId { .. } => Code::PermissionDenied,
        EngineError::Agent { error, .. } => agent_code(error),
        EngineError::NoIdentity { .. }
        | EngineError::NoBundle { .. }
        | EngineError::NoJwtBundle { .. }
        | EngineError::NoJwt { .. } => Code::Unavailable,
        EngineError::MissingMount
        | EngineError::Backend(_)
        | EngineError::ProcessGone { .. }
        | EngineError::ProcessMoved { .. }
        | EngineError::MissingTrustDomain { .. }
        | EngineError::NoKubelet
        | EngineError::Label(_)
        | EngineError::Naming(NamingError::Selectors(_) | NamingError::EphemeralContainer) => {
            Code::FailedPrecondition
        }
        EngineError::Naming(NamingError::Kubelet(_)) => Code::Unavailable,
        EngineError::Host(_) | EngineError::Artifacts(_) | EngineError::GuardNotInstalled => {
            Code::Internal
        }
        EngineError::Limit(_) => Code::ResourceExhausted,
    }
}

/// The agent's own answer reaches the runtime unchanged (gRPC and NRI share the codes): a
/// `PermissionDenied` says the daemon is no authorized delegate, an `InvalidArgument` that the
/// agent refused the selectors. Failures to reach the agent are `Unavailable`.
fn agent_code(e: &SourceError) -> Code {
    match e {
        // An error never carries Ok; should one arrive, it must not read as success.
        SourceError::Status { code, .. } => match Code::from_i32(i32::from(*code)) {
            Code::Ok => Code::Unknown,
            code => code,
        },
        SourceError::Connect { .. }
        | SourceError::Disconnected(_)
        | SourceError::StreamEnded
        | SourceError::Decode(_) => Code::Unavailable,
        SourceError::Refused { .. } => Code::PermissionDenied,
        SourceError::InvalidWorkload(_) => Code::FailedPrecondition,
    }
}

#[nri_plugin::plugin]
impl<S: IdentitySource> Plugin for IdentityPlugin<S> {
    async fn configure(&self, _ctx: &Context, runtime: &RuntimeInfo) -> Result<(), Status> {
        match self.engine.runtime_connected(&runtime.name) {
            Ok(kind) => {
                info!(runtime = %runtime.name, backend = %kind, version = %runtime.version, nri_version = %runtime.nri_version,
                    request_timeout_ms = runtime.request_timeout.as_millis() as u64, "connected to the runtime");
                Ok(())
            }
            Err(e) => {
                error!(error = %e, "refusing the runtime");
                let status = runtime_status(&e);
                *self.wrong_runtime.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                if let Some(stop) = &self.stop {
                    stop.cancel();
                }
                Err(status)
            }
        }
    }

    async fn synchronize(
        &self,
        _ctx: &Context,
        pods: Vec<PodSandbox>,
        containers: Vec<Container>,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        let index: BTreeMap<&str, usize> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();
        let pod_infos: Vec<PodInfo> = pods.iter().map(pod_info).collect();
        let containers_with_pod: Vec<(ContainerInfo, Option<usize>)> = containers
            .iter()
            .map(|c| {
                (
                    container_info(c),
                    index.get(c.pod_sandbox_id.as_str()).copied(),
                )
            })
            .collect();
        self.engine.synchronize(&pod_infos, &containers_with_pod);
        debug!(
            pods = pods.len(),
            containers = containers.len(),
            "synchronized"
        );
        Ok(Vec::new())
    }

    async fn create_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<CreateReply, Status> {
        let (pod, c) = (pod_info(&pod), container_info(&c));
        match self.engine.create_container(&pod, &c, ctx.deadline()).await {
            Ok(None) => Ok(CreateReply::default()),
            Ok(Some(injection)) => Ok(adjustment(injection).into()),
            Err(e) => {
                warn!(error = %Report(&e), "refusing the container");
                Err(status(&e))
            }
        }
    }

    async fn start_container(
        &self,
        ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        let (pod, c) = (pod_info(&pod), container_info(&c));
        self.engine
            .start_container(&pod, &c, ctx.deadline())
            .await
            .map_err(|e| {
                warn!(error = %Report(&e), "failing the start");
                status(&e)
            })
    }

    async fn stop_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        c: Container,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        self.engine.stop_container(&container_info(&c));
        Ok(Vec::new())
    }

    async fn remove_container(
        &self,
        _ctx: &Context,
        pod: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.engine
            .remove_container(&pod_info(&pod), &container_info(&c));
        Ok(())
    }

    async fn remove_pod_sandbox(&self, _ctx: &Context, pod: PodSandbox) -> Result<(), Status> {
        self.engine.remove_pod(&pod_info(&pod));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
