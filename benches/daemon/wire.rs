//! Benchmarks 1 and 2: CreateContainer and StartContainer through the real NRI wire path
//! (fake runtime → unix socket → nri_plugin::Runner → IdentityPlugin → Engine), timed from
//! the fake runtime's side.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nri_identity_injector::host::Owner;
use nri_identity_injector::spire::fake::WorkloadKey;
use nri_identity_injector::spire::{
    ApiConfig, DelegatedIdentityApi, IdentitySource, SvidUpdate, Workload,
};
use nri_plugin::api::v1alpha1 as pb;
use tokio::runtime::Handle;
use tokio_stream::StreamExt;

use crate::bed::{
    Bed, Summary, annotated_pod, container, identity_annotation, plain_pod, summarize, us,
};

pub struct CreateFigures {
    pub annotated: Summary,
    pub plain: Summary,
}

/// `n` CreateContainer calls for annotated containers (distinct pods and container ids),
/// interleaved with as many for containers without the annotation (the wire and plugin
/// baseline), one at a time as a runtime sends them for one pod.
pub async fn create(daemon: &Handle, root_base: &Path, n: usize) -> CreateFigures {
    let bed = Bed::new(daemon, root_base).await;
    let annotation = identity_annotation(bed.agent.path());
    let warmup = 200;
    let request = |i: usize, annotated: bool| {
        let pod = if annotated {
            annotated_pod(&format!("pod-{i:05}"), &annotation)
        } else {
            plain_pod(&format!("plain-{i:05}"))
        };
        let c = container(&pod, &format!("ctr-{}{i:05}", u8::from(annotated)), 0);
        pb::CreateContainerRequest {
            pod: Some(pod),
            container: Some(c),
        }
    };
    let requests: Vec<_> = (0..warmup + n)
        .map(|i| (request(i, true), request(i, false)))
        .collect();
    let (mut annotated, mut plain) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, (with, without)) in requests.iter().enumerate() {
        let t = Instant::now();
        let reply: pb::CreateContainerResponse =
            bed.conn.call("CreateContainer", with).await.unwrap();
        let took = us(t.elapsed());
        assert_eq!(reply.adjust.unwrap_or_default().mounts.len(), 1);
        let t = Instant::now();
        let reply: pb::CreateContainerResponse =
            bed.conn.call("CreateContainer", without).await.unwrap();
        let took_plain = us(t.elapsed());
        assert!(reply.adjust.unwrap_or_default().mounts.is_empty());
        if i >= warmup {
            annotated.push(took);
            plain.push(took_plain);
        }
    }
    let dirs = std::fs::read_dir(&bed.root).unwrap().count();
    assert_eq!(
        dirs,
        warmup + n,
        "one pod directory per annotated container"
    );
    bed.finish().await;
    CreateFigures {
        annotated: summarize(&annotated),
        plain: summarize(&plain),
    }
}

pub struct StartFigures {
    /// The bare client: `subscribe_svids` + first `next()`.
    pub agent: Summary,
    /// StartContainer round trip through the daemon.
    pub start: Summary,
    /// Per container: start − agent.
    pub overhead: Summary,
    /// The daemon's own account of each measured start, phase by phase.
    pub phases: Vec<(&'static str, Summary)>,
    /// Unannotated CreateContainer calls with nothing else going on...
    pub create_idle: Summary,
    /// ...and while `burst` StartContainer calls for other containers are in flight.
    pub create_during_burst: Summary,
    pub burst: usize,
    pub burst_took: std::time::Duration,
}

/// For `m` containers (after a warm-up), alternately: the agent's own answer time for the
/// container's PID, measured by a bare client on the daemon's runtime, then StartContainer
/// for that container through the daemon.
pub async fn start(daemon: &Handle, root_base: &Path, m: usize) -> StartFigures {
    let bed = Bed::new(daemon, root_base).await;
    let warmup = 20;
    let total = warmup + m;
    let mut containers = Vec::with_capacity(total);
    for i in 0..total {
        let pid = 20_000 + i as u32;
        let id = format!("ctr-{i:04}");
        let pod = bed.annotated_pod(&format!("pod-{i:04}"));
        let c = container(&pod, &id, pid);
        bed.host.procs.add_process(
            pid,
            format!("12:pids:/kubepods/besteffort/pod{}/{id}\n", pod.uid),
        );
        bed.host
            .procs
            .set_process_owner(pid, Owner::from((1001, 1001)));
        bed.agent.set_svids(
            WorkloadKey::Pid(pid as i32),
            SvidUpdate {
                svids: vec![
                    bed.ca
                        .mint(&format!("/w{i}"), Duration::from_secs(3600))
                        .unwrap(),
                ],
                federates_with: vec![],
            },
        );
        bed.create(&pod, &c).await.unwrap();
        containers.push((pod, c, pid));
    }

    let bare = Arc::new(DelegatedIdentityApi::new(ApiConfig::default()));
    let mut first_measured = crate::phases::mark();
    let (mut agent, mut started, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (pod, c, pid)) in containers.iter().enumerate() {
        let (api, path, pid) = (bare.clone(), bed.agent.path().to_owned(), *pid as i32);
        let answer = daemon
            .spawn(async move {
                let t = Instant::now();
                let mut stream = api
                    .subscribe_svids(&path, &Workload::Pid(pid))
                    .await
                    .unwrap();
                let first = stream.next().await.unwrap().unwrap();
                let took = t.elapsed();
                assert_eq!(first.svids.len(), 1);
                us(took)
            })
            .await
            .unwrap();
        let t = Instant::now();
        bed.start(pod, c).await.unwrap();
        let took = us(t.elapsed());
        if i + 1 == warmup {
            first_measured = crate::phases::mark();
        }
        if i >= warmup {
            agent.push(answer);
            started.push(took);
            overhead.push(took - answer);
        }
    }
    for (pod, c, _) in &containers {
        assert!(
            bed.root
                .join(&pod.uid)
                .join(&c.id)
                .join("svid.pem")
                .exists(),
            "{} has its files",
            c.id
        );
    }
    assert_eq!(bed.metrics.identities_served(), total as u64);
    let phases = crate::phases::summaries(first_measured, crate::phases::mark());

    // Head-of-line blocking: does a burst of starts delay unrelated events?
    let burst = 50;
    let mut burst_ctrs = Vec::with_capacity(burst);
    for i in 0..burst {
        let pid = 30_000 + i as u32;
        let id = format!("ctr-burst-{i:02}");
        let pod = bed.annotated_pod(&format!("pod-burst-{i:02}"));
        let c = container(&pod, &id, pid);
        bed.host
            .procs
            .add_process(pid, format!("12:pids:/kubepods/pod{}/{id}\n", pod.uid));
        bed.agent.set_svids(
            WorkloadKey::Pid(pid as i32),
            SvidUpdate {
                svids: vec![
                    bed.ca
                        .mint(&format!("/b{i}"), Duration::from_secs(3600))
                        .unwrap(),
                ],
                federates_with: vec![],
            },
        );
        bed.create(&pod, &c).await.unwrap();
        burst_ctrs.push((pod, c));
    }
    let probe = |tag: &'static str, stop: Option<Arc<AtomicBool>>| {
        let conn = bed.conn.clone();
        async move {
            let mut took = Vec::new();
            for i in 0.. {
                match &stop {
                    Some(stop) if stop.load(Ordering::SeqCst) => break,
                    None if i == 200 => break,
                    _ => {}
                }
                let pod = plain_pod(&format!("{tag}-{i}"));
                let c = container(&pod, &format!("ctr-{tag}-{i}"), 0);
                let t = Instant::now();
                conn.create_container(&pod, &c).await.unwrap();
                took.push(us(t.elapsed()));
            }
            took
        }
    };
    let create_idle = probe("idle", None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut starts = tokio::task::JoinSet::new();
    let t = Instant::now();
    for (pod, c) in burst_ctrs {
        let conn = bed.conn.clone();
        starts.spawn(async move { conn.start_container(&pod, &c).await });
    }
    let (create_during_burst, burst_took) =
        tokio::join!(probe("busy", Some(stop.clone())), async {
            while let Some(r) = starts.join_next().await {
                r.unwrap().expect("every start of the burst is served");
            }
            stop.store(true, Ordering::SeqCst);
            t.elapsed()
        });
    bed.finish().await;
    StartFigures {
        agent: summarize(&agent),
        start: summarize(&started),
        overhead: summarize(&overhead),
        phases,
        create_idle: summarize(&create_idle),
        create_during_burst: summarize(&create_during_burst),
        burst,
        burst_took,
    }
}
