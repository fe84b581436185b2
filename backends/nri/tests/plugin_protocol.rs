//! The plugin side of NRI against a fake runtime over a real unix socket: registration,
//! the handshake traps, dispatch, framing limits, concurrency, reconnects and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nri_plugin::api::v1alpha1 as pb;
use nri_plugin::api::{Container, ContainerAdjustment, ContainerUpdate, KeyValue, PodSandbox};
use nri_plugin::testing::*;
use nri_plugin::{
    Backoff, Code, ConnectionState, Context, CreateReply, Delivery, Options, Plugin, Runner,
    RuntimeInfo, Status,
};
use tokio::sync::{Barrier, Mutex, watch};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, String, Delivery)>>,
    syncs: Mutex<Vec<(usize, usize)>>,
    env_bytes: usize,
    barrier: Option<Arc<Barrier>>,
    creates_in_flight: AtomicUsize,
    max_creates_in_flight: AtomicUsize,
}

impl Recorder {
    async fn note(&self, what: &str, name: &str, ctx: &Context) {
        self.events
            .lock()
            .await
            .push((what.to_owned(), name.to_owned(), ctx.delivery()));
    }
}

#[nri_plugin::plugin]
impl Plugin for Recorder {
    async fn synchronize(
        &self,
        _: &Context,
        pods: Vec<PodSandbox>,
        containers: Vec<Container>,
    ) -> Result<Vec<ContainerUpdate>, Status> {
        self.syncs.lock().await.push((pods.len(), containers.len()));
        Ok(vec![])
    }

    async fn run_pod_sandbox(&self, ctx: &Context, pod: PodSandbox) -> Result<(), Status> {
        self.note("RunPodSandbox", &pod.name, ctx).await;
        Ok(())
    }

    async fn create_container(
        &self,
        ctx: &Context,
        _: PodSandbox,
        c: Container,
    ) -> Result<CreateReply, Status> {
        let now = self.creates_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_creates_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(b) = &self.barrier {
            b.wait().await;
        }
        self.note("CreateContainer", &c.name, ctx).await;
        self.creates_in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut env = vec![KeyValue {
            key: "NAME".into(),
            value: c.name.clone(),
        }];
        if self.env_bytes > 0 {
            env.push(KeyValue {
                key: "BIG".into(),
                value: "x".repeat(self.env_bytes),
            });
        }
        Ok(ContainerAdjustment {
            env,
            ..Default::default()
        }
        .into())
    }

    async fn start_container(
        &self,
        ctx: &Context,
        _: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.note("StartContainer", &c.name, ctx).await;
        if c.name == "refuse" {
            return Err(Status::failed_precondition("no identity for refuse"));
        }
        Ok(())
    }

    async fn remove_container(
        &self,
        ctx: &Context,
        _: PodSandbox,
        c: Container,
    ) -> Result<(), Status> {
        self.note("RemoveContainer", &c.name, ctx).await;
        Ok(())
    }
}

struct Started {
    runtime: FakeRuntime,
    conn: PluginConn,
    plugin: Arc<Recorder>,
    state: watch::Receiver<ConnectionState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), nri_plugin::Error>>,
}

fn options(path: &std::path::Path) -> Options {
    let mut o = Options::new("recorder", "42").socket_path(path);
    o.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    o
}

async fn start_with(plugin: Recorder, settings: RuntimeSettings) -> Started {
    let path = temp_socket("p");
    let runtime = FakeRuntime::bind(&path);
    let plugin = Arc::new(plugin);
    let runner = Runner::new(plugin.clone(), options(&path)).unwrap();
    let state = runner.state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    let conn = runtime.accept(settings).await;
    Started {
        runtime,
        conn,
        plugin,
        state,
        shutdown,
        task,
    }
}

async fn wait_ready(state: &mut watch::Receiver<ConnectionState>) {
    tokio::time::timeout(Duration::from_secs(10), state.wait_for(|s| s.is_ready()))
        .await
        .expect("ready within 10 s")
        .unwrap();
}

fn create(name: &str) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        pod: Some(pod("p")),
        container: Some(container(name)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_its_name_index_and_nri_version_then_becomes_ready() {
    let mut s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    let reg = s.conn.registration();
    assert_eq!(
        (reg.plugin_name.as_str(), reg.plugin_idx.as_str()),
        ("recorder", "42")
    );
    assert!(reg.nri_version.starts_with("v0.12"), "{}", reg.nri_version);
    assert!(
        !s.state.borrow().is_ready(),
        "not ready before synchronization"
    );
    s.conn.handshake().await;
    wait_ready(&mut s.state).await;
    match &*s.state.borrow() {
        ConnectionState::Ready(info) => assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("containerd", "2.3.4")
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_configure_that_arrives_before_the_register_reply() {
    let settings = RuntimeSettings {
        configure_before_register_reply: true,
        ..Default::default()
    };
    let mut s = start_with(Recorder::default(), settings).await;
    // The RegisterPlugin reply is held back until this Configure is answered.
    let resp = s.conn.configure().await;
    assert_ne!(resp.events, 0);
    s.conn.synchronize(vec![], vec![], 1).await;
    wait_ready(&mut s.state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_is_derived_from_the_implemented_handlers() {
    let s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    let resp = s.conn.configure().await;
    // RunPodSandbox 0x1, CreateContainer 0x8, StartContainer 0x20, RemoveContainer 0x400.
    assert_eq!(resp.events, 0x1 | 0x8 | 0x20 | 0x400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_synchronize_is_echoed_and_reassembled() {
    let mut s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.configure().await;
    let pods: Vec<_> = (0..10).map(|i| pod(&format!("p{i}"))).collect();
    let containers: Vec<_> = (0..7).map(|i| container(&format!("c{i}"))).collect();
    let replies = s.conn.synchronize(pods, containers, 3).await;
    assert_eq!(replies.len(), 4);
    for r in &replies[..3] {
        assert!(
            r.more && r.update.is_empty(),
            "chunks before the last echo more with no updates"
        );
    }
    assert!(!replies[3].more);
    assert_eq!(
        *s.plugin.syncs.lock().await,
        vec![(10, 7)],
        "the plugin sees the whole state once"
    );
    wait_ready(&mut s.state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhandled_calls_answer_unimplemented_never_not_found() {
    let s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.handshake().await;
    let cases = [
        (PLUGIN_SERVICE, "PostStartContainer"), // a v0.12 event this plugin does not handle
        (PLUGIN_SERVICE, "ValidateContainerAdjustment"),
        (PLUGIN_SERVICE, "NoSuchMethod"),
        ("nri.pkg.api.v1alpha1.HostFunctions", "Log"),
    ];
    for (service, method) in cases {
        let err = s.conn.call_raw(service, method, vec![]).await.unwrap_err();
        assert_eq!(err.code, Code::Unimplemented, "{service}/{method}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_as_dedicated_calls_and_as_state_change() {
    let s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.handshake().await;
    let _: pb::StartContainerResponse = s
        .conn
        .call(
            "StartContainer",
            &pb::StartContainerRequest {
                pod: Some(pod("p")),
                container: Some(container("a")),
            },
        )
        .await
        .unwrap();
    let change = pb::StateChangeEvent {
        event: 6,
        pod: Some(pod("p")),
        container: Some(container("b")),
    };
    let _: pb::Empty = s.conn.call("StateChange", &change).await.unwrap();
    let unsubscribed = pb::StateChangeEvent {
        event: 7,
        pod: Some(pod("p")),
        container: Some(container("c")),
    };
    let _: pb::Empty = s.conn.call("StateChange", &unsubscribed).await.unwrap();
    let run = pb::StateChangeEvent {
        event: 1,
        pod: Some(pod("q")),
        container: None,
    };
    let _: pb::Empty = s.conn.call("StateChange", &run).await.unwrap();
    let events = s.plugin.events.lock().await.clone();
    assert_eq!(
        events,
        vec![
            ("StartContainer".into(), "a".into(), Delivery::Rpc),
            ("StartContainer".into(), "b".into(), Delivery::StateChange),
            ("RunPodSandbox".into(), "q".into(), Delivery::StateChange),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_container_returns_the_adjustment_and_start_can_fail() {
    let s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.handshake().await;
    let resp: pb::CreateContainerResponse = s
        .conn
        .call("CreateContainer", &create("web"))
        .await
        .unwrap();
    let env = resp.adjust.unwrap().env;
    assert_eq!(
        env,
        vec![KeyValue {
            key: "NAME".into(),
            value: "web".into()
        }]
    );
    let req = pb::StartContainerRequest {
        pod: Some(pod("p")),
        container: Some(container("refuse")),
    };
    let err = s
        .conn
        .call::<_, pb::Empty>("StartContainer", &req)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert_eq!(err.message, "no identity for refuse");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_replies_go_out_in_frames_of_at_most_4096_bytes() {
    let plugin = Recorder {
        env_bytes: 300_000,
        ..Default::default()
    };
    let s = start_with(plugin, RuntimeSettings::default()).await;
    s.conn.handshake().await;
    let resp: pb::CreateContainerResponse = s
        .conn
        .call("CreateContainer", &create("big"))
        .await
        .unwrap();
    assert_eq!(resp.adjust.unwrap().env[1].value.len(), 300_000);
    assert!(
        s.conn.max_frame() <= 4096,
        "largest frame {} bytes",
        s.conn.max_frame()
    );
    assert!(s.conn.max_frame() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_run_concurrently() {
    // Each CreateContainer waits until all 8 are inside the handler: this only completes if
    // the plugin runs them at the same time.
    let plugin = Recorder {
        barrier: Some(Arc::new(Barrier::new(8))),
        ..Default::default()
    };
    let s = start_with(plugin, RuntimeSettings::default()).await;
    s.conn.handshake().await;
    let conn = Arc::new(s.conn);
    let mut calls = Vec::new();
    for i in 0..8 {
        let conn = conn.clone();
        calls.push(tokio::spawn(async move {
            conn.call::<_, pb::CreateContainerResponse>(
                "CreateContainer",
                &create(&format!("c{i}")),
            )
            .await
        }));
    }
    for c in calls {
        c.await.unwrap().expect("every create completes");
    }
    assert_eq!(s.plugin.max_creates_in_flight.load(Ordering::SeqCst), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_runtimes_get_a_mask_they_accept() {
    struct Wide;
    #[nri_plugin::plugin]
    impl Plugin for Wide {
        async fn create_container(
            &self,
            _: &Context,
            _: PodSandbox,
            _: Container,
        ) -> Result<CreateReply, Status> {
            Ok(CreateReply::default())
        }
        async fn update_pod_sandbox(&self, _: &Context, _: PodSandbox) -> Result<(), Status> {
            Ok(())
        }
    }
    for (nri, version, want) in [("", "2.0.5", 0x8), ("v0.12.0", "2.3.4", 0x808)] {
        let path = temp_socket("w");
        let runtime = FakeRuntime::bind(&path);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Runner::new(Arc::new(Wide), options(&path))
                .unwrap()
                .run(shutdown.clone()),
        );
        let settings = RuntimeSettings {
            nri_version: nri.into(),
            version: version.into(),
            ..Default::default()
        };
        let conn = runtime.accept(settings).await;
        assert_eq!(
            conn.configure().await.events,
            want,
            "runtime {version} NRI {nri:?}"
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_runtime_restarts_and_synchronizes_again() {
    let mut s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.handshake().await;
    wait_ready(&mut s.state).await;
    // The runtime goes away: connection closed, socket removed.
    let path = s.runtime.path.clone();
    s.conn.close().await;
    drop(s.runtime);
    tokio::time::timeout(
        Duration::from_secs(5),
        s.state.wait_for(|st| !st.is_ready()),
    )
    .await
    .unwrap()
    .unwrap();
    // The restarted runtime listens on the same path again.
    let runtime = FakeRuntime::bind(&path);
    let conn = runtime.accept(RuntimeSettings::default()).await;
    conn.configure().await;
    conn.synchronize(vec![pod("p")], vec![container("c")], 10)
        .await;
    wait_ready(&mut s.state).await;
    assert_eq!(*s.plugin.syncs.lock().await, vec![(0, 0), (1, 1)]);
    let resp: pb::CreateContainerResponse = conn
        .call("CreateContainer", &create("after"))
        .await
        .unwrap();
    assert!(resp.adjust.is_some());
    s.shutdown.cancel();
    s.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_a_socket_that_does_not_exist_yet() {
    let path = temp_socket("late");
    let plugin = Arc::new(Recorder::default());
    let runner = Runner::new(plugin, options(&path)).unwrap();
    let mut state = runner.state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        *state.borrow(),
        ConnectionState::Disconnected { .. } | ConnectionState::Connecting { .. }
    ));
    let runtime = FakeRuntime::bind(&path);
    let conn = runtime.accept(RuntimeSettings::default()).await;
    conn.handshake().await;
    wait_ready(&mut state).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(*state.borrow(), ConnectionState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_from_the_runtime_drops_the_connection_not_the_process() {
    use tokio::io::AsyncWriteExt;
    let path = temp_socket("big");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let plugin = Arc::new(Recorder::default());
    let runner = Runner::new(plugin, options(&path)).unwrap();
    let mut state = runner.state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner.run(shutdown.clone()));
    let (mut stream, _) = listener.accept().await.unwrap();
    let mut frame = 1u32.to_be_bytes().to_vec();
    frame.extend_from_slice(&(64u32 << 20).to_be_bytes());
    stream.write_all(&frame).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        state.wait_for(
            |s| matches!(s, ConnectionState::Disconnected { reason } if reason.contains("exceeds")),
        ),
    )
    .await
    .expect("the plugin drops the connection")
    .unwrap();
    // And it comes back.
    let (_again, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_runner_promptly() {
    let s = start_with(Recorder::default(), RuntimeSettings::default()).await;
    s.conn.handshake().await;
    s.shutdown.cancel();
    let r = tokio::time::timeout(Duration::from_secs(2), s.task)
        .await
        .expect("stops within 2 s");
    r.unwrap().unwrap();
    assert_eq!(*s.state.borrow(), ConnectionState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_shuts_the_runner_down_is_still_answered() {
    struct Refuser(CancellationToken);
    #[nri_plugin::plugin]
    impl Plugin for Refuser {
        async fn configure(&self, _: &Context, _: &RuntimeInfo) -> Result<(), Status> {
            self.0.cancel();
            // The runner sees the shutdown well before this answer is ready.
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(Status::failed_precondition("not this runtime"))
        }
        async fn create_container(
            &self,
            _: &Context,
            _: PodSandbox,
            _: Container,
        ) -> Result<CreateReply, Status> {
            Ok(CreateReply::default())
        }
    }
    let path = temp_socket("r");
    let runtime = FakeRuntime::bind(&path);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(
        Runner::new(Arc::new(Refuser(shutdown.clone())), options(&path))
            .unwrap()
            .run(shutdown.clone()),
    );
    let conn = runtime.accept(RuntimeSettings::default()).await;
    let request = pb::ConfigureRequest {
        runtime_name: "other".into(),
        ..Default::default()
    };
    let err = conn
        .call::<_, pb::ConfigureResponse>("Configure", &request)
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.message, "not this runtime");
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("stops after answering")
        .unwrap()
        .unwrap();
}
