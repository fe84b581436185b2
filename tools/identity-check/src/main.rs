//! `identity-check [OPTIONS] DIR`: checks the identity files in DIR as a workload would read
//! them; prints one line and exits 0 (`ok ...`) or 1 (`FAIL ...`). With `--watch`, re-reads
//! them until `--for` elapses, printing each new certificate and every broken invariant, then
//! a summary line; exits 1 if an invariant broke. Usage errors exit 2.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nii_identity_check::{
    CheckError, DEFAULT_BUNDLE, DEFAULT_CERT, DEFAULT_CREDENTIALS, DEFAULT_KEY, Expect, Identity,
    Layout, Snapshot, Watch, check,
};

/// How long an unchanged set of files goes without a new check in `--watch`.
const RECHECK: Duration = Duration::from_secs(1);

const USAGE: &str = "usage: identity-check [--spiffe-id ID] [--layout spiffe-helper|combined]
    [--cert NAME] [--key NAME] [--bundle NAME] [--credentials NAME] [--clock-skew-s N]
    [--watch [--for SECONDS] [--interval-ms N] [--converge-ms N] [--inotify]] DIR

Checks DIR's identity files: one SPIFFE ID in the leaf (the expected one with --spiffe-id),
valid now (notBefore may be up to --clock-skew-s ahead, default 30), the private key the
leaf's, the chain verified up to a certificate of the bundle. File names default to the
daemon's (svid.pem, svid_key.pem, svid_bundle.pem; credential-bundle.pem for combined).

--watch: re-reads every --interval-ms (default 10) for --for seconds (default: forever) and
prints `seen ...` for each new certificate. With the combined layout a read whose key is not
the certificate's is a failure (TORN); with separate files it must resolve within
--converge-ms (default 3000). --inotify also counts the changes inotify reports in DIR
(entries created, written, renamed or deleted; not this reader's own reads) and adds
inotify_events=N to the summary.";

struct Args {
    dir: PathBuf,
    layout: Layout,
    expect: Expect,
    watch: Option<WatchArgs>,
}

struct WatchArgs {
    duration: Option<Duration>,
    interval: Duration,
    converge: Duration,
    inotify: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut layout = "spiffe-helper".to_owned();
    let (mut cert, mut key, mut bundle, mut credentials) = (None, None, None, None);
    let mut expect = Expect {
        spiffe_id: None,
        clock_skew: Duration::from_secs(30),
    };
    let mut watch = false;
    let mut duration = None;
    let mut interval = Duration::from_millis(10);
    let mut converge = Duration::from_millis(3000);
    let mut inotify = false;
    let mut dir = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match arg.as_str() {
            "--spiffe-id" => expect.spiffe_id = Some(value(&arg)?),
            "--layout" => layout = value(&arg)?,
            "--cert" => cert = Some(value(&arg)?),
            "--key" => key = Some(value(&arg)?),
            "--bundle" => bundle = Some(value(&arg)?),
            "--credentials" => credentials = Some(value(&arg)?),
            "--clock-skew-s" => {
                expect.clock_skew = Duration::from_secs(number(&arg, value(&arg)?)?)
            }
            "--watch" => watch = true,
            "--for" => duration = Some(Duration::from_secs(number(&arg, value(&arg)?)?)),
            "--interval-ms" => interval = Duration::from_millis(number(&arg, value(&arg)?)?),
            "--converge-ms" => converge = Duration::from_millis(number(&arg, value(&arg)?)?),
            "--inotify" => inotify = true,
            "-h" | "--help" => return Err(String::new()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ if dir.is_none() => dir = Some(PathBuf::from(arg)),
            _ => return Err("one directory only".into()),
        }
    }
    let layout = match layout.as_str() {
        "spiffe-helper" if credentials.is_none() => Layout::Separate {
            cert: cert.unwrap_or_else(|| DEFAULT_CERT.into()),
            key: key.unwrap_or_else(|| DEFAULT_KEY.into()),
            bundle: bundle.unwrap_or_else(|| DEFAULT_BUNDLE.into()),
        },
        "combined" if cert.is_none() && key.is_none() => Layout::Combined {
            credentials: credentials.unwrap_or_else(|| DEFAULT_CREDENTIALS.into()),
            bundle: bundle.unwrap_or_else(|| DEFAULT_BUNDLE.into()),
        },
        "spiffe-helper" => return Err("--credentials is for --layout combined".into()),
        "combined" => return Err("--cert and --key are for --layout spiffe-helper".into()),
        other => return Err(format!("--layout {other:?}: spiffe-helper or combined")),
    };
    if !watch && (duration.is_some() || inotify) {
        return Err("--for and --inotify need --watch".into());
    }
    Ok(Args {
        dir: dir.ok_or("no directory given")?,
        layout,
        expect,
        watch: watch.then_some(WatchArgs {
            duration,
            interval,
            converge,
            inotify,
        }),
    })
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("identity-check: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(w) = &args.watch else {
        let result = Snapshot::read(&args.dir, &args.layout)
            .and_then(|s| check(&s, &args.layout, &args.expect, now_s()));
        return match result {
            Ok(identity) => {
                println!("ok {identity}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("FAIL {e}");
                ExitCode::FAILURE
            }
        };
    };
    let mut changes = match w.inotify.then(|| Changes::watch(&args.dir)).transpose() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL cannot watch {} with inotify: {e}", args.dir.display());
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now();
    let mut watch = Watch::new(&args.layout, w.converge);
    // Unchanged files need no new verification (a slow VM guest reads every few ms), except
    // now and then, for their expiry.
    let mut last: Option<(Snapshot, Result<Identity, CheckError>, Instant)> = None;
    loop {
        let result = match Snapshot::read(&args.dir, &args.layout) {
            Err(e) => Err(e),
            Ok(snap) => match &last {
                Some((s, r, at)) if *s == snap && at.elapsed() < RECHECK => r.clone(),
                _ => {
                    let r = check(&snap, &args.layout, &args.expect, now_s());
                    last = Some((snap, r.clone(), Instant::now()));
                    r
                }
            },
        };
        for line in watch.observe(result, start.elapsed().as_millis() as u64) {
            println!("{line}");
        }
        if let Some(c) = &mut changes {
            c.drain();
        }
        if w.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        std::thread::sleep(w.interval);
    }
    match &changes {
        Some(c) => println!("{} inotify_events={}", watch.summary(), c.count),
        None => println!("{}", watch.summary()),
    }
    if watch.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Changes to a directory's entries as inotify reports them: what a workload that waits for
/// events instead of re-reading would see.
struct Changes {
    fd: rustix::fd::OwnedFd,
    count: u64,
}

impl Changes {
    fn watch(dir: &std::path::Path) -> rustix::io::Result<Changes> {
        use rustix::fs::inotify::{CreateFlags, WatchFlags, add_watch, init};
        let fd = init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
        add_watch(
            &fd,
            dir,
            WatchFlags::CREATE
                | WatchFlags::MODIFY
                | WatchFlags::CLOSE_WRITE
                | WatchFlags::MOVED_TO
                | WatchFlags::MOVED_FROM
                | WatchFlags::DELETE
                | WatchFlags::ATTRIB,
        )?;
        Ok(Changes { fd, count: 0 })
    }

    /// Counts the events that arrived since the last call.
    fn drain(&mut self) {
        let mut buf = [std::mem::MaybeUninit::uninit(); 4096];
        let mut reader = rustix::fs::inotify::Reader::new(&self.fd, &mut buf);
        while reader.next().is_ok() {
            self.count += 1;
        }
    }
}
