"""make bench-soak: two `nextbest serve` replicas as deployed, under steady mixed traffic at 80% of
their measured capacity, with faults at fixed times (issues #5 and #16).

The production configuration: TLS (a CA and a server certificate for 127.0.0.1 made here), a
bearer token (`nextbest token`) with the recommend, consent and admin roles, JSON logs,
`serve.processes` as shipped (0: one process per core), and two replicas (two `nextbest serve`
supervisors on two ports) sharing one PostgreSQL store. The PostgreSQL is the benchmark's own:
`initdb` into a temporary directory, on a free port (as the `postgres` user when run as root),
stopped and removed at the end; never the machine's shared one.

Two model versions are trained up front into `<work-dir>/models` (ALS only, no tuning, both on
every event with different seeds: a retrain of the same size). The replicas start on the older.

1. Capacity, in the same run and configuration, of the soak's own mix of unary operations
   (below, without the streams), once every server process has ranked its customers' slates
   (its log line "slates of model ... ranked"; before it a process is still warming up): a
   closed loop of 16 tasks, half of them homed on each replica,
   3 s of warm-up then `--capacity-seconds` (15) measured; OK unary calls per second over both
   replicas (a task waits 50 ms after a refusal by admission control). Its writes are read back
   with the soak's. (RecommendProducts alone is much cheaper than the mix: 80% of its capacity
   overloads the servers with the mix.)
2. The soak: open loop (the n-th operation is sent at n / rate seconds whatever earlier calls
   are doing) at `--load` (80%) of that capacity in unary calls per second, for `--minutes` (10):
   - RecommendProducts on the email, web and app channels, one customer in ten unknown to the
     model; ScoreContent; SimilarProducts; Admin.GetModelInfo;
   - Events.RecordEvents (purchases and views, each dated uniquely so it can be found again);
   - Consent.SetConsent: one of a pool of customers grants or withdraws a purpose, then a
     RecommendProducts call to the *other* replica checks the answer follows it;
   - Consent.ForgetCustomer for a pool of customers, then a RecommendProducts call to the other
     replica checks the answer is not personal (and every later answer for them);
   - at 20 and 50 s of every minute a StreamRecommendations call of 300 customers; at 35 s a
     Lifecycle.StreamAudience call (the dormant stage, at most 300 members).
   Each operation has a home replica (in turn); a call that fails with UNAVAILABLE there is sent
   once more to the other replica (a failover, counted; a stream is started again there).
3. Faults at fixed shares of the run (at 10 minutes: minute 3, 5, 7 and 8), and the model swap:
   - 0.3: PostgreSQL stopped (`pg_ctl stop -m fast`), started again 5 s later;
   - 0.5: SIGKILL of replica B's supervisor (its processes die with it), started again at once on
     the same port;
   - 0.6: `nextbest models promote <newer>` (the swap; not a fault);
   - 0.7: a corrupt version published: a copy of the served version with `cf.npz` cut in half.
     `nextbest models promote` must refuse it; then `CURRENT` is pointed at it anyway (as a copy
     deploy would); every process of both replicas must refuse it and keep serving; then
     `nextbest models rollback` and the copy is removed;
   - 0.8: token rotation: the config's `[[serve.clients]]` replaced by a new token, SIGHUP to both
     supervisors (passed on to every process), and once every process logged its reload the
     client switches to the new token; the old one is then tried on 8 fresh connections per
     replica and must be refused every time (UNAUTHENTICATED), the new one accepted.
4. The read-back: every SetConsent, RecordEvents and ForgetCustomer acknowledged (OK) is looked
   for in the PostgreSQL tables (a SetConsent that changed a value by its audit row, found by its
   unique source, and every customer's last acknowledged consent by the stored value; each event
   by customer, product, type and time; the tombstone); missing ones are counted. A write that
   failed in a way that may have written it (UNAVAILABLE, DEADLINE_EXCEEDED) is neither.

A failed call (a status other than OK after the failover, a stream that ended early) is counted by
cause: a fault's when it overlaps the fault's window and has a status that fault causes
(`EXCUSED`: UNAVAILABLE and admission control's RESOURCE_EXHAUSTED for the database restart and
the kill, UNAUTHENTICATED for the rotation, none for the corrupt model), else "outside faults".
Per minute: calls, failed by cause, failovers, non-personal answers, p50 / p99 of the unary
calls at the client, how late the client sent, resident memory (VmRSS summed over each
replica's processes, from /proc every 5 s) and CPU (each replica's, the client's, PostgreSQL's),
the faults. `--write` replaces the `## make bench-soak` section of BENCHMARKS.md (a `### Notes`
part written by hand is kept); samples go to
`<work-dir>/samples.json`, the replicas' logs to `<work-dir>/replica-{a,b}.log`.

Exits 1 on a correctness failure: a failed call outside the fault windows, an acknowledged write
missing, a wrong answer (consent or erasure not followed, a personal answer while the store was
down, the corrupt version served, the old token accepted, an old model after the swap), a
replica that died or the swap not served. Latency and memory aims are reported, not failed on.

    python benchmarks/bench_soak.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet \\
        --content data/complete-journey/content.parquet [--minutes 10] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
# Shared server handling and report helpers; the sensitive categories of the privacy audit.
from audit_privacy import (  # noqa: E402
    SENSITIVE_CATEGORIES,
    SENSITIVE_DEPARTMENTS,
    sensitive_products,
    toml_list,
)
from bench_serve import (  # noqa: E402
    DATA_NAMES,
    READY,
    _wrap,
    machine,
    nextbest_cli,
    train_command,
    wait_serving,
    write_section,
    write_tls,
)

SECTION = "## make bench-soak"
SEEDS = (42, 43)
"""Both versions are trained on every event, with these seeds: a retrain of the same size, so
that resident memory before and after the swap compares."""
MIX = {
    "RecommendProducts": 0.59,
    "ScoreContent": 0.12,
    "SimilarProducts": 0.06,
    "RecordEvents": 0.12,
    "SetConsent": 0.06,
    "ForgetCustomer": 0.02,
    "GetModelInfo": 0.03,
}
"""Shares of the scheduled operations (a SetConsent or ForgetCustomer operation is two calls: the
write and a RecommendProducts check)."""
CHECKED = ("SetConsent", "ForgetCustomer")
CHANNELS = ("CHANNEL_EMAIL", "CHANNEL_WEB", "CHANNEL_APP")
UNKNOWN_SHARE = 0.1
UNKNOWN_CUSTOMERS = 300
CONSENT_CUSTOMERS = 300
FORGET_CUSTOMERS = 200
STREAM_AT = (20.0, 50.0)
"""Seconds within each minute at which a StreamRecommendations call starts."""
STREAM_CUSTOMERS = 300
AUDIENCE_AT = (35.0,)
"""Seconds within each minute at which a Lifecycle.StreamAudience call starts."""
AUDIENCE_MAX = 300
TIMEOUT = 10.0
"""Deadline of every unary call attempt: a hang shows as DEADLINE_EXCEEDED, a failed call."""
STREAM_TIMEOUT = 60.0
SAMPLE_EVERY = 5.0
"""Seconds between samples of the replicas' /proc status."""
CONNECTIONS = 4
"""Connections (channels) the client holds to each replica: `SO_REUSEPORT` spreads connections,
not calls, over a replica's processes."""
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
"""A client of replicas reconnects within 2 s of one coming back (gRPC's default backoff grows
to 2 minutes)."""
ROLES = "recommend,consent,admin"
FAULTS = {
    "database restart": 0.3,
    "replica kill": 0.5,
    "corrupt model": 0.7,
    "token rotation": 0.8,
}
"""When each fault starts, as a share of the run (minutes 3, 5, 7 and 8 of 10)."""
SWAP_SHARE = 0.6
EXCUSED = {
    "database restart": {"UNAVAILABLE", "RESOURCE_EXHAUSTED"},
    "replica kill": {"UNAVAILABLE", "RESOURCE_EXHAUSTED"},
    "corrupt model": set(),
    "token rotation": {"UNAUTHENTICATED"},
}
"""The statuses a fault may cause: a failed call with one of them within the fault's window is
counted as the fault's; any other failure is a failure outside the faults. UNAVAILABLE: writes
while the store is down, calls on the killed replica that failed on the other too;
RESOURCE_EXHAUSTED: admission control's refusals while the survivor carries both replicas' load,
or while the servers reconnect to the store; UNAUTHENTICATED: calls with the old token between
the reload and the client's switch."""
OUTAGE_S = 5.0
"""How long PostgreSQL stays down."""
RECOVERY_S = 5.0
"""Aim: personal answers again within this many seconds of PostgreSQL accepting connections."""
KILL_GRACE_S = 5.0
"""The kill's window ends this long after the restarted replica serves (clients reconnect)."""
TOKEN_PROBES = 8
"""Fresh connections per replica on which the old token must be refused after the rotation."""
CAPACITY_TASKS = 16
CAPACITY_WARMUP_S = 3.0
NOT_APPLIED = {"RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"}
"""Statuses of a call refused before any work: nothing of it was written."""
UNAVAILABLE_REASON = 4
"""NOT_PERSONALIZED_REASON_CONSENT_UNAVAILABLE: the store could not be read (fail closed)."""
ERASED_REASON = 3


# --- pure helpers (tests/test_bench_soak.py) -----------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A fault's window (seconds from the start of the soak)."""

    fault: str
    start: float
    end: float


def fault_times(seconds: float, swap: bool = True) -> dict[str, float]:
    """When each fault (and the model swap, unless `swap` is false) starts: `FAULTS`' shares of
    the run, in seconds."""
    times = {name: round(share * seconds, 1) for name, share in FAULTS.items()}
    if swap:
        times["model swap"] = round(SWAP_SHARE * seconds, 1)
    return dict(sorted(times.items(), key=lambda kv: kv[1]))


def cause(code: str, sent: float, done: float, windows: Iterable[Window]) -> str:
    """Why a call ended with `code`: '' when OK; the fault whose window [start, end] the call
    (sent .. done) overlaps and whose kind of failure `code` is; else `outside faults`."""
    if code == "OK":
        return ""
    for w in windows:
        if sent <= w.end and done >= w.start and code in EXCUSED.get(w.fault, ()):
            return w.fault
    return "outside faults"


def fault_minutes(windows: Iterable[Window], minutes: int) -> dict[int, list[str]]:
    """Minute (1-based) → the faults whose windows overlap it."""
    out: dict[int, list[str]] = defaultdict(list)
    for w in windows:
        first = int(max(w.start, 0) // 60)
        last = min(int(max(w.end, w.start) // 60), minutes - 1)
        for m in range(first, last + 1):
            if w.fault not in out[m + 1]:
                out[m + 1].append(w.fault)
    return dict(out)


def p99_drift(p99: dict[int, float], baseline: int, excepted: Iterable[int]) -> dict[int, float]:
    """p99 of each minute over the baseline minute's, the excepted minutes (and the baseline)
    left out."""
    skip = set(excepted) | {baseline}
    base = p99[baseline]
    return {m: v / base for m, v in sorted(p99.items()) if m not in skip and base > 0}


def growth(before: float, after: float) -> float:
    return after / before - 1.0 if before > 0 else 0.0


def recovery(
    answers: Iterable[tuple[float, bool, int]], up_at: float
) -> tuple[float | None, float | None]:
    """From (done, personalized, not_personalized_reason) of one replica's answers: seconds from
    `up_at` (the store back) to its first personal answer (None: none came), and to its last
    fail-closed answer (reason CONSENT_UNAVAILABLE) after `up_at` (None: none after it)."""
    after = sorted(a for a in answers if a[0] >= up_at)
    first = next((done - up_at for done, personal, _ in after if personal), None)
    closed = [done - up_at for done, _, reason in after if reason == UNAVAILABLE_REASON]
    return first, (max(closed) if closed else None)


def missing_writes(acked: Iterable[tuple], stored: set[tuple]) -> list[tuple]:
    """The acknowledged writes (keys) not found in the store (duplicates counted once)."""
    return sorted({key for key in acked if key not in stored}, key=repr)


# --- our own PostgreSQL --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not candidates:
        raise SystemExit("bench-soak needs PostgreSQL's server programs (initdb, pg_ctl)")
    return candidates[-1].parent


AUTOVACUUM = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC LOG:  automatic "
    r'(?P<kind>vacuum|analyze) of table "(?P<table>[^"]+)"',
    re.MULTILINE,
)
"""An autovacuum line of the soak's PostgreSQL log (`log_line_prefix = '%m '`, UTC)."""


class OwnPostgres:
    """A PostgreSQL cluster of the benchmark's own in a temporary directory, on a free port;
    run as the `postgres` user when this process is root (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nextbest-soak-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.bindir = pg_bindir()
        self.as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres?schema=nextbest_soak"

    @property
    def conninfo(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bindir / program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)}: {done.stderr.strip() or done.stdout}")

    def init(self) -> None:
        if self.as_root:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as fh:
            fh.write(
                f"\n# bench-soak\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                # every autovacuum and autoanalyze in the log, with its time (`autovacuums`)
                "log_autovacuum_min_duration = 0\nlog_line_prefix = '%m '\nlog_timezone = 'UTC'\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def pids(self) -> list[int]:
        """The postmaster and its backends (none while it is down)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return descendants(pid) if proc_status(pid) else []

    def autovacuums(self, t0_wall: float) -> list[tuple[float, str, str]]:
        """(s from the start of the run, vacuum or analyze, table) of each automatic vacuum
        and analyze in the server's log."""
        found = []
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        for match in AUTOVACUUM.finditer(text):
            at = dt.datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
            found.append((at.timestamp() - t0_wall, match["kind"], match["table"]))
        return found

    def close(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


# --- the replicas --------------------------------------------------------------------------------


def children_of() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    out: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        out[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    tree = children_of()
    out, todo = [pid], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def proc_status(pid: int) -> dict | None:
    """VmRSS and RssAnon (MiB), threads, open files and CPU seconds of a process; None if gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    values = dict(line.split(":", 1) for line in status if ":" in line)
    if "VmRSS" not in values:  # a zombie
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "rss": int(values["VmRSS"].split()[0]) / 1024.0,
        "anon": int(values["RssAnon"].split()[0]) / 1024.0,
        "threads": int(values["Threads"]),
        "fds": fds,
        "cpu": (int(stat[11]) + int(stat[12])) / tick,
    }


class Replica:
    """One `nextbest serve` supervisor (and its server processes), restartable on its port; its
    stderr (the JSON log) appended to `log_path` across restarts."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        log_path.write_text("")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int = 0, timeout: float = 180.0) -> str:
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(
                [*self.cmd, "--port", str(port)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
                env={**os.environ, **self.env},
            )
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                proc.kill()
                raise RuntimeError(
                    f"replica {self.name}: not ready after {timeout:.0f} s"
                ) from None
            if line is None:
                proc.wait()
                tail = self.log_path.read_text()[-3000:]
                raise RuntimeError(f"replica {self.name} exited ({proc.returncode}):\n{tail}")
            match = READY.search(line)
            if match:
                break
        self.proc, self.port = proc, int(match.group(2))
        self.starts += 1
        return self.address

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.alive() else []

    def servers(self) -> list[int]:
        """The server processes (the supervisor's children that are `nextbest serve` ones; a
        `serve.processes = 1` replica is its own server)."""
        if not self.alive():
            return []
        kids = [
            p
            for p in children_of().get(self.proc.pid, [])
            if "multiprocessing.spawn" in _cmdline(p) and "resource_tracker" not in _cmdline(p)
        ]
        return kids or [self.proc.pid]

    def kill(self) -> None:
        """SIGKILL of the supervisor; waits until its server processes are gone too."""
        servers = self.servers()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 20
        while any(proc_status(p) for p in servers) and time.monotonic() < deadline:
            time.sleep(0.05)

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_mark(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, mark: int) -> list[dict]:
        with open(self.log_path, "rb") as fh:
            fh.seek(mark)
            text = fh.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line})
        return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def wait_logged(
    replicas: list[Replica], marks: list[int], text: str, timeout: float = 30.0
) -> list[float]:
    """Wait until every server process of each replica logged a line whose message starts with
    `text` after `marks`; the epoch time of each replica's last such line (nan: not all did)."""
    deadline = time.monotonic() + timeout
    while True:
        done, times = True, []
        for replica, mark in zip(replicas, marks, strict=True):
            lines = [x for x in replica.log_since(mark) if str(x.get("msg", "")).startswith(text)]
            pids = {x.get("pid") for x in lines}
            if len(pids) < len(replica.servers()):
                done = False
                times.append(float("nan"))
            else:
                times.append(max(dt.datetime.fromisoformat(x["ts"]).timestamp() for x in lines))
        if done or time.monotonic() > deadline:
            return times
        await asyncio.sleep(0.1)


# --- the config, tokens and model versions -------------------------------------------------------


def make_token() -> tuple[str, str]:
    """A client token as a user makes one, with `nextbest token`: (token, its sha256)."""
    cmd = [*nextbest_cli(), "token", "--name", "soak", "--roles", ROLES]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = [x.strip() for x in out.splitlines()]
    token = next(x for x in lines if x.startswith("nb_"))
    digest = next(x for x in lines if x.startswith("token_sha256")).split('"')[1]
    return token, digest


def train_config() -> str:
    """The training's settings: the products' sensitivity is learned into the model then."""
    return f"""# Written by benchmarks/bench_soak.py (make bench-soak): the versions' training.
[train]
candidates = ["als"]
tune = false

[policy]
default_consent = "allow"
sensitive_categories = {toml_list(SENSITIVE_CATEGORIES)}
sensitive_departments = {toml_list(SENSITIVE_DEPARTMENTS)}
"""


def serve_config(store: str, cert: Path, key: Path, digest: str) -> str:
    return f"""# Written by benchmarks/bench_soak.py (make bench-soak): both replicas' config.
[policy]
default_consent = "allow"
sensitive_categories = {toml_list(SENSITIVE_CATEGORIES)}
sensitive_departments = {toml_list(SENSITIVE_DEPARTMENTS)}

[serve]
metrics_port = 0
store = "{store}"
tls_cert = "{cert}"
tls_key = "{key}"
log_format = "json"

[[serve.clients]]
name = "soak"
token_sha256 = "{digest}"
roles = {json.dumps(ROLES.split(","))}
"""


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_versions(
    args: argparse.Namespace, config: Path, models_dir: Path
) -> tuple[str, str, bool]:
    """The older and the newer version in `models_dir` and whether they were trained now:
    reused when exactly two are there (and not `--retrain`), else trained (on every event, one
    version per seed of `SEEDS`)."""
    from nextbest.store.artifacts import list_versions

    if models_dir.exists():
        for leftover in models_dir.glob("*-corrupt"):  # of an interrupted run
            shutil.rmtree(leftover)
        versions = sorted(v["version"] for v in list_versions(models_dir))
        if len(versions) == 2 and not args.retrain:
            print(f"reusing the versions in {models_dir} (--retrain to train again)", flush=True)
            return versions[0], versions[1], False
        shutil.rmtree(models_dir)
    for seed in SEEDS:
        cmd = train_command(config, str(args.events), args.catalog, models_dir, args.content)
        print(f"training with train.seed = {seed}:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, "NEXTBEST_TRAIN__SEED": str(seed)}
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    versions = sorted(v["version"] for v in list_versions(models_dir))
    assert len(versions) == 2, versions
    return versions[0], versions[1], True


def models_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [*nextbest_cli(), "models", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)


# --- the schedule --------------------------------------------------------------------------------


@dataclass
class Inputs:
    known: list[str]
    """Customers both versions know."""
    consent: list[str]
    """Customers whose consent changes."""
    forget: list[str]
    """Customers who ask to be forgotten (ForgetCustomer)."""
    writers: list[str]
    """Known customers whose events are recorded (neither of the two pools above)."""
    products: list[str]
    content: list[str]
    sensitive: set[str]


@dataclass
class Op:
    at: float
    kind: str
    home: int
    """The replica tried first (0 = A, 1 = B)."""
    args: dict = field(default_factory=dict)


def schedule(inputs: Inputs, rate: float, seconds: float, seed: int = 5) -> list[Op]:
    """The operations in send order: `rate` per second of the `MIX`, plus the streams and the
    audiences; home replicas in turn."""
    rng = np.random.default_rng(seed)
    kinds = list(MIX)
    shares = np.asarray([MIX[k] for k in kinds])
    n = int(rate * seconds)
    picks = rng.choice(len(kinds), size=n, p=shares / shares.sum())
    ops: list[Op] = []
    turn = forgets = events = 0

    def customer(unknown_share: float = UNKNOWN_SHARE) -> str:
        if rng.random() < unknown_share:
            return f"soak-unknown-{rng.integers(UNKNOWN_CUSTOMERS)}"
        return inputs.known[rng.integers(len(inputs.known))]

    def products(k: int) -> list[str]:
        return [inputs.products[i] for i in rng.choice(len(inputs.products), k, replace=False)]

    for i, pick in enumerate(picks):
        kind, at = kinds[pick], i / rate
        if kind == "RecommendProducts":
            args = {
                "customer": customer(),
                "channel": CHANNELS[rng.integers(3)],
                "limit": int(rng.choice([5, 10, 20])),
            }
        elif kind == "ScoreContent":
            guides = rng.choice(len(inputs.content), 5, replace=False)
            args = {
                "customer": customer(),
                "channel": CHANNELS[rng.integers(3)],
                "content": [inputs.content[g] for g in guides],
                "inline": products(3),
            }
        elif kind == "SimilarProducts":
            args = {"products": products(int(rng.integers(1, 4)))}
        elif kind == "RecordEvents":
            who = (
                f"soak-unknown-{rng.integers(UNKNOWN_CUSTOMERS)}"
                if rng.random() < 0.3
                else inputs.writers[rng.integers(len(inputs.writers))]
            )
            batch = []
            for p in products(int(rng.integers(1, 6))):
                batch.append(("purchase" if rng.random() < 0.4 else "view", p, events))
                events += 1
            args = {"customer": who, "events": batch, "channel": ("web", "app", "store")[i % 3]}
        elif kind == "SetConsent":
            args = {
                "customer": inputs.consent[turn % len(inputs.consent)],
                "purpose": str(
                    rng.choice(["personalization", "sensitive", "behavioral"], p=[0.4, 0.4, 0.2])
                ),
                "channel": CHANNELS[rng.integers(3)],
                "source": f"soak-consent-{i}",
            }
            turn += 1
        elif kind == "ForgetCustomer":
            args = {
                "customer": inputs.forget[forgets % len(inputs.forget)],
                "channel": CHANNELS[rng.integers(3)],
                "source": f"soak-forget-{i}",
            }
            forgets += 1
        else:
            args = {}
        ops.append(Op(at, kind, i % 2, args))
    k = 0
    for minute in range(int(np.ceil(seconds / 60))):
        for second in STREAM_AT:
            at = minute * 60 + second
            if at < seconds:
                lo = (k * STREAM_CUSTOMERS) % len(inputs.known)
                batch = (inputs.known * 2)[lo : lo + STREAM_CUSTOMERS - 10]
                batch += [
                    f"soak-unknown-{j % UNKNOWN_CUSTOMERS}" for j in range(k * 10, k * 10 + 10)
                ]
                ops.append(Op(at, "StreamRecommendations", k % 2, {"customers": batch}))
                k += 1
        for second in AUDIENCE_AT:
            at = minute * 60 + second
            if at < seconds:
                ops.append(Op(at, "StreamAudience", minute % 2, {"channel": CHANNELS[minute % 3]}))
    return sorted(ops, key=lambda op: op.at)


def calls_per_op() -> float:
    """Unary calls per scheduled operation of the `MIX` (the checked writes are two)."""
    total = sum(MIX.values())
    return sum(share * (2 if kind in CHECKED else 1) for kind, share in MIX.items()) / total


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    at: float
    """Scheduled send time (seconds from the start)."""
    sent: float
    ms: float
    code: str
    """OK or the gRPC status name (after the failover); a stream that ended early: its reason."""
    replica: int
    """The replica that answered (or failed last)."""
    failover: bool = False
    """The first attempt failed with UNAVAILABLE and the call went to the other replica."""
    details: str = ""
    personalized: bool | None = None
    reason: int = 0
    version: str = ""
    token: str = "first"
    """The token of the call's last attempt: `first` or `rotated`."""

    @property
    def done(self) -> float:
        return self.sent + self.ms / 1000.0


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    """Answers that break a rule the soak checks, with what broke."""
    acked: dict[str, list[tuple]] = field(default_factory=lambda: defaultdict(list))
    """Acknowledged writes by kind (consent, event, forget), as the keys they are looked up by."""
    samples: list[dict] = field(default_factory=list)
    streams: list[dict] = field(default_factory=list)
    audiences: list[dict] = field(default_factory=list)
    faults: dict[str, dict] = field(default_factory=dict)
    """Each fault's (and the swap's) times (s from the start) and findings."""
    t0_wall: float = 0.0
    consent_changes: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)


class Stubs:
    def __init__(self, channel):
        from nextbest.v1 import (
            admin_pb2_grpc,
            consent_pb2_grpc,
            events_pb2_grpc,
            lifecycle_pb2_grpc,
            recommender_pb2_grpc,
        )

        self.channel = channel
        self.recommender = recommender_pb2_grpc.RecommenderStub(channel)
        self.consent = consent_pb2_grpc.ConsentStub(channel)
        self.events = events_pb2_grpc.EventsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.lifecycle = lifecycle_pb2_grpc.LifecycleStub(channel)


def secure_channel(address: str, ca: bytes):
    import grpc

    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.aio.secure_channel(address, creds, options=CHANNEL_OPTIONS)


class Client:
    """`CONNECTIONS` TLS channels to each replica; the bearer token on every call's metadata (so
    that it can change mid-run); failover to the other replica on UNAVAILABLE."""

    def __init__(self, addresses: list[str], ca: bytes, token: str, inputs: Inputs, run: Run):
        self.stubs = [[Stubs(secure_channel(a, ca)) for _ in range(CONNECTIONS)] for a in addresses]
        self.ca = ca
        self.token, self.token_name = token, "first"
        self.inputs = inputs
        self.run = run
        self.t0 = time.perf_counter()
        self.turn = 0
        self.granted: dict[tuple[str, str], bool] = {}
        """Consent the client set; unset = the default (allow)."""
        self.uncertain: set[tuple[str, str]] = set()
        """(customer, purpose) whose last SetConsent failed in a way that may have written it."""
        self.final: dict[tuple[str, str], bool | None] = {}
        """(customer, purpose) → the value the store must end with (None: not known)."""
        self.changes: Counter = Counter()
        """Acknowledged personalization changes per customer (audience checks)."""
        self.erased: dict[str, float] = {}
        """Customers forgotten (acknowledged) → when."""
        self.base_time = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
        """Event n is dated base_time + n ms: each event is found again by its time."""

    async def close(self) -> None:
        for chans in self.stubs:
            for s in chans:
                await s.channel.close()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def pick(self, replica: int) -> Stubs:
        self.turn += 1
        return self.stubs[replica][self.turn % CONNECTIONS]

    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),)

    async def failover(self, home: int, attempt) -> tuple[int, bool, Any]:
        """`await attempt(replica)` on the home replica and, when that fails UNAVAILABLE, once
        more on the other one (a failover): (the replica of the last attempt, whether it failed
        over, that attempt's AioRpcError or None)."""
        import grpc

        for n, replica in enumerate((home, 1 - home)):
            try:
                await attempt(replica)
            except grpc.aio.AioRpcError as exc:
                if n == 0 and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                return replica, n > 0, exc
            return replica, n > 0, None
        raise AssertionError("the second attempt always returns")

    async def call(
        self, kind: str, at: float, home: int, service: str, method: str, request
    ) -> tuple[object, Call]:
        sent = self.now()
        reply, token = None, self.token_name

        async def attempt(replica: int) -> None:
            nonlocal reply, token
            token = self.token_name
            stub = getattr(self.pick(replica), service)
            reply = await getattr(stub, method)(request, timeout=TIMEOUT, metadata=self.metadata())

        replica, failover, exc = await self.failover(home, attempt)
        code, details = ("OK", "") if exc is None else (exc.code().name, exc.details() or "")
        record = Call(
            kind,
            at,
            sent,
            (self.now() - sent) * 1000.0,
            code,
            replica,
            failover,
            details[:200],
            token=token,
        )
        self.run.calls.append(record)
        return reply, record

    async def recommend(self, at: float, home: int, customer: str, channel: str, limit: int):
        from nextbest.v1 import recommender_pb2 as pb

        request = pb.RecommendProductsRequest(
            customer_id=customer, channel=pb.Channel.Value(channel), limit=limit
        )
        reply, record = await self.call(
            "RecommendProducts", at, home, "recommender", "RecommendProducts", request
        )
        if reply is not None:
            record.personalized = reply.personalized
            record.reason = int(reply.not_personalized_reason)
            record.version = reply.model_version
            erased = self.erased.get(customer)
            if erased is not None and erased < record.sent and reply.personalized:
                self.run.wrong.append(f"{customer}: personal answer after ForgetCustomer")
        return reply, record

    async def op(self, op: Op) -> None:
        from nextbest.v1 import admin_pb2
        from nextbest.v1 import recommender_pb2 as pb

        a = op.args
        if op.kind == "RecommendProducts":
            await self.recommend(op.at, op.home, a["customer"], a["channel"], a["limit"])
        elif op.kind == "ScoreContent":
            candidates = [pb.ContentCandidate(content_id=c) for c in a["content"]]
            candidates.append(
                pb.ContentCandidate(content_id="inline", title="inline", product_ids=a["inline"])
            )
            request = pb.ScoreContentRequest(
                customer_id=a["customer"],
                candidates=candidates,
                channel=pb.Channel.Value(a["channel"]),
            )
            reply, record = await self.call(
                op.kind, op.at, op.home, "recommender", "ScoreContent", request
            )
            if reply is not None:
                record.personalized = reply.personalized
                record.reason = int(reply.not_personalized_reason)
                record.version = reply.model_version
                if len(reply.items) != len(candidates):
                    self.run.wrong.append(f"ScoreContent: {len(reply.items)} of {len(candidates)}")
        elif op.kind == "SimilarProducts":
            request = pb.SimilarProductsRequest(product_ids=a["products"])
            await self.call(op.kind, op.at, op.home, "recommender", "SimilarProducts", request)
        elif op.kind == "RecordEvents":
            await self.record_events(op)
        elif op.kind == "SetConsent":
            await self.set_consent(op)
        elif op.kind == "ForgetCustomer":
            await self.forget(op)
        elif op.kind == "GetModelInfo":
            request = admin_pb2.GetModelInfoRequest()
            await self.call(op.kind, op.at, op.home, "admin", "GetModelInfo", request)
        elif op.kind == "StreamRecommendations":
            await self.stream(op)
        elif op.kind == "StreamAudience":
            await self.audience(op)
        else:
            raise ValueError(op.kind)

    async def record_events(self, op: Op) -> None:
        from google.protobuf.timestamp_pb2 import Timestamp

        from nextbest.v1 import events_pb2

        a = op.args
        events, keys = [], []
        for kind, product, n in a["events"]:
            when = self.base_time + dt.timedelta(milliseconds=n)
            stamp = Timestamp()
            stamp.FromDatetime(when)
            events.append(
                events_pb2.Event(
                    customer_id=a["customer"],
                    product_id=product,
                    event_type=kind,
                    channel=a["channel"],
                    timestamp=stamp,
                )
            )
            keys.append(("event", a["customer"], product, kind, when.isoformat()))
        request = events_pb2.RecordEventsRequest(events=events)
        reply, _ = await self.call(op.kind, op.at, op.home, "events", "RecordEvents", request)
        if reply is None:
            return
        self.run.acked["event"].extend(keys)
        self.run.events["recorded"] += reply.recorded
        self.run.events["ignored without consent"] += reply.ignored_without_consent
        self.run.events["ignored erased"] += reply.ignored_erased
        if reply.recorded != len(events):
            self.run.wrong.append(
                f"RecordEvents of {a['customer']} (consent allowed): {reply.recorded} of "
                f"{len(events)} recorded"
            )

    async def set_consent(self, op: Op) -> None:
        """Flip one purpose, then check the customer's next answer, from the other replica,
        follows it."""
        from nextbest.v1 import consent_pb2

        customer, purpose = op.args["customer"], op.args["purpose"]
        granted = not self.granted.get((customer, purpose), True)
        request = consent_pb2.SetConsentRequest(
            customer_id=customer,
            purpose=consent_pb2.Purpose.Value(f"PURPOSE_{purpose.upper()}"),
            granted=granted,
            source=op.args["source"],
        )
        reply, record = await self.call(
            "SetConsent", op.at, op.home, "consent", "SetConsent", request
        )
        key = (customer, purpose)
        if reply is None:
            if record.code not in NOT_APPLIED:  # it may have been written before it failed
                self.uncertain.add(key)
                self.final[key] = None
            return
        if reply.changed:
            self.run.acked["consent"].append(
                ("consent", customer, purpose, granted, request.source)
            )
        elif record.failover or key in self.uncertain:
            # The first attempt, or an earlier call that failed, may have written it already.
            self.run.consent_changes["unchanged after an uncertain write"] += 1
        else:
            self.run.wrong.append(f"SetConsent {customer} {purpose}={granted}: changed = false")
        self.uncertain.discard(key)
        self.final[key] = granted
        self.granted[key] = granted
        if purpose == "personalization":
            self.changes[customer] += 1
        self.run.consent_changes[f"{purpose} {'granted' if granted else 'withdrawn'}"] += 1
        answer, check = await self.recommend(
            op.at, 1 - record.replica, customer, op.args["channel"], 20
        )
        if answer is None or any(k[0] == customer for k in self.uncertain):
            return
        personal = self.granted.get((customer, "personalization"), True)
        sensitive = self.granted.get((customer, "sensitive"), True)
        fail_closed = check.reason == UNAVAILABLE_REASON
        if answer.personalized != personal and not (fail_closed and not answer.personalized):
            self.run.wrong.append(
                f"{customer} after {purpose}={granted}: personalized = {answer.personalized} "
                f"with personalization consent {personal} ({list(answer.decisions)})"
            )
        shown = {item.product_id for item in answer.items} & self.inputs.sensitive
        if shown and not sensitive:
            self.run.wrong.append(
                f"{customer} after {purpose}={granted}: sensitive {sorted(shown)} shown without "
                "sensitive consent"
            )

    async def forget(self, op: Op) -> None:
        """Forget one customer, then check their next answer, from the other replica, is not
        personal."""
        from nextbest.v1 import consent_pb2

        customer = op.args["customer"]
        request = consent_pb2.ForgetCustomerRequest(customer_id=customer, source=op.args["source"])
        reply, record = await self.call(
            "ForgetCustomer", op.at, op.home, "consent", "ForgetCustomer", request
        )
        if reply is None:
            return
        self.run.acked["forget"].append(("forget", customer))
        self.erased.setdefault(customer, record.done)
        answer, _ = await self.recommend(
            op.at, 1 - record.replica, customer, op.args["channel"], 10
        )
        if answer is not None and answer.personalized:
            self.run.wrong.append(f"{customer}: personal right after ForgetCustomer")

    async def stream(self, op: Op) -> None:

        from nextbest.v1 import recommender_pb2 as pb

        customers = op.args["customers"]
        sent = self.now()
        erased = {c for c, t in self.erased.items() if t < sent}

        async def requests():
            for k, customer in enumerate(customers):
                channel = pb.Channel.Value(CHANNELS[k % 3])
                yield pb.RecommendProductsRequest(
                    customer_id=customer, channel=channel, request_id=str(k)
                )

        answers, errors, personal, code, versions = 0, 0, 0, "OK", Counter()
        token = self.token_name

        async def attempt(replica: int) -> None:
            nonlocal answers, errors, personal, code, versions, token
            answers, errors, personal, code, versions = 0, 0, 0, "OK", Counter()
            token = self.token_name
            call = self.pick(replica).recommender.StreamRecommendations(
                requests(), timeout=STREAM_TIMEOUT, metadata=self.metadata()
            )
            async for reply in call:
                if reply.HasField("error"):
                    errors += 1
                    code = f"stream error {reply.error.code}"
                elif reply.request_id != str(answers) or not reply.items:
                    self.run.wrong.append(f"stream answer {answers}: {reply}")
                elif reply.personalized and reply.customer_id in erased:
                    self.run.wrong.append(f"stream: {reply.customer_id} erased, personal")
                answers += 1
                personal += reply.personalized
                versions[reply.model_version] += 1

        replica, failover, exc = await self.failover(op.home, attempt)
        if exc is not None:
            code = exc.code().name
        ms = (self.now() - sent) * 1000.0
        if code == "OK" and answers != len(customers):
            code = f"stream: {answers} answers to {len(customers)} requests"
        version = versions.most_common(1)[0][0] if versions else ""
        self.run.calls.append(
            Call(op.kind, op.at, sent, ms, code, replica, failover, version=version, token=token)
        )
        self.run.streams.append(
            {
                "at": op.at,
                "customers": len(customers),
                "answers": answers,
                "errors": errors,
                "personalized": personal,
                "s": ms / 1000.0,
                "code": code,
                "versions": dict(versions),
                "replica": replica,
                "failover": failover,
            }
        )

    async def audience(self, op: Op) -> None:
        """Lifecycle.StreamAudience of the dormant stage: members must have personalization
        consent and not be erased (for customers whose consent did not change meanwhile)."""

        from nextbest.v1 import lifecycle_pb2
        from nextbest.v1 import recommender_pb2 as pb

        request = lifecycle_pb2.StreamAudienceRequest(
            stage=lifecycle_pb2.STAGE_DORMANT,
            channel=pb.Channel.Value(op.args["channel"]),
            limit=5,
            max_customers=AUDIENCE_MAX,
        )
        sent = self.now()
        before = Counter(self.changes)
        withdrawn = {
            c
            for (c, p), g in self.granted.items()
            if p == "personalization" and not g and (c, p) not in self.uncertain
        }
        erased = {c for c, t in self.erased.items() if t < sent}
        members: list[str] = []
        token = self.token_name

        async def attempt(replica: int) -> None:
            nonlocal members, token
            members, token = [], self.token_name
            call = self.pick(replica).lifecycle.StreamAudience(
                request, timeout=STREAM_TIMEOUT, metadata=self.metadata()
            )
            async for member in call:
                members.append(member.customer_id)

        replica, failover, exc = await self.failover(op.home, attempt)
        code = "OK" if exc is None else exc.code().name
        ms = (self.now() - sent) * 1000.0
        for c in members:
            if c in erased:
                self.run.wrong.append(f"audience: {c} erased")
            elif c in withdrawn and self.changes[c] == before[c]:
                self.run.wrong.append(f"audience: {c} without personalization consent")
        self.run.calls.append(Call(op.kind, op.at, sent, ms, code, replica, failover, token=token))
        self.run.audiences.append(
            {"at": op.at, "members": len(members), "s": ms / 1000.0, "code": code}
        )

    async def model_versions(self) -> list[list[str]]:
        """GetModelInfo on every connection of each replica: the versions named ('' = failed)."""
        import grpc

        from nextbest.v1 import admin_pb2

        out = []
        for chans in self.stubs:
            names = []
            for s in chans:
                name = ""
                for _ in range(20):  # admission control may refuse one under load: again
                    try:
                        reply = await s.admin.GetModelInfo(
                            admin_pb2.GetModelInfoRequest(),
                            timeout=TIMEOUT,
                            metadata=self.metadata(),
                        )
                        name = reply.version
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            break
                        await asyncio.sleep(0.1)
                names.append(name)
            out.append(names)
        return out

    async def probe_token(self, address: str, token: str, connections: int) -> Counter:
        """Status codes of one RecommendProducts call with `token` on each of `connections`
        fresh connections (a refusal by admission control is tried again: it says nothing of
        the token)."""
        import grpc

        from nextbest.v1 import recommender_pb2 as pb
        from nextbest.v1 import recommender_pb2_grpc

        codes: Counter = Counter()
        for _ in range(connections):
            async with secure_channel(address, self.ca) as ch:
                stub = recommender_pb2_grpc.RecommenderStub(ch)
                for _ in range(20):
                    try:
                        await stub.RecommendProducts(
                            pb.RecommendProductsRequest(customer_id=self.inputs.known[0]),
                            timeout=TIMEOUT,
                            metadata=(("authorization", f"Bearer {token}"),),
                        )
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    if code != "RESOURCE_EXHAUSTED":
                        break
                    await asyncio.sleep(0.1)
                codes[code] += 1
        return codes


# --- the soak ------------------------------------------------------------------------------------


@dataclass
class Setup:
    replicas: list[Replica]
    pg: OwnPostgres
    ca: bytes
    config: Path
    store: str
    cert: Path
    key: Path
    models_dir: Path
    versions: tuple[str, str]
    token: str


CPU_SEEN: dict[tuple[int, int], float] = {}
"""(replica, pid) → the CPU seconds last seen: a replica's CPU counter keeps what its killed
processes used."""


def sample(setup: Setup, t: float) -> dict:
    out: dict = {"t": t, "replicas": []}
    for k, replica in enumerate(setup.replicas):
        stats = []
        for pid in replica.pids():
            status = proc_status(pid)
            if status:
                stats.append(status)
                CPU_SEEN[(k, pid)] = status["cpu"]
        out["replicas"].append(
            {
                "rss": sum(s["rss"] for s in stats),
                "anon": sum(s["anon"] for s in stats),
                "cpu": sum(v for (r, _), v in CPU_SEEN.items() if r == k),
                "threads": sum(s["threads"] for s in stats),
                "fds": sum(s["fds"] for s in stats),
                "processes": len(stats),
                "starts": replica.starts,
            }
        )
    for pid in setup.pg.pids():
        status = proc_status(pid)
        if status:
            CPU_SEEN[(-1, pid)] = status["cpu"]
    out["pg_cpu"] = sum(v for (r, _), v in CPU_SEEN.items() if r == -1)
    machine_cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = os.times()
    out["client_cpu"] = own.user + own.system
    out["machine_cpu"] = (sum(machine_cpu) - machine_cpu[3] - machine_cpu[4]) / os.sysconf(
        "SC_CLK_TCK"
    )
    out["load"] = float(Path("/proc/loadavg").read_text().split()[0])
    return out


async def soak(
    setup: Setup, client: Client, ops: list[Op], seconds: float, times: dict[str, float]
) -> Run:
    run = client.run = Run()
    client.t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    replicas = setup.replicas
    pending: set[asyncio.Task] = set()

    def launch(coro) -> None:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    async def until(t: float) -> None:
        await asyncio.sleep(max(client.t0 + t - time.perf_counter(), 0))

    def blocking(fn, *args):
        return loop.run_in_executor(None, fn, *args)

    async def sampler() -> None:
        k = 0
        while True:
            await until(k * SAMPLE_EVERY)
            run.samples.append(sample(setup, client.now()))
            k += 1

    async def database_restart() -> None:
        f = run.faults["database restart"] = {"start": client.now()}
        await blocking(setup.pg.stop)
        f["down"] = client.now()
        await asyncio.sleep(OUTAGE_S)
        f["starting"] = client.now()
        await blocking(setup.pg.start)
        f["up"] = client.now()
        f["end"] = f["up"] + RECOVERY_S

    async def replica_kill() -> None:
        victim = replicas[1]
        f = run.faults["replica kill"] = {"start": client.now(), "pid": victim.proc.pid}
        await blocking(victim.kill)
        f["killed"] = client.now()
        await blocking(victim.start, victim.port)
        f["restarted"] = client.now()
        await wait_serving(victim.address, security=(setup.ca, None))
        f["serving"] = client.now()
        f["end"] = f["serving"] + KILL_GRACE_S

    async def model_swap() -> None:
        f = run.faults["model swap"] = {"start": client.now()}
        marks = [r.log_mark() for r in replicas]
        done = await blocking(
            models_cli, "promote", setup.versions[1], "--models-dir", str(setup.models_dir)
        )
        f["promoted"] = client.now()
        if done.returncode != 0:
            run.wrong.append(f"model swap: promote failed: {done.stderr.strip()[-300:]}")
            return
        swapped = await wait_logged(replicas, marks, f"serving model {setup.versions[1]}", 90)
        f["swapped"] = [t - run.t0_wall for t in swapped]
        f["end"] = max(f["swapped"]) if not any(np.isnan(f["swapped"])) else client.now()

    async def corrupt_model() -> None:
        from nextbest.store.artifacts import current_version, set_current

        models = setup.models_dir
        f = run.faults["corrupt model"] = {"start": client.now()}
        served = current_version(models)
        name = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")[:-3] + "Z-corrupt"
        f["version"], f["served"] = name, served

        def publish() -> None:
            shutil.copytree(models / served, models / name)
            manifest = json.loads((models / name / "manifest.json").read_text())
            manifest["version"] = name
            (models / name / "manifest.json").write_text(json.dumps(manifest))
            artifact = models / name / "cf.npz"
            data = artifact.read_bytes()
            artifact.write_bytes(data[: len(data) // 2])  # a truncated copy

        await blocking(publish)
        marks = [r.log_mark() for r in replicas]
        done = await blocking(models_cli, "promote", name, "--models-dir", str(models))
        f["promote_rc"] = done.returncode
        f["promote_said"] = (done.stderr.strip().splitlines() or [""])[-1][:300]
        if done.returncode == 0:
            run.wrong.append(f"`nextbest models promote {name}` accepted a truncated model")
        await blocking(set_current, models, name)  # as a deploy that copies CURRENT would
        f["current_at"] = client.now()
        refused = await wait_logged(replicas, marks, f"refused model {name}", 30)
        f["refused"] = [t - run.t0_wall for t in refused]
        if any(np.isnan(refused)):
            run.wrong.append(f"corrupt model {name}: not refused by every server process")
        f["versions_after"] = await client.model_versions()
        if any(v != served for names in f["versions_after"] for v in names):
            run.wrong.append(f"corrupt model: GetModelInfo named {f['versions_after']}")
        done = await blocking(models_cli, "rollback", "--models-dir", str(models))
        f["rollback_rc"] = done.returncode
        f["rolled_back_to"] = await blocking(current_version, models)
        if f["rolled_back_to"] != served:
            run.wrong.append(f"rollback went to {f['rolled_back_to']}, not {served}")
        await blocking(shutil.rmtree, models / name)
        f["end"] = client.now()

    async def token_rotation() -> None:
        f = run.faults["token rotation"] = {"start": client.now()}
        new, digest = await blocking(make_token)
        text = serve_config(setup.store, setup.cert, setup.key, digest)
        await blocking(write_atomically, setup.config, text)
        marks = [r.log_mark() for r in replicas]
        f["sighup"] = client.now()
        for r in replicas:
            r.sighup()
        reloaded = await wait_logged(replicas, marks, "SIGHUP: 1 clients", 20)
        f["reloaded"] = [t - run.t0_wall for t in reloaded]
        if any(np.isnan(reloaded)):
            run.wrong.append("token rotation: not every server process logged its reload")
        old = client.token
        client.token, client.token_name = new, "rotated"
        f["switched"] = client.now()
        f["end"] = f["switched"] + 1.0
        f["old_token"] = [
            dict(await client.probe_token(r.address, old, TOKEN_PROBES)) for r in replicas
        ]
        f["new_token"] = [
            dict(await client.probe_token(r.address, new, TOKEN_PROBES)) for r in replicas
        ]
        for r, codes in zip(replicas, f["old_token"], strict=True):
            if set(codes) != {"UNAUTHENTICATED"}:
                run.wrong.append(f"old token on replica {r.name} after the rotation: {codes}")
        for r, codes in zip(replicas, f["new_token"], strict=True):
            if set(codes) != {"OK"}:
                run.wrong.append(f"new token on replica {r.name}: {codes}")

    handlers = {
        "database restart": database_restart,
        "replica kill": replica_kill,
        "model swap": model_swap,
        "corrupt model": corrupt_model,
        "token rotation": token_rotation,
    }

    async def faults() -> None:
        for name, at in times.items():
            await until(at)
            print(f"  {client.now():6.1f} s: {name}", flush=True)
            try:
                await handlers[name]()
            except Exception as exc:  # noqa: BLE001 - a fault that could not be staged is reported
                run.wrong.append(f"{name}: {type(exc).__name__}: {exc}")
                run.faults.setdefault(name, {})["error"] = str(exc)
            run.faults[name].setdefault("end", client.now())

    run.t0_wall = time.time() - client.now()
    sampling = asyncio.ensure_future(sampler())
    faulting = asyncio.ensure_future(faults())
    for op in ops:
        await until(op.at)
        launch(client.op(op))
    await until(seconds)
    await faulting
    while pending:
        await asyncio.gather(*list(pending))
    sampling.cancel()
    run.samples.append(sample(setup, client.now()))
    return run


async def measure_capacity(client: Client, inputs: Inputs, seconds: float) -> dict:
    """The mix's capacity: a closed loop of the soak's unary operations (`MIX`, the checks
    included; no streams), `CAPACITY_TASKS` tasks, half of them homed on each replica; warm-up,
    then `seconds` measured: OK unary calls per second over both replicas. A refused call
    (RESOURCE_EXHAUSTED) makes its task wait 50 ms. Its writes are read back with the soak's."""
    run = client.run = Run()
    client.t0 = time.perf_counter()
    total = CAPACITY_WARMUP_S + seconds
    ops = [op for op in schedule(inputs, 2000.0, total, seed=7) if op.kind in MIX]
    position = 0

    async def worker(home: int) -> None:
        nonlocal position
        while client.now() < total and position < len(ops):
            op = ops[position]
            position += 1
            op.home = home
            before = len(run.calls)
            await client.op(op)
            if any(c.code == "RESOURCE_EXHAUSTED" for c in run.calls[before:]):
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(k % 2) for k in range(CAPACITY_TASKS)))
    measured = [c for c in run.calls if c.sent >= CAPACITY_WARMUP_S and c.done <= total]
    ok = [c for c in measured if c.code == "OK"]
    ms = np.asarray([c.ms for c in ok]) if ok else np.zeros(1)
    return {
        "qps": len(ok) / seconds,
        "seconds": seconds,
        "calls": len(measured),
        "refused": sum(c.code == "RESOURCE_EXHAUSTED" for c in measured),
        "failed": sum(c.code not in ("OK", "RESOURCE_EXHAUSTED") for c in measured),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "by_replica": [sum(c.replica == r for c in ok) / seconds for r in range(2)],
        "run": run,
    }


def vacuum(conninfo: str) -> float:
    """`VACUUM (ANALYZE)` of the whole store; its seconds."""
    import psycopg

    started = time.monotonic()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
    return time.monotonic() - started


async def session(
    setup: Setup, inputs: Inputs, capacity_inputs: Inputs, args: argparse.Namespace
) -> tuple[dict, float, Run]:
    """The capacity (unless `--rate`), then the soak, on one client."""
    client = Client([r.address for r in setup.replicas], setup.ca, setup.token, inputs, Run())
    try:
        # Steady state: every process has ranked its customers' slates (the warm-up after a
        # start, at a quarter of each process), so that neither the capacity nor minute 1
        # measures a server still warming. A replica started under load is the kill fault's.
        waited = time.monotonic()
        warm = await wait_logged(setup.replicas, [0] * len(setup.replicas), "slates of model", 300)
        print(
            f"slates ranked by every server process (waited {time.monotonic() - waited:.1f} s"
            + (", timed out)" if any(np.isnan(warm)) else ")"),
            flush=True,
        )
        if args.rate > 0:
            capacity, rate = {"qps": 0.0}, args.rate
        else:
            client.inputs = capacity_inputs
            capacity = await measure_capacity(client, capacity_inputs, args.capacity_seconds)
            client.inputs = inputs
            rate = args.load * capacity["qps"] / calls_per_op()
            print(
                f"capacity {capacity['qps']:.1f} unary calls/s of the mix "
                f"({capacity['refused']} refused); the soak at {args.load:.0%}: "
                f"{rate:.1f} operations/s",
                flush=True,
            )
        # A database in service has been vacuumed: without this, autovacuum's first pass over
        # the tables that the set-up and the capacity filled ran 20-35 s into the soak and
        # took the store's reads with it (minute 1's refusals, 2026-12-06); its later passes,
        # over a minute of writes each, cost nothing that shows.
        capacity["vacuum_s"] = vacuum(setup.pg.conninfo)
        print(f"VACUUM (ANALYZE) of the store: {capacity['vacuum_s']:.1f} s", flush=True)
        seconds = args.minutes * 60.0
        ops = schedule(inputs, rate, seconds)
        times = fault_times(seconds, swap=not args.no_swap)
        print(
            f"{len(ops):,} operations over {seconds:.0f} s; faults at "
            + ", ".join(f"{k} {v:g} s" for k, v in times.items()),
            flush=True,
        )
        run = await soak(setup, client, ops, seconds, times)
        run.acked["consent state"] = [
            ("state", c, p, g) for (c, p), g in client.final.items() if g is not None
        ]
        if "run" in capacity:  # its acknowledged writes are read back too
            for kind, keys in capacity.pop("run").acked.items():
                run.acked[kind].extend(keys)
    finally:
        await client.close()
    return capacity, rate, run


# --- the read-back -------------------------------------------------------------------------------


def stored_writes(conninfo: str) -> tuple[set[tuple], dict]:
    """The writes in the store, as the keys of `Run.acked`, and the tables' row counts."""
    import psycopg

    stored: set[tuple] = set()
    counts = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SET search_path TO nextbest_soak")
        for row in conn.execute(
            "SELECT customer_id, purpose, new_granted, source FROM nextbest_consent_audit"
        ):
            stored.add(("consent", row[0], row[1], bool(row[2]), row[3]))
        for row in conn.execute(
            'SELECT customer_id, product_id, event_type, "timestamp" FROM nextbest_events'
        ):
            stored.add(("event", row[0], row[1], row[2], row[3].isoformat()))
        for row in conn.execute("SELECT customer_id, purpose, granted FROM nextbest_consent"):
            stored.add(("state", row[0], row[1], bool(row[2])))
        for row in conn.execute("SELECT customer_id FROM nextbest_tombstones"):
            stored.add(("forget", row[0]))
        for table in (
            "nextbest_consent",
            "nextbest_consent_audit",
            "nextbest_events",
            "nextbest_impressions",
            "nextbest_tombstones",
        ):
            counts[table] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        counts["database MiB"] = (
            conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 2**20
        )
    return stored, counts


# --- figures and report --------------------------------------------------------------------------


def windows_of(run: Run) -> list[Window]:
    return [
        Window(name, f["start"], f.get("end", f["start"]))
        for name, f in run.faults.items()
        if name in FAULTS and "start" in f
    ]


def _pct(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q)) if len(ms) else 0.0


def _counts(calls: list[Call], windows: list[Window]) -> dict:
    ms = np.asarray([c.ms for c in calls if not c.kind.startswith("Stream")])
    if not len(ms):
        ms = np.asarray([c.ms for c in calls])
    causes = Counter(cause(c.code, c.sent, c.done, windows) for c in calls if c.code != "OK")
    return {
        "calls": len(calls),
        "failed": sum(causes.values()),
        "causes": causes,
        "codes": Counter(
            f"{cause(c.code, c.sent, c.done, windows)}: {c.code}" for c in calls if c.code != "OK"
        ),
        "failovers": sum(c.failover for c in calls),
        "non_personal": sum(c.personalized is False for c in calls),
        "p50": _pct(ms, 50),
        "p99": _pct(ms, 99),
        "max": float(ms.max()) if len(ms) else 0.0,
    }


def figures(run: Run, minutes: int, versions: tuple[str, str], stored: set[tuple]) -> dict:
    windows = windows_of(run)
    by_minute: dict[int, list[Call]] = defaultdict(list)
    for c in run.calls:
        by_minute[min(int(c.at // 60), minutes - 1)].append(c)
    samples = run.samples

    def sample_at(t: float) -> dict:
        return min(samples, key=lambda s: abs(s["t"] - t))

    marks = defaultdict(list)
    for name, f in run.faults.items():
        if "start" in f:
            marks[min(int(f["start"] // 60), minutes - 1) + 1].append(
                f"{name} {f['start']:.0f}–{f.get('end', f['start']):.0f} s"
            )
    rows = []
    for m in range(minutes):
        start, end = sample_at(m * 60), sample_at((m + 1) * 60)
        if m == minutes - 1:
            end = samples[-1]
        span = max(end["t"] - start["t"], 1e-9)
        cpu = [
            max(e["cpu"] - s["cpu"], 0.0) / span
            for s, e in zip(start["replicas"], end["replicas"], strict=True)
        ]
        other = (
            (end["machine_cpu"] - start["machine_cpu"])
            - sum(
                e["cpu"] - s["cpu"] for s, e in zip(start["replicas"], end["replicas"], strict=True)
            )
            - (end["client_cpu"] - start["client_cpu"])
            - (end["pg_cpu"] - start["pg_cpu"])
        ) / span
        rows.append(
            {
                "minute": m + 1,
                **_counts(by_minute[m], windows),
                "rss": [r["rss"] for r in end["replicas"]],
                "processes": [r["processes"] for r in end["replicas"]],
                "cpu": cpu,
                "client_cpu": (end["client_cpu"] - start["client_cpu"]) / span,
                "pg_cpu": (end["pg_cpu"] - start["pg_cpu"]) / span,
                "other": other,
                "marks": marks.get(m + 1, []),
                "lag": _pct(np.asarray([(c.sent - c.at) * 1000.0 for c in by_minute[m]]), 99),
            }
        )
    kinds = []
    for kind in [*MIX, "StreamRecommendations", "StreamAudience"]:
        calls = [c for c in run.calls if c.kind == kind]
        if calls:
            kinds.append({"kind": kind, **_counts(calls, windows)})
    total = _counts(run.calls, windows)
    outside = [c for c in run.calls if cause(c.code, c.sent, c.done, windows) == "outside faults"]
    swap = run.faults.get("model swap", {})
    after_swap = 0
    if "end" in swap:  # from the promotion to 30 s after every process served the new version
        after_swap = sum(swap["start"] <= c.sent <= swap["end"] + 30 for c in outside)

    # The database outage: fail closed while it is down, personal again once it is back.
    db = run.faults.get("database restart", {})
    kill = run.faults.get("replica kill", {})
    outage: dict = {}
    if "up" in db:
        unary = [c for c in run.calls if c.personalized is not None]
        down = [c for c in unary if c.sent >= db["down"] and c.done <= db["starting"]]
        personal = [c for c in down if c.personalized]
        for c in personal:
            run.wrong.append(f"{c.kind} personal while the store was down (sent {c.sent:.2f} s)")
        outage = {
            "answers": len(down),
            "fail_closed": sum(c.reason == UNAVAILABLE_REASON for c in down),
            "personal": len(personal),
            "recovery": [
                recovery(
                    ((c.done, bool(c.personalized), c.reason) for c in unary if c.replica == r),
                    db["up"],
                )
                for r in range(2)
            ],
        }
        for r, (first, _) in enumerate(outage["recovery"]):
            if first is None:
                run.wrong.append(f"replica {'AB'[r]}: no personal answer after the store was back")

    # The kill: calls in flight on the killed replica (sent before, answered after: failed over).
    in_flight: dict = {}
    if "killed" in kill:
        moved = [
            c
            for c in run.calls
            if c.failover and c.sent <= kill["killed"] and c.done >= kill["start"]
        ]
        in_flight = {
            "calls": len(moved),
            "ok": sum(c.code == "OK" for c in moved),
            "failed": Counter(c.code for c in moved if c.code != "OK"),
        }
    # The swap: no old-version answer sent after a replica's processes all served the new one.
    by_version = Counter(
        c.version for c in run.calls if c.version and not c.kind.startswith("Stream")
    )
    for s in run.streams:
        by_version.update(s["versions"])
    if "swapped" in swap:
        for c in run.calls:
            at = swap["swapped"][c.replica]
            if c.version == versions[0] and not np.isnan(at) and c.sent > at:
                run.wrong.append(f"{c.kind} sent {c.sent - at:.2f} s after the swap: old version")
    corrupt = run.faults.get("corrupt model", {}).get("version")
    if corrupt and by_version.get(corrupt):
        run.wrong.append(f"{by_version[corrupt]} answers from the corrupt version {corrupt}")

    # Memory: the end of minute 2 to the end, per replica.
    memory = []
    for r in range(2):
        # From the end of minute 2; for a replica started again after it (the kill), from one
        # minute after its restart.
        base = sample_at(120) if minutes > 2 else sample_at(60 * (minutes - 1))
        restarted = samples[-1]["replicas"][r]["starts"] > base["replicas"][r]["starts"]
        since = "the end of minute 2"
        if restarted and "restarted" in kill:
            base = sample_at(min(kill["restarted"] + 60, samples[-1]["t"]))
            since = f"{kill['restarted'] + 60:.0f} s (a minute after its restart)"
        end = samples[-1]["replicas"][r]
        memory.append(
            {
                "since": since,
                "base": base["replicas"][r]["rss"],
                "end": end["rss"],
                "growth": growth(base["replicas"][r]["rss"], end["rss"]),
                "anon_base": base["replicas"][r]["anon"],
                "anon_end": end["anon"],
                "peak": max(s["replicas"][r]["rss"] for s in samples),
            }
        )
    excepted = fault_minutes(
        [*windows, *([Window("model swap", swap["start"], swap["end"])] if "end" in swap else [])],
        minutes,
    )
    baseline = 2 if minutes >= 2 else 1
    drift = p99_drift({r["minute"]: r["p99"] for r in rows}, baseline, excepted)
    missing = {kind: missing_writes(keys, stored) for kind, keys in run.acked.items()}
    by_second: dict[int, list[Call]] = defaultdict(list)
    for c in run.calls:
        by_second[int(c.at)].append(c)
    timeline = []
    for second in range(minutes * 60):
        calls = by_second[second]
        timeline.append(
            {
                "t": second,
                "calls": len(calls),
                "refused": sum(c.code == "RESOURCE_EXHAUSTED" for c in calls),
                "failed": sum(c.code != "OK" for c in calls),
                "p99": _pct(np.asarray([c.ms for c in calls]), 99),
                "lag_p99": _pct(np.asarray([(c.sent - c.at) * 1000.0 for c in calls]), 99),
            }
        )
    return {
        "timeline": timeline,
        "rows": rows,
        "kinds": kinds,
        "total": total,
        "outside": outside,
        "after_swap": after_swap,
        "outage": outage,
        "in_flight": in_flight,
        "by_version": by_version,
        "memory": memory,
        "excepted": excepted,
        "baseline": baseline,
        "drift": drift,
        "missing": missing,
        "acked": {kind: len(set(keys)) for kind, keys in run.acked.items()},
    }


def table(f: dict) -> list[str]:
    lines = [
        "| minute | calls | failed (cause) | failovers | non-personal | p50 ms | p99 ms | "
        "sent late p99 ms | RSS A MiB | RSS B MiB | CPU A | CPU B | client CPU | PostgreSQL CPU | "
        "other CPU | faults |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        causes = ", ".join(f"{k} {n}" for k, n in r["causes"].most_common())
        lines.append(
            f"| {r['minute']} | {r['calls']:,} | {r['failed']}{f' ({causes})' if causes else ''} | "
            f"{r['failovers']} | {r['non_personal']:,} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['lag']:.0f} | "
            + " | ".join(
                f"{rss:,.0f} ({n})" for rss, n in zip(r["rss"], r["processes"], strict=True)
            )
            + " | "
            f"{r['cpu'][0]:.0%} | {r['cpu'][1]:.0%} | {r['client_cpu']:.0%} | {r['pg_cpu']:.0%} | "
            f"{max(r['other'], 0):.0%} | {'; '.join(r['marks'])} |"
        )
    return lines


def kinds_table(f: dict) -> list[str]:
    lines = [
        "| call | calls | failed (cause) | failovers | non-personal | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in f["kinds"]:
        causes = ", ".join(f"{c} {n}" for c, n in k["causes"].most_common())
        lines.append(
            f"| {k['kind']} | {k['calls']:,} | {k['failed']}{f' ({causes})' if causes else ''} | "
            f"{k['failovers']} | {k['non_personal']:,} | {k['p50']:.2f} | {k['p99']:.2f} | "
            f"{k['max']:.0f} |"
        )
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "missed"


def _s(value: float | None) -> str:
    return "none" if value is None else f"{value:.2f} s"


def report(r: dict) -> str:
    f, run = r["figures"], r["run"]
    faults, minutes, cap = run.faults, r["minutes"], r["capacity"]
    older, newer = r["versions"]
    total = f["total"]
    db, kill = faults.get("database restart", {}), faults.get("replica kill", {})
    swap, corrupt = faults.get("model swap", {}), faults.get("corrupt model", {})
    token = faults.get("token rotation", {})
    outage = f["outage"]
    lost = sum(len(v) for v in f["missing"].values())
    stream_s = np.asarray([s["s"] for s in run.streams]) if run.streams else np.zeros(1)
    members = [a["members"] for a in run.audiences] or [0]
    if "by_replica" in cap:
        how = (
            "the capacity measured first in this run, in this configuration, with the soak's own "
            f"mix of unary operations (below; no streams): a closed loop of {CAPACITY_TASKS} "
            f"tasks, half of them homed on each replica, {CAPACITY_WARMUP_S:g} s of warm-up then "
            f"{cap['seconds']:g} s measured, a task waiting 50 ms after a refusal: "
            f"{cap['qps']:.1f} OK unary calls/s ("
            + " and ".join(f"{'AB'[k]} {q:.1f}/s" for k, q in enumerate(cap["by_replica"]))
            + f"; p50 {cap['p50']:.1f} ms, p99 {cap['p99']:.1f} ms; {cap['refused']:,} of "
            f"{cap['calls']:,} calls refused by admission control, {cap['failed']} failed "
            f"otherwise); the soak runs at {r['load']:.0%} of it, {r['calls_rate']:.1f} unary "
            f"calls/s = {r['rate']:.1f} operations/s ({calls_per_op():.2f} calls per operation "
            "with the checks). Then `VACUUM (ANALYZE)` of the store "
            f"({cap.get('vacuum_s', float('nan')):.1f} s), as a database in service has been "
            "vacuumed (autovacuum's first pass over the tables just filled, 20-35 s into the "
            "soak, refused hundreds of calls)"
        )
    else:
        how = f"the rate set by `--rate`: {r['rate']:.1f} operations/s (capacity not measured)"
    fault_lines = []
    if "up" in db:
        fault_lines.append(
            f"database restart: `pg_ctl stop -m fast` at {db['start']:.1f} s (down at "
            f"{db['down']:.1f} s), `pg_ctl start` at {db['starting']:.1f} s, accepting "
            f"connections at {db['up']:.1f} s"
        )
    if "serving" in kill:
        fault_lines.append(
            f"replica kill: SIGKILL of replica B's supervisor at {kill['start']:.1f} s (its "
            f"processes gone at {kill['killed']:.1f} s), started again on its port at once, "
            f"ready at {kill['restarted']:.1f} s, health SERVING at {kill['serving']:.1f} s"
        )
    if "promoted" in swap:
        fault_lines.append(
            f"model swap: `nextbest models promote {newer}` at {swap['start']:.1f} s, every "
            "process serving it at "
            + " and ".join(f"{t:.1f} s ({'AB'[k]})" for k, t in enumerate(swap.get("swapped", [])))
        )
    if "refused" in corrupt:
        fault_lines.append(
            f"corrupt model: `{corrupt['version']}` (a copy of `{corrupt['served']}` with cf.npz "
            f"cut in half) at {corrupt['start']:.1f} s; `nextbest models promote` exited "
            f"{corrupt['promote_rc']} ({corrupt['promote_said']!r}); CURRENT pointed at it at "
            f"{corrupt['current_at']:.1f} s; refused by every process of A and B by "
            + " and ".join(f"{t:.1f} s" for t in corrupt["refused"])
            + "; GetModelInfo on every connection afterwards: "
            + str(sorted({v for n in corrupt["versions_after"] for v in n}))
            + "; "
            f"`nextbest models rollback` (exit {corrupt['rollback_rc']}) back to "
            f"`{corrupt['rolled_back_to']}`"
        )
    if "switched" in token:
        fault_lines.append(
            f"token rotation: config rewritten with a new token only, SIGHUP to both at "
            f"{token['sighup']:.1f} s, every process reloaded by "
            + " and ".join(f"{t:.1f} s" for t in token["reloaded"])
            + f", client on the new token at {token['switched']:.1f} s; then the old token on "
            f"{TOKEN_PROBES} fresh connections per replica: "
            + ", ".join(f"{'AB'[k]} {c}" for k, c in enumerate(token["old_token"]))
            + "; the new one: "
            + ", ".join(f"{'AB'[k]} {c}" for k, c in enumerate(token["new_token"]))
        )
    for name, fault in faults.items():
        if "error" in fault:
            fault_lines.append(f"{name}: could not be staged: {fault['error']}")
    causes = total["causes"]
    excused = {k: n for k, n in total["codes"].items() if not k.startswith("outside faults")}
    outside = causes.get("outside faults", 0)
    outside_kinds = Counter(f"{c.kind} {c.code}" for c in f["outside"])
    rec = outage.get("recovery", [])
    rec_ok = bool(rec) and all(first is not None and first <= RECOVERY_S for first, _ in rec)
    mem = f["memory"]
    drift = f["drift"]
    drift_ok = all(v <= 2.0 for v in drift.values())
    excepted = (
        ", ".join(f"{m} ({', '.join(names)})" for m, names in sorted(f["excepted"].items()))
        or "none"
    )
    base_p99 = next(row["p99"] for row in f["rows"] if row["minute"] == f["baseline"])
    lines = [
        f"{SECTION} ({r['data']}, {r['customers']:,} customers, {r['products']:,} products)",
        "",
        f"{minutes} minute{'s' * (minutes > 1)} of mixed traffic against two replicas in the "
        "production configuration: two `nextbest serve` supervisors on two ports, each with "
        f"`serve.processes` as shipped (one process per core: {r['processes']} here), TLS (a "
        "certificate for 127.0.0.1 from a CA made by the run), a bearer token made by `nextbest "
        "token` (roles recommend, consent, admin), JSON logs, consent allowed by default, the "
        "sensitive categories of `make audit-privacy`, and one PostgreSQL store that the run "
        "starts itself (`initdb` in a temporary directory, its own port). Rate: " + how + ". "
        "Open loop: the n-th operation is sent at n / rate s whatever earlier calls are doing, "
        f"each call with a {TIMEOUT:g} s deadline; home replicas in turn, and a call that fails "
        "UNAVAILABLE is sent once to the other replica (a failover). Operations: "
        + ", ".join(f"{k} {v:.0%}" for k, v in MIX.items())
        + f". SetConsent flips a purpose of one of {CONSENT_CUSTOMERS} customers, "
        f"ForgetCustomer erases one of {FORGET_CUSTOMERS} (again and again: later ones are "
        "already erased), each followed by a RecommendProducts call to the other replica that "
        "checks the answer follows it; RecordEvents dates every event uniquely. At "
        f"{' and '.join(f'{s:g}' for s in STREAM_AT)} s of every minute a StreamRecommendations "
        f"call of {STREAM_CUSTOMERS} customers, at {AUDIENCE_AT[0]:g} s a Lifecycle.StreamAudience "
        f"call (dormant stage, at most {AUDIENCE_MAX}).",
        "",
        "Faults at fixed shares of the run, 30%, 50%, 70% and 80% (minutes 3, 5, 7 and 8 of ten), "
        "and the model swap at 60%:",
        *[f"- {line}" for line in fault_lines],
        "",
        "Failed = a status other than OK after the failover (a stream: also ended early), counted "
        "by cause: a fault's when the call overlaps the fault's window and has a status that "
        "fault causes (the database restart until "
        f"{RECOVERY_S:g} s after PostgreSQL is back and the replica kill until {KILL_GRACE_S:g} s "
        "after the replica serves again: UNAVAILABLE, and RESOURCE_EXHAUSTED, admission control's "
        "refusals; the token rotation until 1 s after the client switched: UNAUTHENTICATED; the "
        "corrupt model: none), else `outside faults`. Non-personal answers are OK answers. "
        "p50 / p99: unary calls at the client; `sent late`: how far behind the schedule the "
        "client sent. RSS: VmRSS summed over each replica's processes (the supervisor, its server "
        f"processes and multiprocessing's helper; their number in brackets) from /proc every "
        f"{SAMPLE_EVERY:g} s, at the end of the minute; CPU in CPU seconds per second (these "
        f"{os.cpu_count()} cores = {os.cpu_count() * 100}%): each replica's processes, this "
        "client's, PostgreSQL's (the postmaster and its backends), and `other` = the machine's "
        "less all of those (other work on the machine, and the kernel's for them).",
        "",
        *table(f),
        "",
        *kinds_table(f),
        "",
        f"Streams: {len(run.streams)} calls of {STREAM_CUSTOMERS} customers, wall "
        f"{np.median(stream_s):.2f} s median, {stream_s.max():.2f} s max. Audiences: "
        f"{len(run.audiences)} calls, {min(members)}–{max(members)} members. Consent changes: "
        + ", ".join(f"{k} {n}" for k, n in sorted(run.consent_changes.items()))
        + ". Events: "
        + ", ".join(f"{k} {n:,}" for k, n in run.events.items())
        + ". Answers by version: "
        + ", ".join(f"`{v}` {n:,}" for v, n in sorted(f["by_version"].items()))
        + " (stream answers one by one). The store at the end: "
        + ", ".join(
            f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
            for k, v in r["store_counts"].items()
        )
        + ".",
        "",
        f"Machine: {r['machine']}. Run on {r['date']} as `{r['command']}`, "
        f"{r['wall'] / 60:.1f} min in all ("
        + (f"training {r['train_s']:.0f} s" if r["trained"] else "the versions of an earlier run")
        + f"); load average {r['load_before']:.2f} before it. The client, both replicas and "
        f"PostgreSQL share these {os.cpu_count()} cores.",
        "",
        "Figures and aims (correctness aims fail the run; latency and memory are reported):",
        f"- failed calls outside the faults: {outside} of {total['calls']:,} (aim 0: "
        f"{_met(outside == 0)})"
        + (": " + ", ".join(f"{k} {n}" for k, n in outside_kinds.most_common()) if outside else "")
        + (
            f" ({f['after_swap']} of them from the model swap's promotion to 30 s after every "
            "process served the new version)"
            if outside
            else ""
        )
        + "; failed during the faults, by cause: "
        + (", ".join(f"{k} {n}" for k, n in sorted(excused.items())) or "none")
        + f"; failovers {total['failovers']:,} (calls that failed UNAVAILABLE on one replica and "
        "were answered by the other, or failed there too)",
        f"- acknowledged writes missing from the store: {lost} (aim 0: {_met(lost == 0)}) of "
        + ", ".join(f"{n:,} {k}" for k, n in sorted(f["acked"].items()))
        + " (a SetConsent that changed a value by its audit row, and every customer's final "
        "consent by the stored value, RecordEvents per event, ForgetCustomer by its tombstone)",
    ]
    if outage:
        lines.append(
            f"- fail closed while the store was down: {outage['personal']} personal answers of "
            f"{outage['answers']:,} sent after it stopped and answered before it started "
            f"(aim 0: {_met(outage['personal'] == 0)}), {outage['fail_closed']:,} of them "
            "non-personal for the outage (reason consent_unavailable); personal again after "
            "PostgreSQL accepted connections, first personal answer: "
            + ", ".join(f"{'AB'[k]} {_s(first)}" for k, (first, _) in enumerate(rec))
            + f" (aim ≤ {RECOVERY_S:g} s: {_met(rec_ok)}); last fail-closed answer after it: "
            + ", ".join(f"{'AB'[k]} {_s(last)}" for k, (_, last) in enumerate(rec))
        )
    if f["in_flight"]:
        moved = f["in_flight"]
        lines.append(
            f"- calls in flight on replica B at the kill: {moved['calls']}, sent again to A: "
            f"{moved['ok']} answered there"
            + (
                ", failed: " + ", ".join(f"{k} {n}" for k, n in moved["failed"].items())
                if moved["failed"]
                else ""
            )
            + "; the restarted replica served again "
            f"{kill['serving'] - kill['start']:.1f} s after the kill"
        )
    lines += [
        "- resident memory growth to the end, per replica (all its processes): "
        + "; ".join(
            f"{'AB'[k]} from {m['since']} {m['base']:,.0f} → {m['end']:,.0f} MiB, "
            f"{m['growth']:+.1%} (aim < 10%: {_met(m['growth'] < 0.10)}; anonymous "
            f"{m['anon_base']:,.0f} → {m['anon_end']:,.0f} MiB, peak {m['peak']:,.0f} MiB)"
            for k, m in enumerate(mem)
        ),
        f"- p99 per minute against minute {f['baseline']}'s ({base_p99:.2f} ms), the minutes of "
        f"faults and the swap excepted ({excepted}): "
        + (", ".join(f"minute {m} {v:.2f}×" for m, v in drift.items()) or "no minute left")
        + f" (aim ≤ 2×: {_met(drift_ok)})",
        f"- wrong answers (consent or erasure not followed, personal while the store was down, "
        f"the corrupt version served or accepted, the old token accepted, an old model after the "
        f"swap): {len(run.wrong)} (aim 0: {_met(not run.wrong)})",
        "- PostgreSQL's autovacuum during the run (s from the start, table): "
        + (
            "; ".join(
                f"{kind} {table.rsplit('.', 1)[-1]} {at:.0f}"
                for at, kind, table in r["autovacuums"]
                if 0 <= at <= r["minutes"] * 60
            )
            or "none"
        ),
        "- the replicas' logs, warnings and errors: "
        + (
            "; ".join(f"{level} {msg[:100]!r} ×{n}" for (level, msg), n in r["log"].most_common(8))
            or "none"
        ),
        "",
    ]
    return "\n".join(_wrap(line) for line in lines)


def read_logs(paths: list[Path]) -> Counter:
    """Warnings and errors of the replicas' JSON logs as (level, message) → count."""
    notable: Counter = Counter()
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                notable[("text", line[:160])] += 1
                continue
            if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                notable[(record["level"], str(record.get("msg", ""))[:160])] += 1
    return notable


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", required=True, help="events file of the two model versions")
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--content", required=True, help="content file (the model's snapshot)")
    parser.add_argument("--work-dir", default="data/bench-soak", help="config, models, logs")
    parser.add_argument("--retrain", action="store_true", help="train even if versions exist")
    parser.add_argument("--minutes", type=int, default=10, help="minutes of traffic (default 10)")
    parser.add_argument(
        "--load", type=float, default=0.8, help="share of the measured capacity (default 0.8)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="operations/s instead of measuring the capacity"
    )
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--no-swap", action="store_true", help="no model swap")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the replicas (diagnosis, e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.minutes < 1:
        parser.error("--minutes must be >= 1")
    # SIGTERM stops the benchmark like Ctrl-C: the `finally` below stops the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.perf_counter()
    load_before = float(Path("/proc/loadavg").read_text().split()[0])

    from nextbest.config import load_settings
    from nextbest.processes import process_count
    from nextbest.store.artifacts import load_bundle, set_current

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    training = work / "train.toml"
    training.write_text(train_config())
    models_dir = work / "models"
    *versions, trained = ensure_versions(args, training, models_dir)
    versions = tuple(versions)
    train_s = time.perf_counter() - started
    set_current(models_dir, versions[0])

    old, new = load_bundle(models_dir, versions[0]), load_bundle(models_dir, versions[1])
    rng = np.random.default_rng(11)
    known = sorted(set(map(str, old.user_ids)) & set(map(str, new.user_ids)))
    known = [known[i] for i in rng.permutation(len(known))]
    pools = CONSENT_CUSTOMERS + 2 * FORGET_CUSTOMERS
    inputs = Inputs(
        known=known,
        consent=known[:CONSENT_CUSTOMERS],
        forget=known[CONSENT_CUSTOMERS : CONSENT_CUSTOMERS + FORGET_CUSTOMERS],
        writers=known[pools:],
        products=sorted(set(map(str, old.item_ids)) & set(map(str, new.item_ids))),
        content=pq.read_table(args.content, columns=["content_id"])["content_id"].to_pylist(),
        sensitive=set(sensitive_products(pq.read_table(args.catalog), training).tolist()),
    )
    capacity_inputs = dataclasses.replace(
        inputs, forget=known[CONSENT_CUSTOMERS + FORGET_CUSTOMERS : pools]
    )
    shape = new.shape
    del old, new

    tls = work / "tls"
    tls.mkdir(exist_ok=True)
    cert, key, ca = write_tls(tls)
    token, digest = make_token()
    pg = OwnPostgres()
    replicas: list[Replica] = []
    alive = True
    try:
        pg.init()
        pg.start()
        print(f"PostgreSQL of this run on 127.0.0.1:{pg.port} ({pg.root})", flush=True)
        config = work / "serve.toml"
        config.write_text(serve_config(pg.url, cert, key, digest))
        processes = process_count(load_settings(config))
        cmd = [*nextbest_cli(), "serve", "--config", str(config), "--models-dir", str(models_dir)]
        for name in "ab":
            replica = Replica(name.upper(), cmd, work / f"replica-{name}.log", server_env)
            replica.start()
            replicas.append(replica)
        for replica in replicas:
            asyncio.run(wait_serving(replica.address, security=(ca, None)))
        print("replicas on " + ", ".join(r.address for r in replicas), flush=True)
        setup = Setup(replicas, pg, ca, config, pg.url, cert, key, models_dir, versions, token)
        capacity, rate, run = asyncio.run(session(setup, inputs, capacity_inputs, args))
        alive = all(r.alive() for r in replicas)
        stored, store_counts = stored_writes(pg.conninfo)
        autovacuums = pg.autovacuums(run.t0_wall)
    finally:
        for replica in replicas:
            replica.stop()
        pg.close()
    if not alive:
        print("a replica died during the run; logs " + ", ".join(str(r.log_path) for r in replicas))

    f = figures(run, args.minutes, versions, stored)
    results = {
        "figures": f,
        "run": run,
        "versions": versions,
        "minutes": args.minutes,
        "rate": rate,
        "load": args.load,
        "calls_rate": rate * calls_per_op(),
        "capacity": capacity,
        "processes": processes,
        "data": DATA_NAMES.get(Path(args.events).parent.name, args.events),
        "customers": shape[0],
        "products": shape[1],
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "make bench-soak"
        if args.minutes == 10 and args.rate == 0 and args.load == 0.8
        else "benchmarks/bench_soak.py --minutes "
        + str(args.minutes)
        + (f" --rate {args.rate:g}" if args.rate else "")
        + (f" --load {args.load:g}" if args.load != 0.8 else ""),
        "train_s": train_s,
        "trained": trained,
        "wall": time.perf_counter() - started,
        "load_before": load_before,
        "store_counts": store_counts,
        "autovacuums": autovacuums,
        "log": read_logs([r.log_path for r in replicas]),
    }
    section = report(results)
    print()
    print(section)
    for line in run.wrong[:20]:
        print("wrong:", line)
    for kind, keys in f["missing"].items():
        for k in keys[:10]:
            print(f"missing {kind}:", k)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, SECTION)
        print(f"updated {ROOT / 'BENCHMARKS.md'}")
    (work / "samples.json").write_text(
        json.dumps(
            {
                "samples": run.samples,
                "faults": run.faults,
                "capacity": capacity,
                "timeline": f["timeline"],
            },
            indent=1,
            default=str,
        )
    )
    outside = f["total"]["causes"].get("outside faults", 0)
    lost = sum(len(v) for v in f["missing"].values())
    unswapped = not args.no_swap and "swapped" not in run.faults.get("model swap", {})
    return 1 if outside or lost or run.wrong or unswapped or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
