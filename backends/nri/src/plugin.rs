//! The plugin trait: what a Rust NRI plugin implements.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::v1alpha1 as pb;
use crate::api::{Container, ContainerAdjustment, ContainerEviction, ContainerUpdate, PodSandbox};
use crate::session::RuntimeClient;
use crate::{Error, EventSet, Status};

/// What the runtime said about itself in Configure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// `containerd` or `cri-o`.
    pub name: String,
    pub version: String,
    /// The runtime's NRI version; empty before NRI v0.12.
    pub nri_version: String,
    /// The plugin's configuration when the runtime launched it (`conf.d/NN-name.conf`);
    /// empty for plugins that connect by themselves.
    pub config: String,
    pub registration_timeout: Duration,
    /// How long the runtime waits for each call before it drops the plugin.
    pub request_timeout: Duration,
}

/// How an event reached the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A dedicated call (NRI v0.12), or an event that always had one (CreateContainer,
    /// UpdateContainer, StopContainer, UpdatePodSandbox).
    Rpc,
    /// `StateChange`, as runtimes before NRI v0.12 deliver most events.
    StateChange,
}

/// Per-call context handed to every handler.
#[derive(Debug, Clone)]
pub struct Context {
    pub(crate) deadline: Option<Instant>,
    pub(crate) delivery: Delivery,
    pub(crate) runtime: RuntimeClient,
}

impl Context {
    /// When the runtime stops waiting for this call, if it said. Past it the runtime drops
    /// the plugin and the event proceeds without it.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before [`Context::deadline`].
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The runtime's own service, for unsolicited updates.
    pub fn runtime(&self) -> &RuntimeClient {
        &self.runtime
    }
}

/// What CreateContainer answers: changes to the container and, best-effort, to others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateReply {
    pub adjust: ContainerAdjustment,
    pub update: Vec<ContainerUpdate>,
    pub evict: Vec<ContainerEviction>,
}

impl From<ContainerAdjustment> for CreateReply {
    fn from(adjust: ContainerAdjustment) -> Self {
        CreateReply {
            adjust,
            ..Default::default()
        }
    }
}

impl From<CreateReply> for pb::CreateContainerResponse {
    fn from(r: CreateReply) -> Self {
        pb::CreateContainerResponse {
            adjust: Some(r.adjust),
            update: r.update,
            evict: r.evict,
        }
    }
}

type Reply<T> = Result<T, Status>;

/// An NRI plugin.
///
/// Implement the handlers for the events you need and put `#[nri_plugin::plugin]` on the
/// `impl` block: it derives [`Plugin::events`] from the handlers you wrote, so the
/// subscription cannot drift from the code. Every handler has a default that does nothing.
///
/// Handlers run concurrently, each in its own task: a slow container never holds up the
/// events of another. Notification handlers (`post_*`, `remove_*`, …) may fail; runtimes
/// only log that. An error from `create_container` fails the container's creation; one from
/// `start_container` fails its start on containerd (CRI-O only logs it).
///
/// Never call [`RuntimeClient::update_containers`] and wait for it from inside a handler:
/// the runtime holds its NRI lock while it waits for the handler, so the call would block
/// until the runtime times the plugin out.
pub trait Plugin: Send + Sync + 'static {
    /// The events this plugin subscribes to. Written by `#[nri_plugin::plugin]`.
    fn events(&self) -> EventSet;

    /// The runtime introduced itself; called once per connection, before Synchronize.
    /// An error here makes the runtime drop the plugin.
    fn configure(
        &self,
        _ctx: &Context,
        _runtime: &RuntimeInfo,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    /// The runtime's complete current state, once per connection (after every reconnect).
    /// Split synchronizations are reassembled before this is called.
    fn synchronize(
        &self,
        _ctx: &Context,
        _pods: Vec<PodSandbox>,
        _containers: Vec<Container>,
    ) -> impl Future<Output = Reply<Vec<ContainerUpdate>>> + Send {
        async { Ok(Vec::new()) }
    }

    fn run_pod_sandbox(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn update_pod_sandbox(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn post_update_pod_sandbox(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn stop_pod_sandbox(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn remove_pod_sandbox(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    /// Before the container exists: the reply adjusts its OCI spec (mounts, env, hooks, …).
    fn create_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<CreateReply>> + Send {
        async { Ok(CreateReply::default()) }
    }

    /// containerd: before the task exists (no PID). CRI-O: after `runc create` (PID set).
    fn post_create_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    /// The container's init process exists (`container.pid`) but has not run the workload.
    fn start_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn post_start_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn update_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<Vec<ContainerUpdate>>> + Send {
        async { Ok(Vec::new()) }
    }

    fn post_update_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }

    fn stop_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<Vec<ContainerUpdate>>> + Send {
        async { Ok(Vec::new()) }
    }

    fn remove_container(
        &self,
        _ctx: &Context,
        _pod: PodSandbox,
        _container: Container,
    ) -> impl Future<Output = Reply<()>> + Send {
        async { Ok(()) }
    }
}

impl RuntimeClient {
    /// Asks the runtime to update or evict containers outside of any event. Returns the
    /// updates that failed. See the deadlock warning on [`Plugin`].
    pub async fn update_containers(
        &self,
        update: Vec<ContainerUpdate>,
        evict: Vec<ContainerEviction>,
    ) -> Result<Vec<ContainerUpdate>, Error> {
        let reply: pb::UpdateContainersResponse = self
            .call(
                "UpdateContainers",
                &pb::UpdateContainersRequest { update, evict },
                Duration::from_secs(10),
            )
            .await?;
        Ok(reply.failed)
    }
}
