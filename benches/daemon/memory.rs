//! Benchmark 3: the resident memory of the release daemon binary, run as a real process
//! against the fake NRI runtime and fake SPIRE agent hosted here.
//!
//! The real binary uses `RealHost`, so StartContainer needs real processes whose
//! `/proc/<pid>/cgroup` names the container: each container is a `sleep` placed in its own
//! cgroup `<pids hierarchy>/nii-bench-<run>/<container id>/`. Needs root. Everything (the
//! daemon, the sleeps, the cgroups, the directories) is removed at the end, also when the
//! benchmark fails; the daemon and the sleeps are started through `setpriv --pdeathsig KILL`
//! (when available) so they die with the benchmark even if it is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nri_identity_injector::spire::fake::{FakeAgent, TestCa, WorkloadKey};
use nri_identity_injector::spire::{SvidUpdate, X509Svid};
use nri_plugin::testing::{FakeRuntime, RuntimeSettings, temp_socket};
use tokio::runtime::Runtime;

use crate::bed::{TD, annotated_pod, container, identity_annotation, unique_dir};

/// How the daemon process is launched.
pub struct Variant {
    pub name: &'static str,
    pub env: Vec<(&'static str, &'static str)>,
    /// A soft RLIMIT_NOFILE (through the shell's `ulimit -n`), e.g. systemd's default 1024.
    pub nofile: Option<u32>,
}

/// One reading of `/proc/<pid>/status` (KiB) and of `/proc/<pid>/fd`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub rss: u64,
    pub hwm: u64,
    pub anon: u64,
    pub file: u64,
    /// Proportional set size: shared pages (libc) divided among their users.
    pub pss: u64,
    pub threads: u64,
    pub fds: usize,
}

pub struct MemFigures {
    pub variant: String,
    pub idle: Sample,
    /// Idle again after one request to each of `/healthz`, `/readyz` and `/metrics`, as
    /// probes and a scraper make in production.
    pub probed: Sample,
    pub loaded: Sample,
    pub started: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub open_streams: usize,
    /// (live identities, sample) from idle to `loaded`, every tenth of the run: how memory and
    /// descriptors grow with identities.
    pub curve: Vec<(usize, Sample)>,
    /// CreateContainer + StartContainer round trips of the real binary (µs).
    pub create_start: Option<crate::bed::Summary>,
}

fn sample(pid: u32) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field_in = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let field = |name: &str| field_in(&status, name);
    Sample {
        rss: field("VmRSS"),
        hwm: field("VmHWM"),
        anon: field("RssAnon"),
        file: field("RssFile"),
        pss: field_in(&rollup, "Pss"),
        threads: field("Threads"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

/// The release binary: `$NII_BENCH_DAEMON_BIN`, else `<target>/release/nri-identity-injector`.
pub fn daemon_binary() -> Result<PathBuf, String> {
    let bin = match std::env::var_os("NII_BENCH_DAEMON_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
            .join("release/nri-identity-injector"),
    };
    if !bin.exists() {
        return Err(format!(
            "{} is missing: cargo build --release -p nri-identity-injector",
            bin.display()
        ));
    }
    let built = bin.metadata().and_then(|m| m.modified()).ok();
    let newest_src = newest_mtime(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    if let (Some(built), Some(src)) = (built, newest_src)
        && src > built
    {
        eprintln!(
            "warning: {} is older than src/: rebuild with cargo build --release -p nri-identity-injector",
            bin.display()
        );
    }
    Ok(bin)
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// Where per-container cgroups go: the v1 `pids` hierarchy, else the v2 root.
fn cgroup_base() -> Result<PathBuf, String> {
    for base in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
        let base = Path::new(base);
        if base.join("cgroup.procs").exists() {
            return Ok(base.to_owned());
        }
    }
    Err("no writable cgroup hierarchy (needs /sys/fs/cgroup/pids or cgroup v2)".into())
}

/// Kills and removes everything the benchmark created, in reverse order, on drop.
#[derive(Default)]
struct Cleanup {
    daemon: Option<Child>,
    sleepers: Vec<Child>,
    cgroups: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    /// Set when every variant ran: otherwise the directories (daemon logs) are kept.
    done: bool,
}

impl Cleanup {
    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.stop_daemon();
        for c in &mut self.sleepers {
            let _ = c.kill();
        }
        for c in &mut self.sleepers {
            let _ = c.wait();
        }
        // A cgroup can be removed once its (reaped) processes have left it.
        for cg in self.cgroups.iter().rev() {
            for _ in 0..100 {
                if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if cg.exists() {
                eprintln!("warning: could not remove cgroup {}", cg.display());
            }
        }
        for d in &self.dirs {
            if self.done {
                let _ = std::fs::remove_dir_all(d);
            } else if d.exists() {
                eprintln!("kept {} (daemon logs) for inspection", d.display());
            }
        }
    }
}

/// `argv` prefixed so the process dies with this one (same pid: setpriv execs).
fn with_pdeathsig(argv: Vec<String>) -> Vec<String> {
    if Path::new("/usr/bin/setpriv").exists() {
        let mut v: Vec<String> = ["/usr/bin/setpriv", "--pdeathsig", "KILL", "--"]
            .map(String::from)
            .into();
        v.extend(argv);
        v
    } else {
        argv
    }
}

fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Runs the daemon once per variant with `n` started containers. Must be called from the
/// thread that lives for the whole benchmark (the children's parent-death signal follows it).
pub fn run(rt: &Runtime, n: usize, variants: &[Variant]) -> Result<Vec<MemFigures>, String> {
    let bin = daemon_binary()?;
    let base = cgroup_base()?;
    let mut cleanup = Cleanup::default();
    let run_dir = unique_dir(&std::env::temp_dir(), "memory");
    cleanup.dirs.push(run_dir.clone());
    let cg_root = base.join(format!(
        "nii-bench-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&cg_root)
        .map_err(|e| format!("creating {}: {e} (needs root)", cg_root.display()))?;
    cleanup.cgroups.push(cg_root.clone());

    // The containers' processes, each alone in a cgroup named after its container ID.
    let t = Instant::now();
    let ca = TestCa::new(TD).map_err(|e| e.to_string())?;
    let mut workloads: Vec<(String, u32, X509Svid)> = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("ctr-mem-{i:04}");
        let cg = cg_root.join(&id);
        std::fs::create_dir(&cg).map_err(|e| format!("creating {}: {e}", cg.display()))?;
        cleanup.cgroups.push(cg.clone());
        let child = command(&with_pdeathsig(vec!["sleep".into(), "900".into()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawning sleep: {e}"))?;
        let pid = child.id();
        cleanup.sleepers.push(child);
        std::fs::write(cg.join("cgroup.procs"), pid.to_string())
            .map_err(|e| format!("moving {pid} into {}: {e}", cg.display()))?;
        let svid = ca
            .mint(&format!("/mem/{i}"), Duration::from_secs(3600))
            .map_err(|e| e.to_string())?;
        workloads.push((id, pid, svid));
    }

    eprintln!(
        "  {n} sleeps in their cgroups and {n} SVIDs minted in {:.1?}",
        t.elapsed()
    );
    let mut figures = Vec::new();
    for variant in variants {
        figures.push(run_variant(
            rt,
            &bin,
            &run_dir,
            &ca,
            &workloads,
            variant,
            &mut cleanup,
        )?);
    }
    cleanup.done = true;
    let t = Instant::now();
    drop(cleanup);
    eprintln!("  cleaned up in {:.1?}", t.elapsed());
    Ok(figures)
}

fn run_variant(
    rt: &Runtime,
    bin: &Path,
    run_dir: &Path,
    ca: &TestCa,
    workloads: &[(String, u32, X509Svid)],
    variant: &Variant,
    cleanup: &mut Cleanup,
) -> Result<MemFigures, String> {
    let _guard = rt.enter();
    let agent = rt.block_on(FakeAgent::start()).map_err(|e| e.to_string())?;
    agent.set_bundle(&ca.trust_domain_id(), &[ca.cert_der().to_vec()]);
    for (_, pid, svid) in workloads {
        agent.set_svids(
            WorkloadKey::Pid(*pid as i32),
            SvidUpdate {
                svids: vec![svid.clone()],
                federates_with: vec![],
            },
        );
    }
    let nri_path = temp_socket("mem");
    if let Some(parent) = nri_path.parent() {
        cleanup.dirs.push(parent.to_owned());
    }
    let runtime = FakeRuntime::bind(&nri_path);
    let root = run_dir.join(format!("artifacts-{}", variant.name.replace(' ', "-")));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();

    let mut argv: Vec<String> = vec![bin.display().to_string()];
    for (flag, value) in [
        ("run", None),
        ("--nri-socket", Some(nri_path.display().to_string())),
        ("--agent-socket", Some(agent.path().display().to_string())),
        ("--artifact-root", Some(root.display().to_string())),
        ("--http-address", Some(format!("127.0.0.1:{port}"))),
        ("--log-level", Some("info".into())),
    ] {
        argv.push(flag.into());
        argv.extend(value);
    }
    let mut argv = with_pdeathsig(argv);
    if let Some(limit) = variant.nofile {
        let mut sh: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("ulimit -n {limit} && exec \"$@\""),
            "sh".into(),
        ];
        sh.append(&mut argv);
        argv = sh;
    }
    let log = run_dir.join(format!("daemon-{}.log", variant.name.replace(' ', "-")));
    let mut cmd = command(&argv);
    for (k, _) in std::env::vars() {
        if k.starts_with("NRI_IDENTITY_") || k.starts_with("NRI_PLUGIN_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(variant.env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?);
    let daemon = cmd
        .spawn()
        .map_err(|e| format!("spawning the daemon: {e}"))?;
    let pid = daemon.id();
    cleanup.daemon = Some(daemon);

    let figures = rt.block_on(async {
        let conn = runtime.accept(RuntimeSettings::default()).await;
        conn.handshake().await;
        // Registration, Configure, Synchronize and the first agent probe are done; let it
        // settle.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let idle = sample(pid);
        for path in ["/healthz", "/readyz", "/metrics"] {
            if let Err(e) = http_get(port, path).await {
                eprintln!("  [{}] GET {path}: {e}", variant.name);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probed = sample(pid);

        let annotation = identity_annotation(agent.path());
        let (mut started, mut failed, mut first_error) = (0, 0, None);
        let mut times = Vec::with_capacity(workloads.len());
        let step = (workloads.len() / 10).max(1);
        let mut curve = vec![(0, probed)];
        let t = Instant::now();
        for (i, (id, cpid, _)) in workloads.iter().enumerate() {
            let pod = annotated_pod(&format!("pod-mem-{i:04}"), &annotation);
            let c = container(&pod, id, *cpid);
            let t = Instant::now();
            let result = match conn.create_container(&pod, &c).await {
                Ok(_) => conn.start_container(&pod, &c).await.map(drop),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    started += 1;
                    times.push(crate::bed::us(t.elapsed()));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("container #{i}: {e}"));
                }
            }
            if (i + 1) % step == 0 && i + 1 < workloads.len() {
                curve.push((started, sample(pid)));
            }
        }
        let took = t.elapsed();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let loaded = sample(pid);
        curve.push((started, loaded));
        let open_streams = agent.stats().open_svid_streams;
        eprintln!(
            "  [{}] {started} started, {failed} failed in {took:.1?}; {open_streams} SVID streams open",
            variant.name
        );
        MemFigures {
            variant: variant.name.to_owned(),
            idle,
            probed,
            loaded,
            started,
            failed,
            first_error,
            open_streams,
            curve,
            create_start: (!times.is_empty()).then(|| crate::bed::summarize(&times)),
        }
    });
    cleanup.stop_daemon();
    drop(runtime);
    drop(agent);
    if figures.idle.rss == 0 {
        return Err(format!(
            "the daemon was not running when sampled; see {}",
            log.display()
        ));
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(figures)
}

/// One HTTP/1.1 GET to the daemon's health and metrics server; the answer is read and dropped.
async fn http_get(port: u16, path: &str) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.1 200") && !answer.starts_with(b"HTTP/1.1 503") {
        return Err(std::io::Error::other(format!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(40)])
        )));
    }
    Ok(())
}
