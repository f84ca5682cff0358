"""The warm launcher (client/serve.py): the fork server and its shim, the capped
SuperNode sleep, and ``fedtransfer site serve``'s own life (start, print, stop).

The fork server here runs a small target module written by the test instead of
Flower's ``flwr-clientapp`` (the deployment tests run the real one): it preloads
numpy and torch like the real one, so what a child inherits is what a ClientApp
inherits.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import serve
from tests import sites
from tests.conftest import REPO

TARGET = '''
import json, os, signal, sys, time

COUNTER = 0


def main():
    global COUNTER
    COUNTER += 1  # a fresh process per message: always 1
    what = sys.argv[1]
    if what == "echo":
        sys.stdout.write(json.dumps({
            "argv": sys.argv[2:], "env": dict(os.environ), "cwd": os.getcwd(),
            "umask": os.umask(0o22), "stdin": sys.stdin.read(), "pid": os.getpid(),
            "ppid": os.getppid(), "counter": COUNTER,
            "app_modules": sorted(m for m in sys.modules
                                  if m.partition(".")[0] in ("client", "common", "server"))}))
        sys.stderr.write("stderr line\\n")
        return 0
    if what == "exit":
        sys.exit(int(sys.argv[2]))
    if what == "die":
        os.kill(os.getpid(), int(sys.argv[2]))
        time.sleep(30)
    if what == "wait":
        Path = __import__("pathlib").Path
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
        Path(sys.argv[2]).write_text(str(os.getpid()))
        time.sleep(60)
        return 3
    if what == "torch":
        import numpy as np
        import torch

        a = torch.randn(512, 512)
        t0 = time.perf_counter()
        (a @ a).sum().item()  # intra-op threads: hangs if the parent's OpenMP pool was copied
        print(json.dumps({"threads": torch.get_num_threads(), "numpy": float(np.random.rand()),
                          "seconds": time.perf_counter() - t0}))
        return 0
    raise SystemExit(f"unknown {what}")
'''


@pytest.fixture(scope="module")
def fork_server(tmp_path_factory):
    """A fork server that preloaded numpy and torch, with the test's target."""
    root = tmp_path_factory.mktemp("serve")
    (root / "warm_target.py").write_text(TARGET)
    sock = root / "launcher.sock"
    env = {**os.environ, "PYTHONPATH": str(root)}
    log = (root / "fork-server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-P", str(serve.SERVE_PY), "fork-server",
                             "--socket", str(sock), "--preload", "numpy,torch",
                             "--target", "warm_target:main"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (ready := serve.ping(sock)) is None:
            assert proc.poll() is None, (root / "fork-server.log").read_text()
            assert time.monotonic() < deadline, "the fork server never answered"
            time.sleep(0.2)
        shim = serve.write_shim(root / "bin", sock, root / "cold")
        (root / "cold").write_text("#!/bin/sh\necho cold \"$@\"\n")
        (root / "cold").chmod(0o700)
        yield {"proc": proc, "sock": sock, "shim": shim, "ready": ready, "root": root, "env": env}
    finally:
        serve.kill_tree(proc, signal.SIGTERM, grace=10)
        log.close()


def _shim(fs, *args, env=None, input_=b"", timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(fs["shim"]), *args], input=input_, capture_output=True,
                          env=env if env is not None else fs["env"], timeout=timeout)


def test_serve_imports_no_app_module():
    """At module level only the standard library; lazily only Flower and the TOML writer
    (the launcher), never the app's own packages."""
    tree = ast.parse(serve.SERVE_PY.read_text())
    allowed = set(sys.stdlib_module_names) | {"flwr", "tomli_w", "__future__"}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.partition(".")[0] in allowed, f"client/serve.py imports {name}"
    assert not any(m.partition(".")[0] in serve.APP_PACKAGES for m in serve.PRELOAD)


def test_preload_refuses_the_apps_own_modules():
    with pytest.raises(ValueError, match="never preloaded"):
        serve.preload(("json", "client.app"))


def test_preloading_leaves_the_root_logger_alone():
    """Opacus calls logging.basicConfig on import; the server undoes that, so a child
    logs like Flower's own process until the app imports what it imports."""
    load = ("import importlib.util, logging; spec = importlib.util.spec_from_file_location("
            f"'warm', {str(serve.SERVE_PY)!r}); warm = importlib.util.module_from_spec(spec); "
            "import sys; sys.modules['warm'] = warm; spec.loader.exec_module(warm); ")  # by path
    code = load + ("print(len(logging.getLogger().handlers)); import opacus; "
                   "print(len(logging.getLogger().handlers))")
    r = subprocess.run([sys.executable, "-P", "-c", code.replace(
        "import opacus; ", "warm.preload(('opacus',)); ")], capture_output=True, text=True,
        timeout=300)
    assert r.stdout.split() == ["0", "0"], r.stderr
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.split() == ["0", "1"], r.stderr  # what the server undoes


@pytest.mark.parametrize("module, message", [("client.app", "never preloaded"),
                                             ("no_such_module_xyz", "No module named")])
def test_a_fork_server_that_cannot_preload_says_why(tmp_path, module, message):
    r = subprocess.run([sys.executable, "-P", str(serve.SERVE_PY), "fork-server", "--socket",
                        str(tmp_path / "s.sock"), "--preload", f"json,{module}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_ready_facts(fork_server):
    ready = fork_server["ready"]
    assert ready["ready"] and ready["pid"] == fork_server["proc"].pid
    assert ready["python_threads"] == 1 and ready["app_modules"] == []
    assert ready["preload"] == ["numpy", "torch"]
    # The socket and its folder are this user's only.
    assert fork_server["sock"].stat().st_mode & 0o777 == 0o600


def test_child_gets_the_shims_argv_env_cwd_stdio_and_a_fresh_process(fork_server, tmp_path):
    env = {**fork_server["env"], "SITE_VALUE": "ü 1"}
    runs = []
    for _ in range(2):
        r = subprocess.run([str(fork_server["shim"]), "echo", "a b", "--flag"], input=b"in\n",
                           capture_output=True, env=env, cwd=tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout))
        assert r.stderr.decode().endswith("stderr line\n")
    for got in runs:
        assert got["argv"] == ["a b", "--flag"] and got["stdin"] == "in\n"
        assert got["env"] == env and got["cwd"] == str(tmp_path)
        assert got["umask"] == serve._umask()
        assert got["ppid"] == fork_server["proc"].pid  # forked by the server ...
        assert got["counter"] == 1  # ... fresh for every message: nothing carries over
        assert got["app_modules"] == []
    assert runs[0]["pid"] != runs[1]["pid"]


_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                max_size=20)


@settings(max_examples=15, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.lists(_TEXT, max_size=4),
       env=st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,8}", fullmatch=True), _TEXT,
                           max_size=5))
def test_any_argv_and_environment_reach_the_child_unchanged(fork_server, argv, env):
    # A locale, so that Python's start-up (the shim's, as a fresh flwr-clientapp's)
    # does not add LC_CTYPE to the environment (PEP 538).
    env = {**env, "LC_ALL": "C.UTF-8"}
    r = _shim(fork_server, "echo", *argv, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["argv"] == argv and got["env"] == env


@settings(max_examples=12, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(outcome=st.one_of(st.integers(0, 255).map(lambda c: ("exit", c)),
                         st.sampled_from([signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1,
                                          signal.SIGABRT, signal.SIGSEGV]).map(
                             lambda s: ("die", int(s)))))
def test_the_childs_exit_status_is_the_shims(fork_server, outcome):
    kind, value = outcome
    r = _shim(fork_server, kind, str(value))
    assert r.returncode == (value if kind == "exit" else -value), r.stderr


def _wait_file(path: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return int(path.read_text())


def test_a_signal_to_the_shim_reaches_the_child(fork_server, tmp_path):
    marker = tmp_path / "pid"
    proc = subprocess.Popen([str(fork_server["shim"]), "wait", str(marker)],
                            stdout=subprocess.PIPE, env=fork_server["env"])
    try:
        child = _wait_file(marker)
        assert child != proc.pid and serve.alive(child)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 7
        assert proc.stdout.read() == b"got SIGTERM\n"
    finally:
        serve.kill_tree(proc)


def test_a_shim_killed_outright_takes_its_child(fork_server, tmp_path):
    marker = tmp_path / "pid"
    proc = subprocess.Popen([str(fork_server["shim"]), "wait", str(marker)],
                            env=fork_server["env"])
    try:
        child = _wait_file(marker)
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while serve.alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its shim"
            time.sleep(0.05)
    finally:
        serve.kill_tree(proc)


def test_children_start_with_no_torch_work_done(fork_server):
    """Torch's intra-op pool starts in the child (a copied OpenMP pool would hang the
    matmul), with the thread count a fresh process gets; numpy's global RNG is
    seeded per child, as in a fresh process."""
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, env=fork_server["env"], timeout=120)
    runs = [json.loads(_shim(fork_server, "torch").stdout) for _ in range(2)]
    assert all(r["threads"] == int(fresh.stdout) for r in runs)
    assert runs[0]["numpy"] != runs[1]["numpy"]


def test_without_a_fork_server_the_shim_starts_flowers_own(fork_server, tmp_path):
    shim = serve.write_shim(tmp_path / "bin", tmp_path / "none.sock", fork_server["root"] / "cold")
    r = subprocess.run([str(shim), "x", "y"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "cold x y\n"
    assert "no fork server at" in r.stderr and "starting a cold" in r.stderr


def test_a_live_socket_is_refused_and_a_stale_one_cleared(fork_server, tmp_path):
    with pytest.raises(RuntimeError, match="already running"):
        serve._clear_stale_socket(fork_server["sock"])
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed server leaves
    serve._clear_stale_socket(stale)
    assert not stale.exists()


# -- the SuperNode's idle sleep ------------------------------------------------


def test_the_flower_patches_are_pinned_to_the_installed_flower():
    """Fails when Flower's SuperNode loop or its object pulls change (a new flwr
    release, or any edit to those files): the patches must then be re-checked
    against the new code."""
    assert serve.flower_mismatch(serve.SUPERNODE_LOOP) is None
    assert serve.flower_mismatch(serve.PULL_UTILS) is None
    pin = [d for d in __import__("tomllib").loads((REPO / "pyproject.toml").read_text())[
        "project"]["dependencies"] if d.startswith("flwr[")]
    assert pin == [f"flwr[simulation]=={serve.FLWR_PIN}"]
    # What the cap replaces: one literal 3 s sleep, after a pull that found nothing.
    import flwr.supernode.start_client_internal as loop

    tree = ast.parse(Path(loop.__file__).read_text())
    sleeps = [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
              and ast.unparse(n.func) == "time.sleep" and isinstance(n.args[0], ast.Constant)]
    assert sorted(sleeps) == [0.5, 0.5, 3]


def test_the_pull_backoff_patch_changes_only_the_backoff():
    """What the warm SuperNode and every child do: a pull that misses retries after
    0.05 s, not Flower's 1 s (in a subprocess: it patches Flower)."""
    code = ("from flwr.supercore.inflatable import inflatable_utils as u; "
            "print(u.pull_objects.__kwdefaults__['initial_backoff']); "
            "from client.serve import patch_pull_backoff; print(patch_pull_backoff()); "
            "f, g = u.pull_and_inflate_object_from_tree, u.pull_objects; "
            "print(*(x.__kwdefaults__[k] for x in (f, g) "
            "for k in ('initial_backoff', 'backoff_cap', 'max_tries_per_object')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    lines = r.stdout.splitlines()
    assert lines == ["1", str(serve.PULL_BACKOFF), "0.05 1.0 500 0.05 1.0 500"], r.stderr


def test_capped_time_sleeps_at_most_the_cap():
    slept = []
    capped = serve.CappedTime(0.1, sleep=slept.append)
    capped.sleep(3)
    capped.sleep(0.5)
    capped.sleep(0.02)
    assert slept == [0.1, 0.1, 0.02]
    assert capped.monotonic is time.monotonic


@pytest.mark.parametrize("bad", [0.0, -1.0, 3.5])
def test_idle_poll_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="allowed 0.01 to 3 seconds"):
        serve.check_idle_poll(bad)


def test_patch_idle_poll_patches_only_the_supernode_loop():
    code = ("import time; from client.serve import patch_idle_poll; patch_idle_poll(0.2); "
            "import flwr.supernode.start_client_internal as loop; "
            "print(type(loop.time).__name__, loop.time.cap, time.sleep.__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    assert r.stdout.split() == ["CappedTime", "0.2", "sleep"], r.stderr


# -- node config and options ---------------------------------------------------

_VALUE = st.one_of(st.integers(-10**6, 10**6), st.booleans(),
                   st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x)),
                   st.text(st.characters(min_codepoint=32, max_codepoint=126,
                                         exclude_characters="\"'\\"), max_size=12)
                   .filter(lambda s: s.strip() == s and s != "" and " " not in s))


@settings(max_examples=25, derandomize=True, deadline=None)
@given(values=st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), _VALUE,
                              min_size=1, max_size=6))
def test_an_inline_node_config_becomes_a_file_flower_reads_the_same(values, tmp_path_factory):
    from flwr.common.config import parse_config_args

    inline = " ".join(f'{k}="{v}"' if isinstance(v, str) else
                      f"{k}={str(v).lower() if isinstance(v, bool) else repr(v)}"
                      for k, v in values.items())
    site = tmp_path_factory.mktemp("site")
    path = serve.node_config_file(inline, site)
    assert path == site / "node-config.toml"
    assert parse_config_args([str(path)]) == parse_config_args([inline]) == values


@pytest.mark.parametrize("kwargs, message", [
    ({"superlink": "no-port"}, "expected host:port"),
    ({"root_certificates": Path("/nonexistent/ca.crt")}, "no such file"),
    ({"insecure": True, "auth_key": Path(__file__)}, "need TLS"),
    ({"node_config": "/nonexistent/node.toml"}, "no such file"),
    ({"port": 70000}, "allowed 1 to 65535"),
    ({"idle_poll": 10.0}, "allowed 0.01 to 3"),
])
def test_bad_serve_options_are_refused_by_name(kwargs, message, tmp_path):
    base = {"superlink": "127.0.0.1:9092", "node_config": "site-id=0", "site_dir": tmp_path}
    with pytest.raises(ValueError, match=message):
        serve.ServeOptions(**{**base, **kwargs})


def test_site_serve_without_a_site_folder_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli.main", "site", "serve", "--superlink",
                        "127.0.0.1:1", "--node-config", "site-id=0"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "--dir" in r.stdout


# -- the launcher's life -------------------------------------------------------


def _node_toml(site: Path, **policy) -> Path:
    """An admissible site: 40 small digit images of two classes, declared by name."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    images = (rng.random((40, 8, 8)) * 255).astype(np.uint8)
    node = sites.npz_site(site, images, labels, classes=("0", "1"), image_size=8, **policy)
    lines = [f"{k} = {json.dumps(v)}" for k, v in node.items()]
    (site / "node.toml").write_text("\n".join(lines) + "\n")
    return site / "node.toml"


def test_a_site_that_is_not_admitted_does_not_join(tmp_path):
    """site serve checks the site before its SuperNode starts: a site holding a record
    it may not (here: its data file is gone) says why, locally, and exits 2; no
    SuperNode, no fork server."""
    site = tmp_path / "site"
    node = _node_toml(site)
    (site / "data.npz").unlink()
    r = subprocess.run([sys.executable, "-m", "cli.main", "site", "serve", "--superlink",
                        f"127.0.0.1:{serve.free_port()}", "--insecure", "--node-config",
                        str(node)], cwd=REPO, capture_output=True, text=True, timeout=600,
                       start_new_session=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "this site does not join" in r.stdout and "data.npz" in r.stdout
    assert not (site / "serve.json").exists()



@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_site_serve_prints_how_it_joined_and_leaves_nothing_behind(tmp_path, sig):
    """No SuperLink answers (the SuperNode keeps retrying), which is enough to see the
    launcher start both processes, print them, and stop every one by pid."""
    site = tmp_path / "site"
    _node_toml(site)
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "site", "serve",
                                 "--superlink", f"127.0.0.1:{serve.free_port()}", "--insecure",
                                 "--node-config", str(site / "node.toml")],
                                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "launcher         pid" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        joined = json.loads((site / "serve.json").read_text())
        text = log.read_text()
        assert joined["launcher_pid"] == proc.pid and joined["node_config"] == str(
            site / "node.toml")
        assert joined["flwr_home"] == str(site / "flwr-home")
        for key in ("clientappio", "health"):
            host, port = joined[key].split(":")
            assert host == "127.0.0.1" and 1024 <= int(port) <= 65535 and joined[key] in text
        assert f"pid {joined['supernode_pid']}" in text and f"pid {joined['fork_server_pid']}" in text
        # The SuperNode runs with the shim first on its PATH and FLWR_HOME in the site.
        env = dict(e.split("=", 1) for e in Path(f"/proc/{joined['supernode_pid']}/environ")
                   .read_bytes().decode().split("\0") if "=" in e)
        assert env["PATH"].split(os.pathsep)[0] == str(Path(joined["shim"]).parent)
        assert env["FLWR_HOME"] == joined["flwr_home"]
        deadline = time.monotonic() + 300
        while not serve.descendants(joined["supernode_pid"]) or "warm launcher ready" not in \
                log.read_text():  # its SuperExec; the fork server done preloading
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert json.loads((site / "serve.json").read_text())["warm_ready"] is True
        tree = [proc.pid, *serve.descendants(proc.pid)]
        assert {joined["supernode_pid"], joined["fork_server_pid"]} <= set(tree)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert [p for p in tree if serve.alive(p)] == []
        assert f"stopping ({signal.Signals(sig).name})" in log.read_text()
    finally:
        serve.kill_tree(proc)
