"""A real Flower deployment on one machine, over loopback: the ``deployment`` tests
and ``benchmarks/deployment.py`` use it.

One SuperLink with TLS (certificates from ``fedtransfer deploy certs``),
SuperNode authentication and a SQLite database; sites that join with
``fedtransfer site serve`` (their own key, the CA certificate, a node config
pointing at their own data, ledger, cache and model folders, and the warm
launcher), or, for a stock baseline, with Flower's own ``flower-supernode``.
Every process is started in its own process group and stopped by pid with
bounded waits, including the detached helpers Flower starts
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), which are found
by walking the process tree from the pids we started. A site started with
``site serve`` is stopped the way its operator would stop it (SIGTERM to the
launcher alone); whatever of its tree is still alive after the launcher exits
is recorded in ``left_behind`` (and then killed).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from client.serve import alive, descendants, free_port, kill_tree
from common.certs import make_deployment_keys
from common.data.datasets import load_dataset

__all__ = ["BIN", "Loopback", "descendants", "free_port", "kill_tree", "write_site_files"]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]  # the checkout: `flwr run .` needs its pyproject
# Waits end on observable progress (a log line, a node count, an exit), not on a
# guess of how long a step takes on a loaded machine: a wait gives up only when
# nothing in the federation has moved for STALL seconds, or after CAP seconds
# in all, and then says what it was waiting for.
STALL = 240.0
CAP = 1200.0
DIGITS_CLASSES = ",".join(str(c) for c in range(10))


def write_site_files(root: Path, num_sites: int, seed: int = 0) -> list[Path]:
    """Split scikit-learn digits' training split into one MedMNIST-style ``.npz`` per site."""

    s = load_dataset("digits", seed=seed)
    idx = np.random.default_rng(seed).permutation(len(s.train_y))
    paths = []
    for i, part in enumerate(np.array_split(idx, num_sites)):
        x = (s.train_x[part] * 255).round().astype(np.uint8)
        y = s.train_y[part].reshape(-1, 1)
        a, b = int(len(part) * 0.8), int(len(part) * 0.9)
        path = root / f"site-{i}.npz"
        np.savez(path, train_images=x[:a], train_labels=y[:a], val_images=x[a:b],
                 val_labels=y[a:b], test_images=x[b:], test_labels=y[b:])
        paths.append(path)
    return paths


class Loopback:
    """A SuperLink and its SuperNodes under ``root``; use as a context manager."""

    def __init__(self, root: Path, *, num_sites: int = 3, cap: float = 8.0,
                 env: dict[str, str] | None = None, sites: str = "serve",
                 serve_args: tuple[str, ...] = (), site_threads: int | None = 1,
                 node_extra: str = ""):
        """``env``: extra environment for every Flower process (e.g. poll intervals).
        ``sites``: ``"serve"`` (``fedtransfer site serve``, with ``serve_args``, e.g.
        ``("--idle-poll", "0.1")`` or ``("--cold",)``) or ``"flower"`` (Flower's own
        ``flower-supernode``, the stock baseline). ``site_threads``: torch's intra-op
        threads per site (``OMP_NUM_THREADS``; None: torch's default, one per core).
        The sites share this machine's cores, so each gets one thread by default, as
        Ray gives each simulated ClientApp one CPU (it sets ``OMP_NUM_THREADS=1``):
        with a thread per core at every site, OpenMP's spinning threads
        oversubscribe the cores and DP training runs several times slower."""
        self.extra_node = f" {node_extra}" if node_extra else ""
        if sites not in ("serve", "flower"):
            raise ValueError(f"sites={sites!r}: allowed 'serve' or 'flower'")
        self.sites = sites
        self.serve_args = tuple(serve_args)
        self.site_threads = site_threads
        self.left_behind: dict[str, list[int]] = {}
        self.root = root
        self.num_sites = num_sites
        self.cap = cap
        self.keys = root / "keys"
        make_deployment_keys(self.keys, sites=num_sites + 1)  # the last one is never registered
        self.data = write_site_files(root, num_sites)
        self.port = free_port()
        self.home = root / "flwr-home"
        self.home.mkdir()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "edge"\n\n[superlink.edge]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.keys / "ca.crt"}"\n')
        self.env = {**os.environ, "FLWR_HOME": str(self.home),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    # SuperExec picks up tasks every 0.1 s (Flower's default: 1 s).
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self._launchers: dict[str, Path] = {}  # `fedtransfer site serve` name -> its folder
        self._logs: list = []

    # -- processes -------------------------------------------------------------
    def start(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        fh = (self.root / f"{name}.log").open("ab")
        self._logs.append(fh)
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env or self.env, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop ``name`` and everything under it. A ``site serve`` launcher stopped with
        SIGTERM gets it alone and must stop its own processes (bounded wait); what is
        left of its tree afterwards lands in ``left_behind``. Any other signal (SIGKILL:
        a power cut) goes to the whole tree at once."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if sig == signal.SIGTERM and name in self._launchers and proc.poll() is None:
            tree = descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            left = [p for p in tree if alive(p)]
            if proc.poll() is None or left:
                self.left_behind[name] = ([proc.pid] if proc.poll() is None else []) + left
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        kill_tree(proc, sig)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def activity(self) -> int:
        """Bytes logged so far by every process of the federation (grows while it works)."""
        return sum(p.stat().st_size for p in self.root.glob("*.log"))

    def wait_until(self, done, *, what, stall: float = STALL, cap: float = CAP,
                   watch: str | None = None, poll: float = 0.3):
        """Until ``done()`` returns a true value (returned). Gives up when no process of
        the federation has logged anything for ``stall`` s, or after ``cap`` s, or when
        ``watch`` exits; the error says ``what`` it waited for (a string, or a function
        giving one at that moment)."""
        start = last = time.monotonic()
        seen = self.activity()
        while True:
            result = done()
            if result:
                return result
            proc = self.procs.get(watch) if watch else None
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{watch} exited with {proc.returncode} while waiting for "
                                   f"{what() if callable(what) else what}:\n"
                                   f"{self.log(watch)[-3000:]}")
            now, grown = time.monotonic(), self.activity()
            if grown != seen:
                seen, last = grown, now
            if now - last > stall or now - start > cap:
                what = what() if callable(what) else what
                why = (f"nothing logged for {now - last:.0f} s" if now - last > stall
                       else f"{cap:.0f} s in all")
                tail = self.log(watch)[-3000:] if watch else ""
                raise TimeoutError(f"gave up waiting for {what} ({why}; started "
                                   f"{now - start:.0f} s ago){chr(10) + tail if tail else ''}")
            time.sleep(poll)

    def wait_exit(self, name: str, *, stall: float = STALL, cap: float = CAP) -> int:
        """``name``'s exit status, once it exits (on observable progress, see wait_until)."""
        proc = self.procs[name]
        self.wait_until(lambda: proc.poll() is not None, what=f"{name} to exit", stall=stall,
                        cap=cap)
        return proc.returncode

    def wait_run(self, name: str, *, num_rounds: int, first: int = 1) -> int:
        """The exit status of a ``flwr run --stream``, waiting round by round: each
        "round k/N" line the ServerApp streams is progress; on giving up, says which
        round it was waiting for."""
        proc = self.procs[name]
        for r in range(first, num_rounds + 1):
            self.wait_until(lambda r=r: f"round {r}/{num_rounds}" in self.log(name)
                            or proc.poll() is not None,
                            what=f"{name}: round {r}/{num_rounds}")
        return self.wait_exit(name)

    def __enter__(self) -> Loopback:
        return self

    def __exit__(self, *exc) -> None:
        for name in list(self.procs)[::-1]:
            self.stop(name)
        for fh in self._logs:
            fh.close()

    # -- Flower ------------------------------------------------------------------
    def start_superlink(self) -> None:
        k = self.keys
        self.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(k / "ca.crt"),
            "--ssl-certfile", str(k / "server.pem"), "--ssl-keyfile", str(k / "server.key"),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.root / "superlink.db")])
        self.wait_for("superlink", "Uvicorn running on https://")

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink started (found among its descendants
        by pid, then told apart by their executable)."""
        pids = []
        for pid in descendants(self.procs["superlink"].pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(Path(a.decode(errors="replace")).name == "flwr-serverapp" for a in argv[:2]):
                pids.append(pid)
        return pids

    def start_federation(self) -> None:
        """The SuperLink, every site's key registered, every site's SuperNode online."""
        self.start_superlink()
        for site in range(self.num_sites):
            self.register(site)
            self.start_supernode(site)
        self.wait_online(self.num_sites)
        for site in range(self.num_sites):
            self.wait_warm(f"supernode-{site}")

    def wait_warm(self, name: str) -> dict | None:
        """``site serve``'s record (``serve.json``) once its warm launcher is ready (it
        preloads while the SuperNode joins); None for a site without one."""
        folder = self._launchers.get(name)
        if folder is None or "--cold" in self.serve_args:
            return None

        def ready() -> dict | None:
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads((folder / "serve.json").read_text())
                return doc if doc.get("warm_ready") else None
            return None

        return self.wait_until(ready, what=f"{name}: its warm launcher ready", watch=name)

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=self.env, timeout=timeout,
                              capture_output=True, text=True, start_new_session=True)

    def register(self, site: int) -> None:
        r = self.flwr("supernode", "register", str(self.keys / f"site-{site}" / "auth_key.pub"),
                      "edge", "--name", f"site-{site}")
        if r.returncode != 0 or "registered successfully" not in r.stdout:
            raise RuntimeError(f"flwr supernode register failed: {r.stdout}\n{r.stderr}")

    def site_dir(self, site: int) -> Path:
        return self.root / f"site-{site}"

    def node_config(self, site: int) -> str:
        d = self.site_dir(site)
        return (f'site-id={site} site-name="hospital-{site}" data-path="medmnist:{self.data[site]}" '
                f'ledger-path="{d / "ledger.sqlite"}" cache-dir="{d / "cache"}" '
                f'model-dir="{d / "models"}" target-epsilon={self.cap} target-delta=1e-5 '
                # The site's declaration (docs/privacy.md, the site boundary): digits'
                # classes, read as the coordinator's digits scenario reads them.
                f'class-names="{DIGITS_CLASSES}" image-size=64 image-channels=1 '
                f'backbone="identity"{self.extra_node}')

    def start_supernode(self, site: int, *, key: int | None = None, ca: bool = True,
                        name: str | None = None, retries: int | None = None) -> subprocess.Popen:
        """Site ``site`` joins (``key``: whose private key, -1 for none; ``ca``: with
        the CA certificate). A site with its own key and the CA runs in its own folder
        (``site_dir``); any other (the refused ones) in a folder of its own name."""
        key = site if key is None else key
        name = name or f"supernode-{site}"
        node = self.node_config(min(site, self.num_sites - 1))
        if self.sites == "flower":
            args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                    "--port", str(free_port()), "--node-config", node]
            if key >= 0:
                args += ["--auth-supernode-private-key", str(self.keys / f"site-{key}" / "auth_key")]
            if ca:
                args += ["--root-certificates", str(self.keys / "ca.crt")]
        else:
            own = key == site and ca and site < self.num_sites
            folder = self.site_dir(site) if own else self.root / name
            args = [sys.executable, "-m", "cli.main", "site", "serve",
                    "--superlink", f"127.0.0.1:{self.port}", "--node-config", node,
                    "--dir", str(folder), *self.serve_args]
            if not own and "--cold" not in args:
                args.append("--cold")  # a node the SuperLink refuses runs no ClientApp
            if key >= 0:
                args += ["--auth-key", str(self.keys / f"site-{key}" / "auth_key")]
            if ca:
                args += ["--root-certificates", str(self.keys / "ca.crt")]
            self._launchers[name] = folder
        if retries is not None:
            args += ["--max-retries", str(retries), "--max-wait-time", "15"]
        env = dict(self.env)
        if self.site_threads is not None:
            env["OMP_NUM_THREADS"] = str(self.site_threads)
        return self.start(name, args, env)

    def wait_for(self, name: str, text: str, *, count: int = 1, stall: float = STALL,
                 cap: float = CAP) -> None:
        """Until ``text`` has appeared ``count`` times in ``name``'s log (see wait_until)."""
        self.wait_until(lambda: self.log(name).count(text) >= count, watch=name,
                        what=lambda: f"{name}: {text!r} x{count} (seen "
                                     f"{self.log(name).count(text)})",
                        stall=stall, cap=cap)

    def online_nodes(self) -> int:
        r = self.flwr("supernode", "list", "edge", "--format", "json")
        doc = json.loads(r.stdout[r.stdout.index("{"):])
        return sum(n.get("status") == "online" for n in doc.get("nodes", []))

    def wait_online(self, n: int, *, exactly: bool = False, cap: float = CAP) -> None:
        """Until ``n`` (or, with ``exactly``, no more than ``n``) SuperNodes are online,
        as the SuperLink reports them. A node goes offline only when its heartbeat
        expires (2 x 30 s), which logs nothing: only ``cap`` bounds this wait."""
        last = {"online": "not asked yet"}

        def ok() -> bool:
            with contextlib.suppress(ValueError, KeyError, subprocess.TimeoutExpired):
                online = self.online_nodes()
                last["online"] = online
                return online == n or (online > n and not exactly)
            return False

        self.wait_until(ok, what=lambda: f"{'exactly ' if exactly else ''}{n} SuperNodes "
                        f"online (last seen: {last['online']})", stall=cap, cap=cap, poll=2)

    def run(self, run_config: str) -> subprocess.Popen:
        return self.start("flwr-run", [str(BIN / "flwr"), "run", ".", "edge", "--stream",
                                       "--run-config", run_config])
