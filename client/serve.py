"""The warm launcher: how ``fedtransfer site serve`` runs a site's SuperNode.

Flower starts a fresh ``flwr-clientapp`` process for every message (flwr 1.41:
``run_clientapp`` handles one message and exits), and before the site does any
work that process imports Flower's SuperNode stack, torch, Opacus and the
accountant: seconds per message, and a SecAgg+ round is four messages per site.
Here a *fork server* imports those libraries once. A ``flwr-clientapp`` *shim*,
first on the SuperNode's PATH, hands the server its argv, environment, working
directory and stdin/stdout/stderr (``socket.send_fds``), and the server forks a
child that runs Flower's own ``flwr-clientapp`` entry point with them. Every
message still gets a fresh process that exits when the message is done, so
nothing one message does in memory is seen by the next; the site's state stays
where the app keeps it (its ledger, σ cache and accountant state on disk, and
Flower's ``context.state``). The child's exit status becomes the shim's, a
signal to the shim is passed on to the child, and a shim killed outright
(SIGKILL) takes its child with it.

One file, four roles:

- the *launcher* (:func:`serve`, behind ``fedtransfer site serve``): writes the
  shim, starts the fork server and ``flower-supernode`` (TLS, authentication,
  node config, free ports, ``FLWR_HOME`` under the site's directory), prints
  how the site joined, and on SIGTERM/SIGINT stops every process it started by
  pid, with bounded waits;
- the *fork server* (``python -P client/serve.py fork-server``);
- the *shim* (``<site>/warm/bin/flwr-clientapp`` runs this file with
  ``python -IS``);
- the SuperNode with its idle sleep capped (``--idle-poll``, off by default;
  :func:`patch_idle_poll`).

At module level this file imports the standard library only; the fork server
imports third-party libraries only (:data:`PRELOAD`), never the app's own
packages (:data:`APP_PACKAGES`): Flower's loader reuses modules already in
``sys.modules`` (``flwr/supercore/object_ref.py``), so a preloaded
``client.app`` would run the copy installed at the site instead of the app the
coordinator shipped. The server runs this file by path with ``python -P``, so
not even ``client`` (this file's package) is imported there; it refuses to
serve if anything did import one of them.

The server does no torch work: it imports and forks. Torch creates its OpenMP
pool on its first parallel operation, which happens in a child; the only
native threads the server holds are OpenBLAS's (numpy's), which re-creates them
across ``fork`` (``pthread_atfork``). Libraries that read the environment
when they load read the server's, which the launcher starts with the
SuperNode's environment; the child's ``os.environ`` is the shim's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import importlib
import json
import logging
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

SERVE_PY = Path(__file__).resolve()
BIN = Path(sys.executable).parent

# What the fork server imports before it forks: Flower's ClientApp process and
# what the app imports from Flower, torch with the parts torch.optim and Opacus
# load on first use, Opacus, the accountant (dp_accounting), scikit-learn's metrics
# (the site's holdout evaluation; they pull pandas and pyarrow), and the storage
# libraries of the ledger and the model files. Only third-party modules.
PRELOAD = (
    "flwr.supernode.cli.flwr_clientapp",  # ~2.5 s: it pulls the SuperNode server stack
    "flwr.clientapp", "flwr.client.mod", "flwr.compat.common.recorddict_compat",
    "torch", "torch._dynamo", "torch.onnx",
    "opacus",
    "dp_accounting.pld", "dp_accounting.rdp", "dp_accounting.mechanism_calibration",
    "sklearn.metrics",
    "safetensors.torch", "safetensors.numpy", "sqlite3",
    "httpx", "httpcore", "h11",  # Flower's HTTP client loads its transport on first use
)
# The app's own top-level packages: the fork server never holds them.
APP_PACKAGES = ("client", "common", "server", "simulations", "cli")
TARGET = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
SOCKET_NAME = "launcher.sock"
MAX_SOCKET_PATH = 100  # AF_UNIX paths hold 107 bytes on Linux

# Two of Flower's waits are changed here, each in exactly one file of exactly one
# Flower release (checked byte for byte before patching):
# - the SuperNode's idle sleep (``time.sleep(3)`` when a pull finds no message),
#   capped only on request (``--idle-poll``): every idle site then pulls from the
#   SuperLink once per interval;
# - the backoff of a pull that finds a message's objects not there yet (1 s, then
#   2 s, ...: ``PULL_INITIAL_BACKOFF``). A message is announced before its objects
#   are uploaded: the SuperNode pulls a message from the SuperLink while the
#   ServerApp is still pushing its objects, and creates the ClientApp's task before
#   it has them, so both wait whole seconds for objects that arrive milliseconds
#   later (a cold ClientApp spends that time importing). With the warm launcher the
#   SuperNode and every child retry after 0.05 s, doubling to at most 1 s: a few
#   more requests per message while its objects are in flight.
FLWR_PIN = "1.41.0"
SUPERNODE_LOOP = "flwr/supernode/start_client_internal.py"
PULL_UTILS = "flwr/supercore/inflatable/inflatable_utils.py"
FLOWER_SHA256 = {
    SUPERNODE_LOOP: "d6342f743fdf768f63305b88414ae2654e9a21bda153739da19c608e8d375067",
    PULL_UTILS: "077b26d921aa86389f0a9e16bab761bd10525ec66d6f175b56fdf4bac7872d40",
}
IDLE_POLL_RANGE = (0.01, 3.0)
PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 1.0}  # Flower's: 1 s, 10 s

GRACE = 10.0  # seconds a process gets after SIGTERM before SIGKILL


# ---------------------------------------------------------------------------
# processes: found and stopped by pid, with bounded waits


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parents() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree (from /proc)."""
    kids, out, todo = _parents(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = GRACE) -> None:
    """Stop ``proc``, its process group and every descendant, by pid: ``sig`` first,
    SIGKILL for whatever still runs ``grace`` seconds later."""
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        _signal(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    deadline = time.monotonic() + grace
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in [proc.pid, *tree]:
        if alive(pid):
            _signal(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def _reap_orphans(keep: set[int]) -> None:
    """Reap exited children other than ``keep`` (orphans handed to us as a subreaper)."""
    for pid in _parents().get(os.getpid(), []):
        if pid not in keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _become_subreaper() -> bool:
    """Orphaned descendants (a shim whose SuperExec died) are re-parented to us, so
    that the final sweep still finds them by pid (Linux ``PR_SET_CHILD_SUBREAPER``)."""
    # lazy: only the launcher needs ctypes, and only on Linux
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    return False


# ---------------------------------------------------------------------------
# the wire between shim and fork server: a length-prefixed JSON request with the
# shim's stdin/stdout/stderr attached, then newline-delimited JSON both ways


def _send_line(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _send_request(sock: socket.socket, obj: dict, fds: list[int]) -> None:
    payload = json.dumps(obj).encode()
    data = struct.pack("!I", len(payload)) + payload
    sent = socket.send_fds(sock, [data], fds)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_request(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(sock, 65536, 3)
    try:
        while len(data) < 4:
            more = sock.recv(65536)
            if not more:
                raise ValueError("the request ended early")
            data += more
        (size,) = struct.unpack("!I", data[:4])
        while len(data) < 4 + size:
            more = sock.recv(65536)
            if not more:
                raise ValueError("the request ended early")
            data += more
        return json.loads(data[4:4 + size]), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class _Lines:
    """Newline-delimited JSON read from a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def feed(self) -> list[dict] | None:
        """The complete lines now available; None at end of stream."""
        data = self.sock.recv(65536)
        if not data:
            return None
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def ping(sock_path: str | Path, timeout: float = 2.0) -> dict | None:
    """The fork server's readiness record, or None when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            _send_request(s, {"ping": True}, [])
            reader = _Lines(s)
            while True:
                lines = reader.feed()
                if lines is None:
                    return None
                if lines:
                    return lines[0]
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# the shim: what the SuperNode's SuperExec starts as ``flwr-clientapp``


def shim(sock_path: str, fallback: str) -> int:
    """Hand this process's argv, environment, directory and stdio to the fork server
    and wait for the child; exit as it did. Where no fork server answers, start
    Flower's own ``flwr-clientapp`` (``fallback``) instead, and say so."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
        _send_request(conn, {"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(),
                             "umask": _umask()}, [0, 1, 2])
    except OSError as exc:
        conn.close()
        print(f"fedtransfer warm launcher: no fork server at {sock_path} ({exc}); starting "
              f"a cold {fallback}", file=sys.stderr, flush=True)
        os.execv(fallback, [fallback, *sys.argv[1:]])
    pending: list[int] = []
    child: dict = {}

    def forward(signum, _frame):
        if child:
            with contextlib.suppress(OSError):
                _send_line(conn, {"signal": signum})
        else:
            pending.append(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    reader = _Lines(conn)
    while True:
        lines = reader.feed()
        if lines is None:
            print("fedtransfer warm launcher: the fork server went away; the ClientApp's "
                  "outcome is unknown", file=sys.stderr, flush=True)
            return 1
        for line in lines:
            if "pid" in line:
                child["pid"] = line["pid"]
                for signum in pending:
                    _send_line(conn, {"signal": signum})
                pending.clear()
            elif "exit" in line:
                return int(line["exit"])
            elif "signal" in line:  # the child died of a signal: so does the shim
                signum = int(line["signal"])
                with contextlib.suppress(OSError, ValueError):  # SIGKILL keeps its action
                    signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return 128 + signum
            elif "error" in line:
                print(f"fedtransfer warm launcher: {line['error']}", file=sys.stderr, flush=True)
                return 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


SHIM_TEMPLATE = """#!{python} -IS
# flwr-clientapp, as `fedtransfer site serve` runs it: a shim that hands each
# ClientApp process to the site's warm fork server (client/serve.py). Written at
# start; do not edit.
import importlib.util
import sys
spec = importlib.util.spec_from_file_location("fedtransfer_warm_shim", {serve!r})
serve = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = serve
spec.loader.exec_module(serve)
sys.exit(serve.shim({socket!r}, {fallback!r}))
"""


def write_shim(bin_dir: Path, sock_path: Path, fallback: Path) -> Path:
    """``bin_dir/flwr-clientapp``: the shim, for a PATH that lists ``bin_dir`` first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "flwr-clientapp"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(SHIM_TEMPLATE.format(python=sys.executable, serve=str(SERVE_PY),
                                        socket=str(sock_path), fallback=str(fallback)))
    tmp.chmod(0o700)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------
# the fork server


@dataclass
class _Job:
    """One message's child, as the server sees it."""

    pid: int
    pidfd: int
    conn: socket.socket | None
    reader: _Lines | None


class _Child:
    """What a forked child runs once the server's stack has unwound."""

    def __init__(self, target: Callable[[], object]):
        self.target = target

    def run(self) -> int:
        result = self.target()
        return result if isinstance(result, int) else 0


def _resolve(target: str) -> Callable[[], object]:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"--target {target!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def preload(modules: tuple[str, ...]) -> dict:
    """Import ``modules`` and check what a fork may copy: no module of the app's own
    packages, one Python thread. Returns the readiness record's facts."""
    t0 = time.monotonic()
    root = logging.getLogger()
    handlers = list(root.handlers)
    for name in modules:
        if name.partition(".")[0] in APP_PACKAGES:
            raise ValueError(f"--preload {name}: the app's own modules are never preloaded "
                             "(Flower's loader would run them instead of the shipped app)")
        importlib.import_module(name)
    # Opacus calls logging.basicConfig when imported: a child would then print Flower's
    # DEBUG records from its start. Leave the root logger as the server found it.
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    seconds = time.monotonic() - t0
    held = sorted(m for m in sys.modules if m.partition(".")[0] in APP_PACKAGES)
    if held:
        raise RuntimeError(f"preloading imported the app's own modules {held[:5]}; Flower's "
                           "loader would run those instead of the shipped app")
    if threading.active_count() != 1:
        raise RuntimeError("preloading started Python threads "
                           f"{[t.name for t in threading.enumerate()]}; a fork copies them broken")
    gc.freeze()  # the preloaded objects: children's collections leave their pages shared
    return {"preload": list(modules), "preload_seconds": round(seconds, 3),
            "python_threads": threading.active_count(),
            "os_threads": len(os.listdir("/proc/self/task")),
            "app_modules": held}


class ForkServer:
    """Accept shims on a Unix socket (same user only) and fork one child per shim."""

    def __init__(self, sock_path: Path, target: Callable[[], object], facts: dict,
                 *, lifeline: bool = False):
        self.pid = os.getpid()
        self.sock_path = sock_path
        self.target = target
        self.facts = facts
        self.forked = 0  # children so far (the readiness record reports it)
        self.jobs: dict[int, _Job] = {}
        self.stopping: float | None = None
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _clear_stale_socket(sock_path)
        old = os.umask(0o177)  # the socket: this user only
        try:
            self.listener.bind(str(sock_path))
        finally:
            os.umask(old)
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))
        self.lifeline = lifeline
        if lifeline:  # stdin is a pipe from the launcher: its end means the launcher is gone
            self.sel.register(0, selectors.EVENT_READ, ("lifeline", None))
        self.handlers = {sig: signal.getsignal(sig) for sig in FORWARDED_SIGNALS}
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum, _frame) -> None:
        self.stop()

    def stop(self) -> None:
        """No new children; SIGTERM to the running ones, SIGKILL after GRACE seconds."""
        if self.stopping is not None:
            return
        self.stopping = time.monotonic() + GRACE
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(OSError):
            self.sock_path.unlink()
        for job in self.jobs.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGTERM)

    def loop(self) -> _Child | None:
        """Serve until stopped; returns None then. In a forked child it returns the
        child's work instead, with the server's files closed."""
        while self.stopping is None or self.jobs:
            if self.stopping is not None and time.monotonic() > self.stopping:
                for job in self.jobs.values():
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
            for key, _ in self.sel.select(timeout=0.5):
                kind, job = key.data
                if kind == "accept":
                    child = self._accept()
                    if child is not None:
                        return child
                elif kind == "wake":
                    with contextlib.suppress(BlockingIOError):
                        self.wake_r.recv(4096)
                elif kind == "lifeline":
                    if not os.read(0, 4096):
                        self.sel.unregister(0)
                        self.stop()
                elif kind == "shim":
                    self._from_shim(job)
                elif kind == "exit":
                    self._reap(job)
        return None

    def close(self) -> None:
        self.stop()
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self.wake_r.close()
        self.wake_w.close()

    def _accept(self) -> _Child | None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        conn.settimeout(10.0)
        try:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                _send_line(conn, {"error": f"refused: user {uid} is not this site's user"})
                conn.close()
                return None
            request, fds = _recv_request(conn)
        except (OSError, ValueError) as exc:
            print(f"fedtransfer fork server: dropped a request: {exc}", file=sys.stderr,
                  flush=True)
            conn.close()
            return None
        if request.get("ping"):
            with contextlib.suppress(OSError):
                _send_line(conn, {"ready": True, "pid": self.pid, "forked": self.forked,
                                  **self.facts})
            conn.close()
            return None
        if len(fds) != 3 or not isinstance(request.get("argv"), list):
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                _send_line(conn, {"error": "a request carries argv, env, cwd, umask and 3 fds"})
            conn.close()
            return None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return self._child(request, fds, conn)
        self.forked += 1
        for fd in fds:
            os.close(fd)
        conn.setblocking(True)
        conn.settimeout(None)
        job = _Job(pid, os.pidfd_open(pid), conn, _Lines(conn))
        self.jobs[job.pidfd] = job
        self.sel.register(conn, selectors.EVENT_READ, ("shim", job))
        self.sel.register(job.pidfd, selectors.EVENT_READ, ("exit", job))
        with contextlib.suppress(OSError):
            _send_line(conn, {"pid": pid})
        return None

    def _from_shim(self, job: _Job) -> None:
        try:
            lines = job.reader.feed()
        except (OSError, ValueError):
            lines = None
        if lines is None:  # the shim is gone (SIGKILL): so goes its child
            self._drop_conn(job)
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
            return
        for line in lines:
            sig = line.get("signal")
            if isinstance(sig, int) and sig in {int(s) for s in FORWARDED_SIGNALS}:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(job.pidfd, sig)

    def _drop_conn(self, job: _Job) -> None:
        if job.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(job.conn)
            job.conn.close()
            job.conn = job.reader = None

    def _reap(self, job: _Job) -> None:
        _, status = os.waitpid(job.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.sel.unregister(job.pidfd)
        os.close(job.pidfd)
        del self.jobs[job.pidfd]
        if job.conn is not None:
            with contextlib.suppress(OSError):
                _send_line(job.conn, {"exit": code} if code >= 0 else {"signal": -code})
            self._drop_conn(job)

    def _child(self, request: dict, fds: list[int], conn: socket.socket) -> _Child:
        """In the forked child: drop the server's files and handlers, take the shim's
        stdio, environment, directory, umask and argv."""
        signal.set_wakeup_fd(-1)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        self.sel.close()
        for sock in (self.listener, self.wake_r, self.wake_w, conn):
            sock.close()
        for job in self.jobs.values():
            if job.conn is not None:
                job.conn.close()
            os.close(job.pidfd)
        if self.lifeline:
            os.close(0)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        if "numpy.random" in sys.modules:  # a fresh process seeds it from the OS
            sys.modules["numpy.random"].seed()
        return _Child(self.target)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a launcher that died; refuse one that still answers."""
    if not path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
            return
    raise RuntimeError(f"{path}: another fork server answers there (is `fedtransfer site serve` "
                       "already running for this site?)")


def serve_forks(sock_path: Path, modules: tuple[str, ...], target: str = TARGET,
                *, lifeline: bool = False) -> _Child | None:
    """The fork server's life: preload, serve, stop. None when it stops; a child's work
    when it returns in a forked child."""
    facts = preload(modules)
    if target == TARGET:
        facts["pull_backoff"] = patch_pull_backoff()
    server = ForkServer(sock_path, _resolve(target), facts, lifeline=lifeline)
    try:
        return server.loop()
    finally:
        if os.getpid() == server.pid:
            server.close()


# ---------------------------------------------------------------------------
# the SuperNode's idle sleep


class CappedTime:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every
    ``sleep`` there lasts at most ``cap`` seconds (the 3 s idle sleep between pulls
    and the 0.5 s waits for a ClientApp's reply); the rest is ``time`` itself."""

    def __init__(self, cap: float, sleep: Callable[[float], None] = time.sleep):
        self.cap, self._sleep = cap, sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(time, name)


def check_idle_poll(seconds: float) -> None:
    lo, hi = IDLE_POLL_RANGE
    if not lo <= seconds <= hi:
        raise ValueError(f"--idle-poll {seconds:g}: allowed {lo:g} to {hi:g} seconds (Flower's "
                         "own idle sleep is 3 s)")


def flower_mismatch(relpath: str) -> str | None:
    """Why the installed Flower's ``relpath`` cannot be patched here, or None when it
    is the very file the patch was written for (:data:`FLWR_PIN`, :data:`FLOWER_SHA256`)."""
    # lazy: only the processes that patch Flower read its metadata
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("flwr")
    except PackageNotFoundError:
        return "flwr is not installed"
    if dist.version != FLWR_PIN:
        return f"flwr {dist.version} is installed; this patch is written for flwr {FLWR_PIN}"
    path = Path(str(dist.locate_file(relpath)))
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"{path}: {exc}"
    if digest != FLOWER_SHA256[relpath]:
        return (f"{path} is not the file this patch was written for (sha256 {digest[:12]}…, "
                f"expected {FLOWER_SHA256[relpath][:12]}…)")
    return None


def patch_pull_backoff() -> dict:
    """Shorten the backoff of object pulls in this process (the SuperNode's from the
    SuperLink, a ClientApp's from its SuperNode: the fork server does it for every
    child). Returns what was done, or why not."""
    if why := flower_mismatch(PULL_UTILS):
        return {"skipped": why}
    # lazy: only the warm launcher's processes patch Flower's object pulls
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(PULL_BACKOFF)
    return dict(PULL_BACKOFF)


def patch_idle_poll(seconds: float) -> None:
    """Cap the SuperNode's sleeps at ``seconds`` in this process (see :class:`CappedTime`)."""
    check_idle_poll(seconds)
    if why := flower_mismatch(SUPERNODE_LOOP):
        raise RuntimeError(f"--idle-poll: {why}; run without it")
    # lazy: only the capped SuperNode imports Flower's SuperNode loop
    from flwr.supernode import start_client_internal as loop

    loop.time = CappedTime(seconds)


def run_supernode(args: list[str], idle_poll: float | None) -> int:
    """``flower-supernode ARGS`` in this process: its object pulls retried sooner
    (:func:`patch_pull_backoff`) and, with ``idle_poll``, its idle sleep capped."""
    if idle_poll is not None:
        patch_idle_poll(idle_poll)
    backoff = patch_pull_backoff()
    if "skipped" in backoff:
        print(f"fedtransfer site serve: the SuperNode keeps Flower's pull backoff: "
              f"{backoff['skipped']}", file=sys.stderr, flush=True)
    # lazy: as above
    from flwr.supernode.cli import flower_supernode

    sys.argv = [str(BIN / "flower-supernode"), *args]  # Flower names its process by argv[0]
    result = flower_supernode()
    return result if isinstance(result, int) else 0


# ---------------------------------------------------------------------------
# the launcher


@dataclass(frozen=True)
class ServeOptions:
    """How a site joins: ``fedtransfer site serve``'s options, checked."""

    superlink: str
    node_config: str  # a .toml file, or Flower's 'key=value ...' string
    site_dir: Path
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    port: int | None = None  # the SuperNode's ClientAppIo (Runtime) API port
    health_port: int | None = None
    warm: bool = True
    idle_poll: float | None = None
    max_retries: int | None = None
    max_wait_time: float | None = None
    preload: tuple[str, ...] = PRELOAD

    def __post_init__(self):
        host, sep, port = self.superlink.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--superlink {self.superlink!r}: expected host:port")
        for name, path in (("--root-certificates", self.root_certificates),
                           ("--auth-key", self.auth_key)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path}: no such file")
        if self.insecure and (self.root_certificates or self.auth_key):
            raise ValueError("--insecure turns TLS off; SuperNode authentication "
                             "(--auth-key) and --root-certificates need TLS")
        if self.node_config.endswith(".toml") and not Path(self.node_config).is_file():
            raise ValueError(f"--node-config {self.node_config}: no such file")
        for name, port in (("--port", self.port), ("--health-port", self.health_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"{name} {port}: allowed 1 to 65535")
        if self.idle_poll is not None:
            check_idle_poll(self.idle_poll)


def node_config_file(node_config: str, site_dir: Path) -> Path:
    """The node config as a TOML file: the given one, or ``<site>/node-config.toml``
    written from Flower's ``key=value`` form with Flower's own parser."""
    if node_config.endswith(".toml"):
        return Path(node_config).resolve()
    # lazy: only an inline node config needs Flower's parser and a TOML writer
    import tomli_w
    from flwr.common.config import parse_config_args

    values = parse_config_args([node_config])
    if not values:
        raise ValueError(f"--node-config {node_config!r}: no key=value pairs")
    path = site_dir / "node-config.toml"
    path.write_text("# written by `fedtransfer site serve` from --node-config\n"
                    + tomli_w.dumps(values))
    return path


def _socket_path(warm_dir: Path) -> tuple[Path, Path | None]:
    """``<site>/warm/launcher.sock``, or a private temporary folder's when that path is
    too long for a Unix socket (returned second, to remove at exit)."""
    path = warm_dir / SOCKET_NAME
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path, None
    tmp = Path(tempfile.mkdtemp(prefix="fedtransfer-site-"))
    return tmp / SOCKET_NAME, tmp


def site_environment(site_dir: Path, shim_dir: Path | None) -> dict[str, str]:
    """The SuperNode's environment (and the fork server's): ``FLWR_HOME`` in the
    site's folder, no telemetry, SuperExec polling every 0.1 s, the shim first on PATH."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(site_dir / "flwr-home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    first = [str(shim_dir)] if shim_dir is not None else []
    env["PATH"] = os.pathsep.join([*first, str(BIN), env.get("PATH", "")])
    return env


@dataclass
class Joined:
    """How the site joined (printed, and written to ``<site>/serve.json``)."""

    superlink: str
    node_config: str
    site_dir: str
    flwr_home: str
    clientappio: str
    health: str
    launcher_pid: int
    supernode_pid: int | None = None
    fork_server_pid: int | None = None
    shim: str | None = None
    socket: str | None = None
    preload_seconds: float | None = None
    warm_ready: bool = False
    idle_poll: float | None = None
    node_id: int | None = None
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"))

    def lines(self) -> list[str]:
        warm = (f"pid {self.fork_server_pid}, shim {self.shim}, socket {self.socket}; "
                "preloading (until it is ready, messages run in Flower's own flwr-clientapp)"
                if self.fork_server_pid else "off (Flower's own flwr-clientapp per message)")
        idle = (f"{self.idle_poll:g} s (capped; one pull per {self.idle_poll:g} s while idle)"
                if self.idle_poll else "Flower's 3 s")
        return [f"fedtransfer site serve: site {self.site_dir}",
                f"  SuperLink        {self.superlink}",
                f"  node config      {self.node_config}",
                f"  FLWR_HOME        {self.flwr_home}",
                f"  ClientAppIo API  {self.clientappio}   health {self.health}",
                f"  SuperNode        pid {self.supernode_pid}",
                f"  warm launcher    {warm}",
                f"  idle poll        {idle}",
                f"  launcher         pid {self.launcher_pid}"]


NODE_ID = re.compile(rb"SuperNode ID: (\d+)")


class _Launcher:
    def __init__(self, opts: ServeOptions, out):
        self.opts, self.out = opts, out
        self.stop_requested = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.tmp_dir: Path | None = None
        # Children this process had before: never ours to reap or stop.
        self.before = set(_parents().get(os.getpid(), []))

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested = signum

    def run(self) -> int:
        opts = self.opts
        site = Path(opts.site_dir).resolve()
        site.mkdir(parents=True, exist_ok=True)
        (site / "flwr-home").mkdir(exist_ok=True)
        node_config = node_config_file(opts.node_config, site)
        port = opts.port or free_port()
        health = opts.health_port or free_port()
        joined = Joined(superlink=opts.superlink, node_config=str(node_config),
                        site_dir=str(site), flwr_home=str(site / "flwr-home"),
                        clientappio=f"127.0.0.1:{port}", health=f"127.0.0.1:{health}",
                        launcher_pid=os.getpid(), idle_poll=opts.idle_poll)
        shim_dir = None
        if opts.warm:
            warm_dir = site / "warm"
            warm_dir.mkdir(exist_ok=True)
            warm_dir.chmod(0o700)
            sock, self.tmp_dir = _socket_path(warm_dir)
            shim_dir = warm_dir / "bin"
            fallback = BIN / "flwr-clientapp"
            joined.shim = str(write_shim(shim_dir, sock, fallback))
            joined.socket = str(sock)
        env = site_environment(site, shim_dir)
        if opts.warm:  # it preloads while the SuperNode joins; the shim falls back until then
            joined.fork_server_pid = self._start_fork_server(sock, env, site).pid
        args = ["--superlink", opts.superlink, "--node-config", str(node_config),
                "--port", str(port), "--health-server-address", joined.health]
        if opts.insecure:
            args.append("--insecure")
        if opts.root_certificates:
            args += ["--root-certificates", str(Path(opts.root_certificates).resolve())]
        if opts.auth_key:
            args += ["--auth-supernode-private-key", str(Path(opts.auth_key).resolve())]
        if opts.max_retries is not None:
            args += ["--max-retries", str(opts.max_retries)]
        if opts.max_wait_time is not None:
            args += ["--max-wait-time", str(opts.max_wait_time)]
        # The SuperNode runs in this file (its pulls patched) with the warm launcher
        # or a capped idle sleep; with --cold alone it is Flower's own, untouched.
        cmd = ([sys.executable, "-P", str(SERVE_PY), "supernode",
                *(["--idle-poll", str(opts.idle_poll)] if opts.idle_poll else []), "--", *args]
               if opts.warm or opts.idle_poll else [str(BIN / "flower-supernode"), *args])
        if self.stop_requested:
            return self._stop(0)
        supernode = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=site,
                                     start_new_session=True)
        self.procs["supernode"] = supernode
        joined.supernode_pid = supernode.pid
        for line in joined.lines():
            self.say(line)
        self._record(site, joined)
        return self._watch(supernode, site, joined)

    def _start_fork_server(self, sock: Path, env: dict, site: Path) -> subprocess.Popen:
        cmd = [sys.executable, "-P", str(SERVE_PY), "fork-server", "--socket", str(sock),
               "--preload", ",".join(self.opts.preload), "--lifeline"]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, cwd=site,
                                start_new_session=True)
        self.procs["fork-server"] = proc
        return proc

    def _check_fork_server(self, site: Path, joined: Joined) -> bool:
        """Whether there is nothing more to check: the warm launcher is ready (said
        once), or it exited (said once; the shim then starts Flower's own process)."""
        fork = self.procs.get("fork-server")
        if fork is None:
            return True
        if fork.poll() is not None:
            self.say(f"fedtransfer site serve: the warm launcher exited with {fork.returncode}"
                     f"{'' if joined.warm_ready else ' before it was ready'} (see above); "
                     "messages now run in Flower's own flwr-clientapp")
            return True
        if joined.warm_ready:
            return False
        if (ready := ping(joined.socket, timeout=0.2)) is not None:
            joined.warm_ready, joined.preload_seconds = True, ready["preload_seconds"]
            self._record(site, joined)
            self.say(f"fedtransfer site serve: warm launcher ready (pid {ready['pid']}, "
                     f"preloaded in {ready['preload_seconds']:.1f} s)")
        return False

    def _emit(self, data: bytes) -> None:
        sink = getattr(self.out, "buffer", None)
        if sink is not None:
            sink.write(data)
            sink.flush()
        else:
            self.out.write(data.decode(errors="replace"))
            self.out.flush()

    @staticmethod
    def _drain(fd: int) -> tuple[bytes, bool]:
        """What the SuperNode wrote so far (its pipe is non-blocking), and whether the
        pipe has ended."""
        chunks = []
        try:
            while data := os.read(fd, 65536):
                chunks.append(data)
        except BlockingIOError:
            return b"".join(chunks), False
        return b"".join(chunks), True

    def _watch(self, supernode: subprocess.Popen, site: Path, joined: Joined) -> int:
        """Pass the SuperNode's output on, note its node id, and wait for a stop signal
        or its exit."""
        out = supernode.stdout.fileno()
        os.set_blocking(out, False)
        sel = selectors.DefaultSelector()
        sel.register(out, selectors.EVENT_READ)
        tail, settled, open_ = b"", False, True
        try:
            while not self.stop_requested:
                if open_ and sel.select(timeout=0.5):
                    data, ended = self._drain(out)
                    if ended:
                        sel.unregister(out)
                        open_ = False
                    if data:
                        self._emit(data)
                        if joined.node_id is None:
                            tail = (tail + data)[-4096:]
                            if m := NODE_ID.search(tail):
                                joined.node_id = int(m.group(1))
                                self._record(site, joined)
                                self.say(f"fedtransfer site serve: joined {joined.superlink} as "
                                         f"SuperNode {joined.node_id}")
                elif not open_:
                    time.sleep(0.5)
                if supernode.poll() is not None:
                    if open_ and (data := self._drain(out)[0]):
                        self._emit(data)
                    self.say(f"fedtransfer site serve: the SuperNode exited with "
                             f"{supernode.returncode}")
                    return self._stop(supernode.returncode)
                if not settled:
                    settled = self._check_fork_server(site, joined)
                _reap_orphans({p.pid for p in self.procs.values()} | self.before)
        finally:
            sel.close()
        self.say(f"fedtransfer site serve: stopping ({signal.Signals(self.stop_requested).name})")
        return self._stop(0)

    def _stop(self, code: int) -> int:
        """Every process this launcher started, and any orphan handed to it, by pid."""
        for name in ("supernode", "fork-server"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                if name == "fork-server" and proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                kill_tree(proc, signal.SIGTERM, GRACE)
                if proc.stdout is not None:
                    proc.stdout.close()
        # Orphans re-parented to this process (a subreaper), and their children.
        left = [pid for child in _parents().get(os.getpid(), []) if child not in self.before
                for pid in (child, *descendants(child))]
        for pid in left:
            _signal(pid, signal.SIGKILL)
        for pid in left:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return code

    @staticmethod
    def _record(site: Path, joined: Joined) -> None:
        (site / "serve.json").write_text(json.dumps(asdict(joined), indent=1) + "\n")


def serve(opts: ServeOptions, out=None) -> int:
    """Run the site until SIGTERM/SIGINT (exit 0) or until its SuperNode exits (its
    exit status); every process started here is stopped by pid before returning."""
    launcher = _Launcher(opts, out or sys.stdout)
    previous = {sig: signal.signal(sig, launcher._on_signal)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    _become_subreaper()
    try:
        return launcher.run()
    except BaseException:
        launcher._stop(1)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="client/serve.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    f = sub.add_parser("fork-server", help="preload, then fork one child per shim")
    f.add_argument("--socket", type=Path, required=True)
    f.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules")
    f.add_argument("--target", default=TARGET, help="module:function each child runs")
    f.add_argument("--lifeline", action="store_true",
                   help="stop when stdin (a pipe from the launcher) ends")
    s = sub.add_parser("supernode", help="flower-supernode with its object pulls retried "
                       "sooner and, with --idle-poll, its idle sleep capped")
    s.add_argument("--idle-poll", type=float, default=None)
    s.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.role == "fork-server":
        modules = tuple(m.strip() for m in a.preload.split(",") if m.strip())
        try:
            child = serve_forks(a.socket, modules, a.target, lifeline=a.lifeline)
        except (ImportError, ValueError, RuntimeError) as exc:
            print(f"fedtransfer fork server: {exc}", file=sys.stderr, flush=True)
            return 2
        return 0 if child is None else child.run()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    return run_supernode(args, a.idle_poll)


if __name__ == "__main__":
    sys.exit(main())
