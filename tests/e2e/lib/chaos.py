#!/usr/bin/env python3
"""The chaos and soak drivers of the end-to-end bed (run by tests/e2e/chaos.sh and
tests/e2e/soak.sh, after bed_up and nii_start; every bed variable comes from the
environment).

chaos: keeps --pods annotated pods alive, created and removed all along, while an injector
SIGKILLs the daemon, containerd, the SPIRE agent and the SPIRE server at random moments,
freezes the agent (SIGSTOP) and fills the artifact root, one fault at a time, in an order
and with parameters drawn from --seed. Each container's first instruction is identity-check
(its result is the first line of its log). An invariant checker samples every second:

  ran_without_files  a first instruction found no valid identity
  bad_identity       a running container's files, read in its own mount namespace
                     (/proc/PID/root), fail identity-check (wrong SPIFFE ID, key not the
                     leaf's, chain not to the bundle) for longer than a rename pair takes
  expired            a running container holds an expired certificate
  left_behind        a removed pod's directory outlives its removal by 15 s while the
                     daemon has been up for 10 s
  resources          the daemon's memory or descriptors exceed their bound

Each violation is classified: the daemon's doing, or the runtime's (with the reason), so
that a failure is either a bug to fix or a documented limit of the runtime.

soak: starts --containers containers (one identity each, 10 per pod), holds them for
--seconds without faults, and records every rotation each workload sees, the daemon's
memory, descriptors and CPU, and the machine's load.

Both write a summary (JSON) and their samples under --out, and exit 1 on a violation that is
the daemon's doing (soak: on any violation).
"""

import argparse
import calendar
import collections
import errno
import json
import math
import os
import random
import signal
import ssl
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid

ENV = os.environ
E2E = ENV["E2E"]
CRICTL = ENV["CRICTL"]
ARTIFACTS = ENV["NII_ARTIFACTS"]
HTTP = ENV["NII_HTTP"]
IDCHECK = ENV["NII_IDENTITY_CHECK"]
TD = ENV.get("E2E_TD", "example.org")
LIB = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The daemon's NRI name, which pods require through containerd's default validator.
PLUGIN = "10-identity-injector"
# SPIRE's server backdates every certificate by 10 s; the agent rotates at half its
# lifetime (plus or minus a tenth of that, its jitter) on its sync loop.
BACKDATE = 10


def now():
    return time.time()


def run(args, timeout=120):
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout.strip(), p.stderr.strip()
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout}s"


def crictl(*args, timeout=120):
    return run([CRICTL, *args], timeout=timeout)


def bed(call, timeout=180):
    """Runs CALL with the bed's shell libraries loaded (restarts go through them)."""
    script = f'. "{LIB}/bed.sh"; . "{LIB}/nii.sh"; {call}'
    return run(["bash", "-c", script], timeout=timeout)


def pid_of(name):
    """The recorded PID of a bed process, if it is still that process."""
    try:
        pid, start = open(f"{E2E}/pids/{name}").read().split()
        if starttime(int(pid)) == start:
            return int(pid)
    except (OSError, ValueError):
        pass
    return None


def starttime(pid):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def http_get(path, timeout=2):
    try:
        with urllib.request.urlopen(f"http://{HTTP}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def metric(text, name):
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    return None


def cert_times(path):
    """notBefore and notAfter (Unix seconds) of the first certificate in PEM file PATH."""
    d = ssl._ssl._test_decode_cert(path)
    return ssl.cert_time_to_seconds(d["notBefore"]), ssl.cert_time_to_seconds(d["notAfter"])


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


class Log:
    """Events of the run, kept in memory and appended to OUT/events.jsonl."""

    def __init__(self, out):
        self.lock = threading.Lock()
        self.f = open(os.path.join(out, "events.jsonl"), "a", buffering=1)
        self.events = []

    def __call__(self, event, **fields):
        e = {"t": round(now(), 3), "event": event, **fields}
        with self.lock:
            self.events.append(e)
            self.f.write(json.dumps(e) + "\n")
        return e


class Workload:
    """One annotated container (and, in chaos, its own pod)."""

    def __init__(self, name, uid_num, life=None):
        self.name = name
        self.pod_name = name
        self.uid_num = uid_num
        self.spiffe_id = f"spiffe://{TD}/chaos/u{uid_num}"
        self.life = life
        self.pod_uid = str(uuid.uuid4())
        self.pod_id = None
        self.cid = None
        self.pid = None
        self.pid_start = None
        self.log_path = None
        self.state = "creating"
        self.attempts = []  # per create attempt: dict of times and outcome
        self.t_running = None
        self.t_removed = None
        self.first = None
        self.gone = False
        self.files_key = None
        self.cert = None  # (not_before, not_after) of the certificate it holds
        self.bad_since = None
        self.expired_reported = None
        self.rotations = 0


class Bed:
    """Pod and container specs from the bed's own templates, and crictl around them."""

    def __init__(self, out):
        self.out = out
        self.spec_dir = os.path.join(E2E, "specs", "chaos")
        os.makedirs(self.spec_dir, exist_ok=True)
        ann = {
            "identity.noderesource.dev/pod": (
                f"- spire_agent_address: {ENV['ADMIN_SOCK']}\n  cert_dir: /var/certs\n"
            ),
            "required-plugins.noderesource.dev": f"- {PLUGIN}\n",
        }
        rc, pod, err = bed(
            f"bed_pod_json TMPLPOD 00000000-0000-0000-0000-00000000abcd '{json.dumps(ann)}'"
        )
        if rc:
            raise SystemExit(f"bed_pod_json: {err}")
        self.pod_template = open(pod).read()
        rc, ctr, err = bed("E2E_CTR_UID=7777777 bed_ctr_json TMPLCTR sh -c TMPLCMD")
        if rc:
            raise SystemExit(f"bed_ctr_json: {err}")
        self.ctr_template = open(ctr).read()

    def pod_json(self, w):
        text = self.pod_template.replace("TMPLPOD", w.pod_name).replace(
            "00000000-0000-0000-0000-00000000abcd", w.pod_uid
        )
        path = os.path.join(self.spec_dir, f"pod-{w.pod_name}.json")
        open(path, "w").write(text)
        return path

    def ctr_json(self, w, attempt):
        # The first instruction checks the files, as the workload would find them.
        cmd = (
            f"/nii/identity-check --spiffe-id {w.spiffe_id} /var/certs; "
            "exec sleep 1000000"
        )
        spec = json.loads(
            self.ctr_template.replace("TMPLCTR", w.name).replace("7777777", str(w.uid_num))
        )
        spec["command"] = ["sh", "-c", cmd]
        spec["log_path"] = f"{w.name}_{attempt}.log"
        spec["mounts"] = [
            {"container_path": "/nii/identity-check", "host_path": IDCHECK, "readonly": True}
        ]
        path = os.path.join(self.spec_dir, f"ctr-{w.name}-{attempt}.json")
        json.dump(spec, open(path, "w"))
        return path

    def log_file(self, w, attempt):
        return os.path.join(E2E, "logs", "pods", w.pod_name, f"{w.name}_{attempt}.log")


def first_line(path):
    """The first line the container printed (CRI log format) and when (Unix seconds), or
    (None, None)."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 3)
                if len(parts) == 4 and parts[1] == "stdout":
                    return parts[3], log_time(parts[0])
    except OSError:
        pass
    return None, None


def log_time(stamp):
    """Unix seconds of a CRI log timestamp (RFC 3339 with nanoseconds), or None."""
    try:
        date, frac = stamp.rstrip("Z").split(".", 1) if "." in stamp else (stamp.rstrip("Z"), "0")
        base = calendar.timegm(time.strptime(date[:19], "%Y-%m-%dT%H:%M:%S"))
        return base + float("0." + frac[:9].split("+")[0].split("-")[0])
    except ValueError:
        return None


def identity_check(w, attempts=4):
    """identity-check of the container's files in its own mount namespace; retried briefly,
    since separate key and certificate files may pair wrongly for the moment between the
    daemon's two renames."""
    d = f"/proc/{w.pid}/root/var/certs"
    line = ""
    for i in range(attempts):
        rc, out, err = run([IDCHECK, "--spiffe-id", w.spiffe_id, d], timeout=20)
        line = out or err
        if rc == 0:
            return True, line
        time.sleep(0.1 * (i + 1))
    return False, line


class Run:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.log = Log(self.out)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.workloads = []
        self.violations = []
        # Set when the injector could not place a fault: the run then proves nothing.
        self.injector_error = None
        self.faults = []  # dicts: kind, t, end, recovered
        self.samples = []  # dicts: t, rss_kib, fds, live, load, cpu_ticks, rotations
        self.bed = Bed(self.out)
        self.daemon_pid = pid_of("nii")
        self.daemon_since = now()
        self.max_rss = 0
        self.max_fds = 0
        self.max_live = 0
        self.counters = collections.Counter()
        self.rotation_lags = []  # seconds past the old certificate's rotation point
        self.visible_after_issue = []  # seconds from issuance to the workload seeing it
        self.max_past_rotation = (0.0, None)
        self.last_ok_start = 0.0
        self.idcheck_every = 1
        # Bed processes being restarted (by the injector or the supervisor).
        self.busy = set()

    # --- violations -----------------------------------------------------------------------

    def violation(self, kind, w, detail, cause, daemons_doing):
        v = {
            "kind": kind,
            "workload": w.name if w else None,
            "pod_uid": w.pod_uid if w else None,
            "cid": w.cid if w else None,
            "detail": detail,
            "cause": cause,
            "daemons_doing": daemons_doing,
        }
        with self.lock:
            self.violations.append(v)
        self.log("violation", **v)
        print(f"VIOLATION {kind} ({'daemon' if daemons_doing else 'runtime'}: {cause}): "
              f"{w.name if w else ''} {detail}", flush=True)

    def faults_between(self, kinds, start, end):
        return [f for f in self.faults if f["kind"] in kinds and start <= f["t"] <= end]

    def outage(self, kinds, start, end):
        """Seconds within [start, end] during which a fault of KINDS was unresolved."""
        total = 0.0
        for f in self.faults:
            if f["kind"] not in kinds:
                continue
            a, b = max(start, f["t"]), min(end, f.get("recovered") or end)
            total += max(0.0, b - a)
        return total

    def classify_unserved(self, w, attempt):
        """Why a first instruction ran without its files."""
        rc, out, _ = crictl("inspect", w.cid)
        spec = {}
        try:
            spec = json.loads(out)["info"]["runtimeSpec"]
        except (ValueError, KeyError, TypeError):
            pass
        mounted = any(m.get("destination") == "/var/certs" for m in spec.get("mounts", []))
        guarded = any(
            "nri-identity-injector" in h.get("path", "")
            for h in (spec.get("hooks") or {}).get("startContainer", [])
        )
        if not mounted:
            return ("created without the daemon's mount: containerd went on without the "
                    "plugin at CreateContainer (a required plugin missing was not refused)",
                    False)
        window = self.faults_between(
            {"kill_daemon"}, attempt["create_done"] - 0.05, attempt["start_done"]
        )
        if window and not guarded:
            return ("daemon killed after CreateContainer, before it answered StartContainer: "
                    "containerd starts a container without the plugin (no start guard)", False)
        timeouts = containerd_timeouts(w.cid)
        if timeouts:
            return (f"containerd dropped the plugin on a timeout and went on: {timeouts[0]}",
                    False)
        if window and guarded:
            return ("daemon killed after CreateContainer, before it answered StartContainer, "
                    "although the start guard was in the spec", True)
        return ("unexplained", True)

    # --- churn (chaos) --------------------------------------------------------------------

    def live(self):
        """Pods being created or running (not those on their way out)."""
        return [w for w in self.workloads if w.state in ("creating", "running")]

    def create(self, w):
        path = self.bed.pod_json(w)
        for i in range(5):
            if self.stop.is_set():
                return False
            rc, pod_id, err = crictl("runp", path)
            if rc == 0:
                w.pod_id = pod_id
                break
            self.counters["runp_failed"] += 1
            self.log("runp_failed", workload=w.name, error=err[-300:])
            time.sleep(1 + i)
        else:
            return False
        for attempt_no in range(4):
            if self.stop.is_set():
                break
            ctr = self.bed.ctr_json(w, attempt_no)
            a = {"n": attempt_no, "create_call": now()}
            rc, cid, err = crictl("create", w.pod_id, ctr, path)
            a["create_done"] = now()
            if rc:
                a["outcome"] = "create_refused"
                a["error"] = err[-400:]
                w.attempts.append(a)
                self.counters["create_refused"] += 1
                self.log("create_refused", workload=w.name, error=err[-400:])
                time.sleep(1 << attempt_no)
                continue
            w.cid = cid
            w.log_path = self.bed.log_file(w, attempt_no)
            a["start_call"] = now()
            rc, _, err = crictl("start", cid)
            a["start_done"] = now()
            w.attempts.append(a)
            if rc == 0:
                a["outcome"] = "started"
                pid = crictl("inspect", "-o", "go-template", "--template", "{{.info.pid}}", cid)[1]
                w.pid = int(pid) if pid.isdigit() else None
                w.pid_start = starttime(w.pid) if w.pid else None
                w.t_running = a["start_done"]
                w.state = "running"
                self.counters["started"] += 1
                self.log("started", workload=w.name, cid=cid, pid=w.pid,
                         start_ms=round((a["start_done"] - a["start_call"]) * 1000))
                return True
            a["outcome"] = "start_refused"
            a["error"] = err[-400:]
            self.counters["start_refused"] += 1
            self.log("start_refused", workload=w.name, cid=cid, error=err[-400:])
            crictl("rm", "-f", cid)
            w.cid = None
            time.sleep(1 << attempt_no)
        return False

    def remove(self, w):
        w.state = "removing"
        for i in range(30):
            cids = crictl("ps", "-aq", "--pod", w.pod_id)[1].split() if w.pod_id else []
            if cids:
                crictl("rm", "-f", *cids)
            rc, _, err = crictl("rmp", "-f", w.pod_id) if w.pod_id else (0, "", "")
            if rc == 0:
                w.state = "removed"
                w.t_removed = now()
                self.counters["removed"] += 1
                return
            time.sleep(min(5, 1 + i))
        self.log("remove_failed", workload=w.name)
        w.state = "removed"
        w.t_removed = now()

    def churner(self, worker):
        rnd = random.Random(self.args.seed * 1000 + worker)
        while not self.stop.is_set():
            with self.lock:
                live = self.live()
                due = [w for w in live if w.state == "running" and now() - w.t_running > w.life]
                if len(live) < self.args.pods and self.creating_allowed:
                    n = len(self.workloads)
                    w = Workload(f"w{n}", self.args.first_uid + n % self.args.identities,
                                 life=rnd.uniform(self.args.min_life, self.args.max_life))
                    w.pod_name = f"chaos{n}"
                    self.workloads.append(w)
                    self.max_live = max(self.max_live, len(live) + 1)
                    action = ("create", w)
                elif due:
                    # One out, and the next turn brings one in: the count stays up.
                    w = min(due, key=lambda x: x.t_running)
                    w.state = "removing"
                    action = ("remove", w)
                else:
                    action = None
            if action is None:
                time.sleep(0.2)
            elif action[0] == "remove":
                self.remove(action[1])
            elif not self.create(action[1]):
                if action[1].pod_id:
                    self.remove(action[1])
                action[1].state = "refused" if action[1].state != "removed" else "removed"
                if action[1].t_removed is None:
                    action[1].t_removed = now()

    # --- faults (chaos) -------------------------------------------------------------------

    def schedule(self):
        rnd = random.Random(self.args.seed)
        kinds = ["kill_daemon", "kill_containerd", "kill_agent", "kill_server", "stop_agent",
                 "fill_root"]
        plan = []
        while len(plan) < 200:
            round_ = kinds[:]
            rnd.shuffle(round_)
            for k in round_:
                param = {
                    "kill_daemon": lambda: {"restart_after": round(rnd.uniform(0, 2), 2)},
                    "kill_containerd": lambda: {"restart_after": round(rnd.uniform(0, 2), 2)},
                    "kill_agent": lambda: {"restart_after": round(rnd.uniform(0, 2), 2)},
                    "kill_server": lambda: {"restart_after": round(rnd.uniform(0, 2), 2)},
                    "stop_agent": lambda: {"seconds": round(rnd.uniform(2, 6), 2)},
                    "fill_root": lambda: {"seconds": round(rnd.uniform(5, 15), 2)},
                }[k]()
                plan.append({"kind": k, "gap": round(rnd.uniform(5, 15), 2), **param})
        return plan

    def inject(self, f):
        kind = f["kind"]
        procs = {"kill_daemon": "nii", "kill_containerd": "containerd",
                 "kill_agent": "spire-agent", "kill_server": "spire-server",
                 "stop_agent": "spire-agent"}
        if kind in procs:
            pid = pid_of(procs[kind])
            if pid is None:
                return None, f"no {procs[kind]} running"
        t = now()
        if kind.startswith("kill_"):
            name = procs[kind]
            self.busy.add(name)
            try:
                os.kill(pid, signal.SIGKILL)
                time.sleep(f["restart_after"])
                call = self.RESTART[name]
                rc, _, err = bed(f"bed_stop {name}; {call}" if name == "nii" else call)
            finally:
                self.busy.discard(name)
            if kind == "kill_daemon":
                self.daemon_pid = pid_of("nii")
                self.daemon_since = now()
            return t, (None if rc == 0 else err[-300:])
        if kind == "stop_agent":
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(f["seconds"])
            finally:
                os.kill(pid, signal.SIGCONT)
            return t, None
        if kind == "fill_root":
            path = os.path.join(self.args.fill_dir, "fill")
            written = 0
            try:
                # Unbuffered, so that the write that finds the file system full raises here
                # and nothing is left in a buffer to fail again when the file is closed.
                with open(path, "wb", buffering=0) as fh:
                    chunk = b"\0" * 65536
                    while True:
                        try:
                            n = fh.write(chunk)
                        except OSError as e:
                            if e.errno != errno.ENOSPC:
                                raise
                            break
                        if not n:
                            break
                        written += n
                f["filled_bytes"] = written
                time.sleep(f["seconds"])
            finally:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            return t, None
        raise ValueError(kind)

    def recovered(self, since, timeout=180):
        """Seconds from SINCE until the daemon is ready and a workload started after SINCE
        ran its first instruction with its files."""
        deadline = now() + timeout
        while now() < deadline and not self.stop.is_set():
            code, _ = http_get("/readyz")
            if code == 200 and self.last_ok_start > since:
                return self.last_ok_start - since
            time.sleep(0.2)
        return None

    def injector(self):
        t0 = now()
        for f in self.schedule():
            if self.stop.wait(f["gap"]) or now() - t0 > self.args.seconds:
                return
            try:
                t, error = self.inject(f)
            except Exception as e:  # noqa: BLE001 - a fault the driver could not place
                # must end the run as a failure, not silently end the fault schedule.
                self.injector_error = f"{f['kind']}: {e!r}"
                print(f"chaos: injector failed: {self.injector_error}", flush=True)
                return
            if t is None:
                self.log("fault_skipped", **f, reason=error)
                continue
            end = now()
            fault = {**f, "t": t, "end": end, "error": error}
            with self.lock:
                self.faults.append(fault)
            self.counters[f["kind"]] += 1
            self.log("fault", **fault)
            print(f"fault {f['kind']} at +{t - t0:.0f}s "
                  f"({', '.join(f'{k}={v}' for k, v in f.items() if k not in ('kind', 'gap'))})"
                  + (f": {error}" if error else ""), flush=True)
            took = self.recovered(end)
            fault["recovered"] = now()
            fault["recovery_s"] = None if took is None else round(took + (end - t), 2)
            self.log("recovered", kind=f["kind"], recovery_s=fault["recovery_s"])

    # --- the checker ----------------------------------------------------------------------

    def check_first(self, w):
        if w.first is not None or not w.log_path:
            return
        line, at = first_line(w.log_path)
        if line is None:
            if now() - w.t_running > 30:
                w.first = "(nothing)"
                self.log("silent", workload=w.name)
            return
        w.first = line
        if line.startswith("ok "):
            self.last_ok_start = max(self.last_ok_start, w.t_running)
            self.counters["first_ok"] += 1
            # Its start returned well before its first instruction ran: the start guard
            # held it until the daemon delivered.
            if at is not None and at - w.t_running > 1.5:
                self.counters["held_by_guard"] += 1
                self.log("held", workload=w.name, held_s=round(at - w.t_running, 2))
            return
        self.counters["first_fail"] += 1
        attempt = w.attempts[-1]
        cause, daemons = self.classify_unserved(w, attempt)
        self.violation("ran_without_files", w, line, cause, daemons)

    def check_files(self, w):
        # Until its first instruction has run, a container may be held by its start guard
        # with its files not yet there (the daemon was away at StartContainer): nothing
        # of the workload's has run, so there is nothing to hold against the daemon yet.
        if not (w.first or "").startswith("ok "):
            return
        if not w.pid or starttime(w.pid) != w.pid_start:
            return
        d = f"/proc/{w.pid}/root/var/certs"
        key = []
        for name in ("svid.pem", "svid_key.pem", "svid_bundle.pem"):
            try:
                st = os.stat(os.path.join(d, name))
                key.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                key.append(None)
        key = tuple(key)
        t = now()
        if key != w.files_key:
            w.files_key = key
            try:
                nb, na = cert_times(os.path.join(d, "svid.pem"))
            except (OSError, ssl.SSLError, ValueError, KeyError):
                nb = na = None
            old = w.cert
            verify = old is None or self.counters["rotations_seen"] % self.idcheck_every == 0
            ok, line = identity_check(w) if verify else (True, "")
            if not ok:
                if w.bad_since is None:
                    w.bad_since = t
                    self.bad_identity(w, line)
                return
            w.bad_since = None
            if nb is None:
                return
            if old is not None and old != (nb, na):
                w.rotations += 1
                self.counters["rotations_seen"] += 1
                rot_point = old[0] + (old[1] - old[0]) / 2
                self.rotation_lags.append(t - rot_point)
                self.visible_after_issue.append(t - (nb + BACKDATE))
            w.cert = (nb, na)
        if w.cert:
            nb, na = w.cert
            past = t - (nb + (na - nb) / 2)
            if past > self.max_past_rotation[0]:
                self.max_past_rotation = (past, w.name)
            if t > na and w.expired_reported != na:
                w.expired_reported = na
                # While the agent or the server cannot issue, nobody can deliver.
                blocked = self.outage({"kill_agent", "stop_agent", "kill_server"},
                                      nb + (na - nb) / 2, t)
                if blocked > 0.5 * (t - (nb + (na - nb) / 2)):
                    self.violation("expired", w, f"not_after {na:.0f}", "the agent or server "
                                   "could not issue for most of the time since rotation", False)
                else:
                    self.violation("expired", w, f"not_after {na:.0f}", "not renewed", True)

    def bad_identity(self, w, line):
        # Maybe the container is going away right now.
        if w.state != "running" or starttime(w.pid) != w.pid_start:
            return
        self.violation("bad_identity", w, line, "the files fail identity-check", True)

    def check_removed(self, w):
        if w.gone or w.t_removed is None:
            return
        if not os.path.exists(os.path.join(ARTIFACTS, w.pod_uid)):
            w.gone = True
            return
        t = now()
        if t - w.t_removed > 15 and t - self.daemon_since > 10:
            w.gone = True
            self.violation("left_behind", w, f"{ARTIFACTS}/{w.pod_uid}",
                           "the pod's directory outlived its removal", True)

    def sample(self):
        pid = pid_of("nii")
        if pid != self.daemon_pid and pid is not None:
            self.daemon_pid, self.daemon_since = pid, now()
        rss = fds = ticks = None
        if pid:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                fds = len(os.listdir(f"/proc/{pid}/fd"))
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                ticks = int(stat[11]) + int(stat[12])
            except (OSError, ValueError):
                pass
        load = os.getloadavg()[0]
        code, text = http_get("/metrics")
        rotations = metric(text, "nri_identity_rotations_total") if code == 200 else None
        running = sum(1 for w in self.workloads if w.state == "running")
        s = {"t": round(now(), 2), "pid": pid, "rss_kib": rss, "fds": fds, "live": running,
             "load1": load, "cpu_ticks": ticks, "rotations": rotations,
             "rotations_seen": self.counters["rotations_seen"]}
        self.samples.append(s)
        if rss:
            self.max_rss = max(self.max_rss, rss)
        if fds:
            self.max_fds = max(self.max_fds, fds)

    # Restarts of what exited without being killed by the injector, as a supervisor would.
    RESTART = {
        "nii": "nii_start",
        "containerd": "bed_restart_runtime",
        "spire-agent": "bed_restart_agent",
        "spire-server": (
            "bed_stop spire-server; _bed_rotate_log spire-server; "
            'bed_spawn spire-server "$NII_SPIRE_DIR/spire-server" run '
            '-config "$E2E/spire/server.conf" >/dev/null; '
            'bed_wait 60 "spire-server health" "$SPIRE_SERVER" healthcheck'
        ),
    }

    def supervise(self):
        """Notices a bed process that exited although nothing killed it (the injector marks
        what it is restarting), reports it and restarts it."""
        for name, call in self.RESTART.items():
            if name in self.busy or pid_of(name) is not None:
                continue
            self.busy.add(name)
            self.counters[f"exited_{name}"] += 1
            self.log("exited", process=name)
            print(f"{name} exited without being killed; restarting it", flush=True)

            def restart(name=name, call=call):
                try:
                    rc, _, err = bed(f"bed_stop {name}; {call}" if name == "nii" else call)
                    self.log("restarted", process=name, rc=rc, error=err[-300:])
                finally:
                    self.busy.discard(name)

            threading.Thread(target=restart, daemon=True).start()

    def checker(self):
        while not self.stop.is_set():
            t = now()
            self.supervise()
            with self.lock:
                ws = list(self.workloads)
            for w in ws:
                if w.state == "running":
                    self.check_first(w)
                    self.check_files(w)
                elif w.state in ("removed", "refused"):
                    self.check_removed(w)
            self.sample()
            self.stop.wait(max(0.0, 1.0 - (now() - t)))

    # --- the runs -------------------------------------------------------------------------

    def chaos(self):
        a = self.args
        print(f"chaos: seed {a.seed} (replay: NII_CHAOS_SEED={a.seed}), {a.seconds}s, "
              f"{a.pods} live pods, {a.identities} identities, TTL {a.ttl}s", flush=True)
        self.creating_allowed = True
        workers = [threading.Thread(target=self.churner, args=(i,), daemon=True)
                   for i in range(a.workers)]
        checker = threading.Thread(target=self.checker, daemon=True)
        for t in workers:
            t.start()
        checker.start()
        # Warm up: the pods are there before the first fault.
        t_warm = now()
        while sum(1 for w in self.workloads if w.state == "running") < a.pods:
            if now() - t_warm > 600:
                print("chaos: warm-up did not reach the pod count", flush=True)
                break
            time.sleep(1)
        print(f"chaos: {a.pods} pods up in {now() - t_warm:.0f}s; faults begin", flush=True)
        t0 = now()
        injector = threading.Thread(target=self.injector, daemon=True)
        injector.start()
        while now() - t0 < a.seconds:
            time.sleep(1)
        injector.join(timeout=300)
        # Every pod goes; nothing may be left.
        self.creating_allowed = False
        while any(w.state == "creating" for w in self.workloads):
            time.sleep(0.5)
        remaining = [w for w in self.workloads if w.state == "running"]
        for w in remaining:
            with self.lock:
                w.state = "removing"
        threads = [threading.Thread(target=self.remove, args=(w,)) for w in remaining]
        for i in range(0, len(threads), 8):
            for t in threads[i:i + 8]:
                t.start()
            for t in threads[i:i + 8]:
                t.join()
        deadline = now() + 30
        while now() < deadline and any(not w.gone and w.t_removed for w in self.workloads):
            time.sleep(1)
        self.stop.set()
        for t in workers:
            t.join(timeout=120)
        checker.join(timeout=30)
        for w in self.workloads:
            if w.t_removed and not w.gone:
                self.check_removed(w)
        self.resources_bound()
        return self.report("chaos", t0)

    def soak(self):
        a = self.args
        print(f"soak: {a.containers} containers ({a.per_pod} per pod), {a.seconds}s, "
              f"TTL {a.ttl}s", flush=True)
        self.idcheck_every = a.idcheck_every
        self.creating_allowed = False
        pods = math.ceil(a.containers / a.per_pod)
        t_up = now()
        checker = threading.Thread(target=self.checker, daemon=True)
        checker.start()
        sem = threading.Semaphore(a.workers)

        def start_pod(p):
            with sem:
                ws = []
                for i in range(a.per_pod):
                    n = p * a.per_pod + i
                    if n >= a.containers:
                        break
                    w = Workload(f"s{n}", a.first_uid + n)
                    w.pod_name = f"soak{p}"
                    ws.append(w)
                if not ws:
                    return
                for w in ws[1:]:
                    w.pod_uid = ws[0].pod_uid
                path = self.bed.pod_json(ws[0])
                rc, pod_id, err = crictl("runp", path)
                if rc:
                    self.log("runp_failed", pod=p, error=err[-300:])
                    return
                for w in ws:
                    w.pod_id = pod_id
                    with self.lock:
                        self.workloads.append(w)
                    self.soak_start(w, path)

        threads = [threading.Thread(target=start_pod, args=(p,)) for p in range(pods)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        running = sum(1 for w in self.workloads if w.state == "running")
        print(f"soak: {running} containers running in {now() - t_up:.0f}s", flush=True)
        t0 = now()
        self.soak_t0 = t0
        next_report = t0 + 300
        while now() - t0 < a.seconds:
            time.sleep(1)
            if now() >= next_report:
                next_report += 300
                s = self.samples[-1] if self.samples else {}
                print(f"soak: +{now() - t0:.0f}s rss {s.get('rss_kib')} KiB, fds {s.get('fds')},"
                      f" rotations seen {self.counters['rotations_seen']}, load {s.get('load1')}",
                      flush=True)
        self.stop.set()
        checker.join(timeout=30)
        return self.report("soak", t0)

    def soak_start(self, w, pod_path):
        for attempt_no in range(4):
            ctr = self.bed.ctr_json(w, attempt_no)
            a = {"n": attempt_no, "create_call": now()}
            rc, cid, err = crictl("create", w.pod_id, ctr, pod_path)
            a["create_done"] = now()
            if rc:
                self.log("create_refused", workload=w.name, error=err[-300:])
                time.sleep(2)
                continue
            w.cid = cid
            w.log_path = self.bed.log_file(w, attempt_no)
            a["start_call"] = now()
            rc, _, err = crictl("start", cid)
            a["start_done"] = now()
            w.attempts.append(a)
            if rc == 0:
                pid = crictl("inspect", "-o", "go-template", "--template", "{{.info.pid}}", cid)[1]
                w.pid = int(pid) if pid.isdigit() else None
                w.pid_start = starttime(w.pid) if w.pid else None
                w.t_running = a["start_done"]
                w.state = "running"
                self.counters["started"] += 1
                return
            self.log("start_refused", workload=w.name, error=err[-300:])
            self.counters["start_refused"] += 1
            crictl("rm", "-f", cid)
            time.sleep(2)
        w.state = "refused"

    def resources_bound(self):
        limit_fds = 4 * max(self.max_live, 1) + 64
        if self.max_rss > self.args.max_rss_mib * 1024:
            self.violation("resources", None, f"max RSS {self.max_rss} KiB",
                           f"over {self.args.max_rss_mib} MiB", True)
        if self.max_fds > limit_fds:
            self.violation("resources", None, f"max fds {self.max_fds}",
                           f"over 4 per live container + 64 = {limit_fds}", True)

    # --- report ---------------------------------------------------------------------------

    def report(self, mode, t0):
        a = self.args
        by_kind = collections.Counter(v["kind"] for v in self.violations)
        daemons = [v for v in self.violations if v["daemons_doing"]]
        runtime = [v for v in self.violations if not v["daemons_doing"]]
        recovery = collections.defaultdict(list)
        for f in self.faults:
            recovery[f["kind"]].append(f.get("recovery_s"))
        loads = [s["load1"] for s in self.samples if s["t"] >= t0]
        summary = {
            "mode": mode,
            "seed": a.seed,
            "seconds": round(now() - t0),
            "pods_churned": sum(1 for w in self.workloads if w.state != "creating"),
            "started": self.counters["started"],
            "start_refused": self.counters["start_refused"],
            "create_refused": self.counters["create_refused"],
            "first_instruction_ok": self.counters["first_ok"],
            "first_instruction_fail": self.counters["first_fail"],
            "held_by_guard": self.counters["held_by_guard"],
            "faults": {k: self.counters[k] for k in sorted(recovery)},
            "exited_unkilled": {k[len("exited_"):]: v for k, v in self.counters.items()
                                if k.startswith("exited_")},
            "recovery_s": {k: v for k, v in sorted(recovery.items())},
            "injector_error": self.injector_error,
            "violations": len(self.violations),
            "violations_by_kind": dict(by_kind),
            "violations_daemon": len(daemons),
            "violations_runtime": len(runtime),
            "violation_causes": dict(collections.Counter(v["cause"] for v in self.violations)),
            "rotations_seen": self.counters["rotations_seen"],
            "max_past_rotation_s": round(self.max_past_rotation[0], 1),
            "rotation_lag_s": {"p50": pct(self.rotation_lags, 50), "p99": pct(self.rotation_lags, 99),
                               "max": max(self.rotation_lags, default=None)},
            "visible_after_issue_s": {"p50": pct(self.visible_after_issue, 50),
                                      "p99": pct(self.visible_after_issue, 99),
                                      "max": max(self.visible_after_issue, default=None)},
            "daemon_max_rss_kib": self.max_rss,
            "daemon_max_fds": self.max_fds,
            "max_live": self.max_live or sum(1 for w in self.workloads if w.state == "running"),
            "load1": {"mean": round(statistics.mean(loads), 2) if loads else None,
                      "max": max(loads, default=None)},
        }
        if mode == "soak":
            summary.update(self.soak_figures(t0))
        json.dump(summary, open(os.path.join(self.out, "summary.json"), "w"), indent=1)
        with open(os.path.join(self.out, "samples.csv"), "w") as f:
            f.write("t,rss_kib,fds,live,load1,cpu_ticks,rotations,rotations_seen\n")
            for s in self.samples:
                f.write(",".join("" if s[k] is None else str(s[k]) for k in
                                 ("t", "rss_kib", "fds", "live", "load1", "cpu_ticks",
                                  "rotations", "rotations_seen")) + "\n")
        if mode == "soak":
            self.write_plot_data(t0)
        self.print_summary(summary)
        if mode == "soak":
            return 1 if self.violations or not summary.get("rotations_in_time", False) else 0
        return 1 if daemons or self.injector_error else 0

    def soak_figures(self, t0):
        """Memory growth after warm-up, CPU per rotation, descriptor range, rotations in
        time."""
        a = self.args
        warm = [s for s in self.samples if s["t"] >= t0 + a.warmup and s["rss_kib"]]
        out = {}
        if len(warm) >= 2:
            first, last = warm[0], warm[-1]
            out["rss_after_warmup_kib"] = first["rss_kib"]
            out["rss_end_kib"] = last["rss_kib"]
            out["rss_growth_kib"] = last["rss_kib"] - first["rss_kib"]
            xs = [s["t"] - first["t"] for s in warm]
            ys = [s["rss_kib"] for s in warm]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
            out["rss_slope_kib_per_hour"] = round(slope * 3600, 1)
            fds = [s["fds"] for s in warm if s["fds"] is not None]
            out["fds_min"], out["fds_max"] = min(fds), max(fds)
            rot = [s for s in warm if s["rotations"] is not None and s["cpu_ticks"] is not None]
            if len(rot) >= 2 and rot[-1]["rotations"] > rot[0]["rotations"]:
                n = rot[-1]["rotations"] - rot[0]["rotations"]
                cpu = (rot[-1]["cpu_ticks"] - rot[0]["cpu_ticks"]) / CLK_TCK
                out["daemon_rotations"] = int(n)
                out["daemon_cpu_s"] = round(cpu, 2)
                out["cpu_ms_per_rotation"] = round(cpu / n * 1000, 3)
        # A rotation counts as in time when the workload saw the new certificate before the
        # old one was past its rotation point by more than SPIRE's own jitter (a tenth of the
        # half-life), the agent's sync interval and our one-second sampling.
        lifetime = a.ttl + BACKDATE
        allowed = lifetime / 2 * 0.1 + a.agent_sync + 1 + 1
        late = [x for x in self.rotation_lags if x > allowed]
        out["rotation_allowed_lag_s"] = round(allowed, 1)
        out["rotations_late"] = len(late)
        out["rotations_in_time"] = bool(self.rotation_lags) and not late
        out["expected_rotations"] = round(
            sum(1 for w in self.workloads if w.state == "running") * a.seconds / (lifetime / 2))
        return out

    def write_plot_data(self, t0):
        """OUT/plot.csv for lib/soak.gnuplot: per sample, minutes, RSS (MiB), descriptors,
        rotations per minute over the last minute, load."""
        rows = [s for s in self.samples if s["rss_kib"] and s["rotations"] is not None]
        with open(os.path.join(self.out, "plot.csv"), "w") as f:
            f.write("minutes,rss_mib,fds,rotations_per_min,load1\n")
            j = 0
            for s in rows:
                while rows[j]["t"] < s["t"] - 60:
                    j += 1
                span = s["t"] - rows[j]["t"]
                rate = (s["rotations"] - rows[j]["rotations"]) * 60 / span if span > 0 else 0
                f.write(f"{(s['t'] - t0) / 60:.3f},{s['rss_kib'] / 1024:.2f},{s['fds']},"
                        f"{rate:.1f},{s['load1']:.2f}\n")

    def print_summary(self, s):
        print(f"--- {s['mode']} summary (seed {s['seed']}, replay with NII_CHAOS_SEED={s['seed']})")
        for k, v in s.items():
            if k in ("mode",):
                continue
            print(f"  {k}: {json.dumps(v)}")
        for v in self.violations:
            print(f"  violation: {v['kind']} [{'daemon' if v['daemons_doing'] else 'runtime'}] "
                  f"{v['workload']} {v['cid'] or ''}: {v['cause']} ({v['detail'][:160]})")
        print(f"  results in {self.out}", flush=True)


def containerd_timeouts(cid):
    """containerd log lines saying it dropped a plugin on a timeout for container CID."""
    lines = []
    logs = [os.path.join(E2E, "logs", f) for f in os.listdir(os.path.join(E2E, "logs"))
            if f.startswith("containerd.log")]
    for path in logs:
        try:
            for line in open(path, errors="replace"):
                if "deadline exceeded" in line and ("closing plugin" in line or cid[:12] in line):
                    lines.append(line.strip()[:300])
        except OSError:
            pass
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["chaos", "soak"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seconds", type=int, default=120)
    p.add_argument("--pods", type=int, default=55)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--identities", type=int, default=10)
    p.add_argument("--first-uid", type=int, default=3000)
    p.add_argument("--min-life", type=float, default=20)
    p.add_argument("--max-life", type=float, default=120)
    p.add_argument("--ttl", type=int, default=60)
    p.add_argument("--agent-sync", type=float, default=1)
    p.add_argument("--fill-dir", default="")
    p.add_argument("--max-rss-mib", type=int, default=64)
    p.add_argument("--containers", type=int, default=500)
    p.add_argument("--per-pod", type=int, default=10)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--idcheck-every", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    r = Run(args)
    raise SystemExit(r.chaos() if args.mode == "chaos" else r.soak())


if __name__ == "__main__":
    main()
