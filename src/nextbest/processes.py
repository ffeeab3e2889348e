"""Several server processes on one port (`serve.processes`), so that calls use every core.

One Python process answers on one core at a time (the GIL), whatever its thread pool. With
`serve.processes = N > 1`, `nextbest serve` is a supervisor that starts N server processes
(multiprocessing's `spawn`, before any gRPC state exists) which all listen on one port with
`SO_REUSEPORT`: the kernel spreads new connections over them.

- The port: the supervisor checks it is free, then holds it with a bound, never listening,
  `SO_REUSEPORT` socket (port 0 picks a free one), so the children bind that very port and no
  other program can take it between restarts.
- Metrics: the children write prometheus-client's multiprocess files into a private directory;
  the supervisor serves their sum on `serve.metrics_port`.
- Models: every child loads `CURRENT` and watches it (`serve.reload_interval_s`); an
  Admin.ReloadModel call swaps the child that answers it at once and the others at their next
  check. Health is per child (NOT_SERVING until that child has a model).
- SIGTERM / SIGINT: the supervisor forwards SIGTERM; each child drains its calls in flight for
  up to `serve.grace_s`, as a single server does. A child that dies is started again; a child
  that fails while starting stops the whole server with its error. Children die with the
  supervisor (Linux `PR_SET_PDEATHSIG`), so a `kill -9` of the server leaves nothing behind.
- Log lines carry the child's `pid`; the customer-id hash key is shared by all children.
- SIGHUP is passed on: every child reads its clients (tokens, roles) again from the config.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Connection

from nextbest.config import Settings
from nextbest.errors import ModelError, NextbestError

__all__ = ["process_count", "serve_processes"]

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY_S = 1.0
PR_SET_PDEATHSIG = 1


def process_count(settings: Settings) -> int:
    """`serve.processes`, with 0 meaning the cores this process may run on."""
    wanted = settings.serve.processes
    if wanted > 0:
        return wanted
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def reserve_port(host: str, port: int) -> socket.socket:
    """Check `host:port` is free, then hold it with a bound (not listening) SO_REUSEPORT socket.

    The probe sets SO_REUSEADDR, as gRPC's own listeners do: the connections of a server killed a
    moment ago linger in TIME_WAIT for a minute, and without it a restart on the same port failed
    with "Address already in use" until they expired. A port that another program listens on, or
    that another supervisor holds (its socket has no SO_REUSEADDR), is still refused."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise ModelError(f"serve.host: cannot resolve {host!r} ({exc.strerror})") from None
    address = (host.strip("[]"), port)
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ModelError(
                    f"cannot listen on {host}:{port} ({exc.strerror or exc})"
                ) from None
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind(address)
    except OSError as exc:
        held.close()
        raise ModelError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return held


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the supervisor dies (no orphans after kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor is already gone
        os._exit(1)


def _tell(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:  # the supervisor stopped waiting (it is stopping)
        pass
    finally:
        conn.close()


def _child_main(
    settings: Settings, log_level: int, conn: Connection, config_path: str | None
) -> None:
    """One server process: start, report ready (or the error), serve until SIGTERM, drain."""
    _die_with_parent()
    from nextbest.logs import configure_logging, set_hash_key
    from nextbest.server import create_server, prepare_process, reload_on_sighup

    configure_logging(settings.serve.log_format, log_level)
    set_hash_key(settings.serve.log_hash_key)
    prepare_process(settings.serve)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides, with SIGTERM
    try:
        running = create_server(settings, reuse_port=True)
    except NextbestError as exc:
        _tell(conn, ("error", str(exc)))
        raise SystemExit(2) from None
    reload_on_sighup(running, config_path)
    _tell(conn, ("ready", os.getpid()))
    stop.wait()
    running.stop(settings.serve.grace_s)


@dataclasses.dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class _Supervisor:
    def __init__(self, settings: Settings, count: int, log_level: int, config_path: str | None):
        self.settings = settings
        self.config_path = config_path
        self.count = count
        self.log_level = log_level
        self.context = multiprocessing.get_context("spawn")
        self.children: list[_Child] = []
        self.metrics_dir = ""

    def start_child(self) -> _Child:
        ours, theirs = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=_child_main,
            args=(self.settings, self.log_level, theirs, self.config_path),
            name="nextbest-serve",
            daemon=False,
        )
        process.start()
        theirs.close()
        return _Child(process, ours)

    @staticmethod
    def wait_ready(child: _Child) -> None:
        """Block until the child serves; ModelError with its message if it could not start."""
        try:
            kind, detail = child.conn.recv()
        except EOFError:
            child.process.join()
            raise ModelError(
                f"a server process exited while starting (exit code {child.process.exitcode})"
            ) from None
        finally:
            child.conn.close()
        if kind == "error":
            child.process.join()
            raise ModelError(detail)

    def forward(self, signum: int) -> None:
        for child in self.children:
            if child.process.is_alive():
                os.kill(child.process.pid, signum)

    def stop_children(self, grace: float) -> None:
        for child in self.children:
            if child.process.is_alive():
                os.kill(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + 10.0
        for child in self.children:
            child.process.join(max(deadline - time.monotonic(), 0.0))
            if child.process.is_alive():
                logger.error("server process %d did not drain in time: killed", child.process.pid)
                child.process.kill()
                child.process.join()

    def replace_dead(self) -> None:
        from prometheus_client import multiprocess

        for k, child in enumerate(self.children):
            if child.process.is_alive():
                continue
            logger.error(
                "server process %d exited (code %s): starting another",
                child.process.pid,
                child.process.exitcode,
            )
            multiprocess.mark_process_dead(child.process.pid, self.metrics_dir)
            time.sleep(RESTART_DELAY_S)
            fresh = self.start_child()
            try:
                self.wait_ready(fresh)
            except ModelError as exc:
                logger.error("a server process could not start again: %s", exc)
            self.children[k] = fresh


def serve_processes(
    settings: Settings, count: int, log_level: int, config_path: str | None = None
) -> int:
    """Run `count` server processes on `serve.port` until SIGTERM / SIGINT (see the module)."""
    from nextbest.metrics import serve_multiprocess_http
    from nextbest.server import credentials, stop_on_signals
    from nextbest.store.consent_store import open_store

    serve = settings.serve
    credentials(serve)  # bad TLS files fail here, once, not in every child
    open_store(serve.store).close()  # creates or migrates the schema once, before the children
    held = reserve_port(serve.host, serve.port)
    port = held.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="nextbest-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics_dir  # inherited by the spawned children
    child_settings = settings.with_overrides(
        "serve",
        port=port,
        metrics_port=-1,
        processes=1,
        log_hash_key=serve.log_hash_key or secrets.token_hex(32),
    )
    supervisor = _Supervisor(child_settings, count, log_level, config_path)
    supervisor.metrics_dir = metrics_dir
    stop = stop_on_signals()
    # SIGHUP: every process reads its clients again.
    signal.signal(signal.SIGHUP, lambda signum, frame: supervisor.forward(signal.SIGHUP))
    http = None
    try:
        supervisor.children = [supervisor.start_child() for _ in range(count)]
        for child in supervisor.children:
            supervisor.wait_ready(child)
        if serve.metrics_port >= 0:
            try:
                http, metrics_port = serve_multiprocess_http(
                    serve.host, serve.metrics_port, metrics_dir, settings
                )
            except OSError as exc:
                raise ModelError(
                    f"serve.metrics_port: cannot listen on {serve.host}:{serve.metrics_port} "
                    f"({exc.strerror or exc})"
                ) from None
            logger.info(
                "metrics of all processes on http://%s:%d/metrics", serve.host, metrics_port
            )
        logger.info("%d server processes on %s:%d", count, serve.host, port)
        print(f"nextbest serving on {serve.host}:{port}", flush=True)
        while not stop.wait(0.5):
            supervisor.replace_dead()
        supervisor.stop_children(serve.grace_s)
    finally:
        supervisor.stop_children(0.0)
        if http is not None:
            http.shutdown()
            http.server_close()
        held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop(METRICS_DIR_ENV, None)
    logger.info("stopped")
    return 0
