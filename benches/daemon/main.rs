//! Benchmarks of the daemon. Not timed tests: they print figures.
//!
//! 1. `create`: CreateContainer through the real NRI wire path (fake runtime → unix socket →
//!    nri_plugin::Runner → IdentityPlugin → Engine), timed from the runtime's side.
//! 2. `start`: StartContainer time beyond the SPIRE agent's own answer time.
//! 3. `memory`: resident memory of the release binary, idle and with 500 live identities,
//!    and how it grows on the way (a CSV and, with gnuplot, a plot in `NII_BENCH_OUT`).
//! 4. `kubelet`: one kubelet pod list (fetch and parse) from 0 to 110 realistic pods.
//!
//! ```sh
//! make bench-daemon
//! cargo bench -p nri-identity-injector --features testing --bench daemon [-- create|start|memory|kubelet]
//! ```
//!
//! Knobs: `NII_BENCH_CREATE_N` (5000), `NII_BENCH_START_M` (300), `NII_BENCH_MEMORY_N` (500),
//! `NII_BENCH_DAEMON_BIN` (the release binary for `memory`), `NII_BENCH_MEMORY_VARIANTS`
//! (a comma-separated subset of `as shipped`, `MALLOC_ARENA_MAX=1`, `ulimit -n 1024`),
//! `NII_BENCH_KUBELET_REPS` (200), `NII_BENCH_OUT` (where data and plots go).

mod bed;
mod kubelet;
mod memory;
mod phases;
mod wire;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bed::{Summary, loadavg};

const COMMAND: &str = "cargo bench -p nri-identity-injector --features testing --bench daemon --";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The type of the filesystem holding `path` (longest mount point in /proc/mounts).
fn fs_type(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map(|(_, kind)| kind)
        .unwrap_or_else(|| "?".into())
}

fn header() {
    println!(
        "{:<34} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "n", "p50 µs", "p90 µs", "p99 µs", "max µs", "mean µs"
    );
}

fn row(label: &str, s: &Summary) {
    println!(
        "{:<34} {:>6} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
        label, s.n, s.p50, s.p90, s.p99, s.max, s.mean
    );
}

/// Prints whether a target was met; gives 1 when it was missed.
fn verdict(what: &str, ok: bool) -> usize {
    println!("target {what}: {}", if ok { "MET" } else { "MISSED" });
    usize::from(!ok)
}

fn main() -> ExitCode {
    // The daemon logs every container at info: format those lines, as it does, to nowhere,
    // and keep the phases of each delivery from them.
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::sink)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
        )
        .with(phases::Capture.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
        .init();
    let names: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
    let bench_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench")
        .enable_all()
        .build()
        .unwrap();
    // Shaped like the daemon's runtime (src/main.rs).
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .thread_name("daemon")
        .enable_all()
        .build()
        .unwrap();
    let daemon = daemon_rt.handle().clone();
    let tmp = std::env::temp_dir();
    let mut missed = 0;

    // The production default root, /run, is a tmpfs on most distributions; the temporary
    // directory may be a disk. Both are measured when they differ.
    let mut roots: Vec<PathBuf> = vec![tmp.clone()];
    if fs_type(Path::new("/dev/shm")) == "tmpfs" && fs_type(&tmp) != "tmpfs" {
        roots.push("/dev/shm".into());
    }

    if want("create") {
        let n = knob("NII_BENCH_CREATE_N", 5000);
        println!("\n== 1. CreateContainer through the NRI wire path: {n} annotated containers ==");
        println!("reproduce: {COMMAND} create");
        for root in &roots {
            let load = loadavg();
            let f = bench_rt.block_on(wire::create(&daemon, root, n));
            println!(
                "-- artifact root on {} ({}); load average before: {load}",
                root.display(),
                fs_type(root)
            );
            header();
            row("annotated (dirs + mount)", &f.annotated);
            row("no annotation (wire baseline)", &f.plain);
            missed += verdict(
                &format!(
                    "annotated p99 < 1000 µs on {} (p99 = {:.0} µs)",
                    fs_type(root),
                    f.annotated.p99
                ),
                f.annotated.p99 < 1000.0,
            );
        }
    }

    if want("start") {
        let m = knob("NII_BENCH_START_M", 300);
        println!(
            "\n== 2. StartContainer beyond the agent's answer: {m} containers (fake processes, real files) =="
        );
        println!("reproduce: {COMMAND} start");
        for root in &roots {
            let load = loadavg();
            let f = bench_rt.block_on(wire::start(&daemon, root, m));
            println!(
                "-- artifact root on {} ({}); load average before: {load}",
                root.display(),
                fs_type(root)
            );
            header();
            row("(a) agent answer (bare client)", &f.agent);
            row("(b) StartContainer round trip", &f.start);
            row("(b) - (a) per container", &f.overhead);
            println!("(b) phase by phase, as the daemon logs them:");
            for (name, s) in &f.phases {
                row(&format!("    {name}"), s);
            }
            let diff50 = f.start.p50 - f.agent.p50;
            println!("p50(b) - p50(a) = {diff50:.0} µs");
            row("(c) CreateContainer, idle", &f.create_idle);
            row(
                &format!("(c) ... during {} starts", f.burst),
                &f.create_during_burst,
            );
            println!(
                "(c): unannotated CreateContainer while {} concurrent StartContainer run ({:.1?} for the burst)",
                f.burst, f.burst_took
            );
            missed += verdict(
                &format!(
                    "overhead < 2000 µs on {} (p50 {:.0} µs, p99 {:.0} µs)",
                    fs_type(root),
                    f.overhead.p50,
                    f.overhead.p99
                ),
                f.overhead.p99 < 2000.0,
            );
        }
    }

    if want("memory") {
        let n = knob("NII_BENCH_MEMORY_N", 500);
        println!("\n== 3. Memory of the release daemon process: idle, then {n} live identities ==");
        println!("reproduce: cargo build --release -p nri-identity-injector && {COMMAND} memory");
        let variants = [
            memory::Variant {
                name: "as shipped",
                env: vec![],
                nofile: None,
            },
            memory::Variant {
                name: "MALLOC_ARENA_MAX=1",
                env: vec![("MALLOC_ARENA_MAX", "1")],
                nofile: None,
            },
            memory::Variant {
                name: "ulimit -n 1024",
                env: vec![],
                nofile: Some(1024),
            },
        ];
        // NII_BENCH_MEMORY_VARIANTS: a comma-separated subset of the names, e.g. "as shipped".
        let selected: Vec<memory::Variant> = match std::env::var("NII_BENCH_MEMORY_VARIANTS") {
            Ok(list) => variants
                .into_iter()
                .filter(|v| list.split(',').any(|n| n.trim() == v.name))
                .collect(),
            Err(_) => variants.into(),
        };
        match memory::run(&bench_rt, n, &selected) {
            Ok(figures) => {
                println!(
                    "{:<20} {:>7} {:>10} {:>10} {:>9} {:>9} {:>9} {:>4} {:>5}",
                    "variant", "state", "VmRSS", "VmHWM", "RssAnon", "RssFile", "Pss", "thr", "fds"
                );
                for f in &figures {
                    for (state, s) in [
                        ("idle", &f.idle),
                        ("probed", &f.probed),
                        ("loaded", &f.loaded),
                    ] {
                        println!(
                            "{:<20} {:>7} {:>6} KiB {:>6} KiB {:>5} KiB {:>5} KiB {:>5} KiB {:>4} {:>5}",
                            f.variant, state, s.rss, s.hwm, s.anon, s.file, s.pss, s.threads, s.fds
                        );
                    }
                    println!(
                        "{:<20} {} of {n} started, {} failed, {} SVID streams open{}",
                        "",
                        f.started,
                        f.failed,
                        f.open_streams,
                        f.first_error
                            .as_deref()
                            .map(|e| format!("; first failure: {e}"))
                            .unwrap_or_default()
                    );
                    if let Some(t) = &f.create_start {
                        println!(
                            "{:<20} Create+Start round trip (real host): p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
                            "", t.p50, t.p99, t.max
                        );
                    }
                }
                if let Some(shipped) = figures.iter().find(|f| f.variant == "as shipped") {
                    growth(shipped);
                    missed += verdict(
                        &format!("idle VmRSS <= 5 MiB (as shipped: {} KiB)", shipped.idle.rss),
                        shipped.idle.rss <= 5 * 1024,
                    );
                    missed += verdict(
                        &format!(
                            "VmRSS <= 20 MiB with {n} live identities (as shipped: {} KiB)",
                            shipped.loaded.rss
                        ),
                        shipped.loaded.rss <= 20 * 1024 && shipped.failed == 0,
                    );
                }
            }
            Err(e) => {
                println!("memory benchmark could not run: {e}");
                missed += 1;
            }
        }
    }

    if want("kubelet") {
        let reps = knob("NII_BENCH_KUBELET_REPS", 200);
        println!(
            "\n== 4. One kubelet pod list (read-only port: connect, GET /pods, parse), {reps} lists per size =="
        );
        println!("reproduce: {COMMAND} kubelet");
        let load = loadavg();
        let counts = [0, 1, 10, 20, 30, 50, 70, 90, 110];
        let points = bench_rt.block_on(kubelet::cost(&counts, reps));
        println!("load average before: {load}");
        println!(
            "{:>5} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "pods", "bytes", "p50 µs", "p99 µs", "mean µs", "µs per pod"
        );
        let base = points[0].list.p50;
        let mut csv = String::from("pods,bytes,p50_us,p99_us,mean_us\n");
        for p in &points {
            let per = if p.pods == 0 {
                String::from("-")
            } else {
                format!("{:.1}", (p.list.p50 - base) / p.pods as f64)
            };
            println!(
                "{:>5} {:>10} {:>10.0} {:>10.0} {:>10.0} {per:>12}",
                p.pods, p.bytes, p.list.p50, p.list.p99, p.list.mean
            );
            csv.push_str(&format!(
                "{},{},{:.1},{:.1},{:.1}\n",
                p.pods, p.bytes, p.list.p50, p.list.p99, p.list.mean
            ));
        }
        let full = &points[points.len() - 1];
        println!(
            "a full node (110 pods, {} KiB): p50 {:.2} ms, p99 {:.2} ms per list",
            full.bytes / 1024,
            full.list.p50 / 1e3,
            full.list.p99 / 1e3
        );
        plot(&csv, "kubelet-pod-list", "kubelet.gnuplot");
    }

    drop(daemon_rt);
    println!("\n{missed} target(s) missed");
    // Figures, not a test: a missed target is reported, not a failure of the run.
    ExitCode::SUCCESS
}

/// How the shipped daemon's memory and descriptors grow with live identities: a table, a CSV
/// and (with gnuplot) a PNG in NII_BENCH_OUT (default: a directory under the temporary one).
fn growth(f: &memory::MemFigures) {
    println!("growth, as shipped (RSS and descriptors sampled as identities went live):");
    println!(
        "{:>10} {:>10} {:>10} {:>6} {:>14}",
        "identities", "VmRSS KiB", "RssAnon", "fds", "KiB/identity"
    );
    let (_, base) = f.curve[0];
    let mut csv = String::from("identities,rss_kib,anon_kib,fds\n");
    for (n, s) in &f.curve {
        let per = if *n == 0 {
            String::from("-")
        } else {
            format!("{:.1}", (s.rss as f64 - base.rss as f64) / *n as f64)
        };
        println!(
            "{n:>10} {:>10} {:>10} {:>6} {per:>14}",
            s.rss, s.anon, s.fds
        );
        csv.push_str(&format!("{n},{},{},{}\n", s.rss, s.anon, s.fds));
    }
    plot(&csv, "memory-growth", "memory.gnuplot");
}

/// Writes `csv` to NII_BENCH_OUT (default: a directory under the temporary one) as
/// `<name>.csv` and draws `<name>.png` with the gnuplot script `benches/daemon/<script>`.
fn plot(csv: &str, name: &str, script: &str) {
    let out = std::env::var_os("NII_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("nii-bench-daemon"));
    let csv_path = out.join(format!("{name}.csv"));
    if let Err(e) = std::fs::create_dir_all(&out).and_then(|()| std::fs::write(&csv_path, csv)) {
        println!("cannot write {}: {e}", csv_path.display());
        return;
    }
    let png = out.join(format!("{name}.png"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/daemon")
        .join(script);
    let drawn = std::process::Command::new("gnuplot")
        .arg("-e")
        .arg(format!(
            "csv='{}'; png='{}'",
            csv_path.display(),
            png.display()
        ))
        .arg(&script)
        .status()
        .is_ok_and(|s| s.success());
    if drawn {
        println!("data: {}; plot: {}", csv_path.display(), png.display());
    } else {
        println!(
            "data: {} (no plot: gnuplot missing or failed)",
            csv_path.display()
        );
    }
}
