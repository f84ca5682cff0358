"""3. Scale: 10 to 1000 simulated hospitals on Flower's Ray simulation engine.

Each point is a real ``simulations.simulate.simulate`` run (Flower
``run_simulation`` on Ray), started in its own process and its own process
group. The parent samples memory over that process and all its descendants
(Ray's GCS, raylet, workers and ClientApp actors): RSS summed, and PSS summed
(PSS splits shared pages among the processes that map them, so it does not
count torch's shared libraries once per actor). When the run ends, or passes
its time limit, the group is stopped by pid, and any descendant seen during
the run that is still alive (same pid *and* start time) is stopped by pid too.

To stay feasible on 2 cores the backbone is ``identity`` (28×28 pixels as
784-d features), sites are IID, DP-SGD runs with a fixed σ (no per-round
calibration), and each round is one local epoch. Total records are fixed, so
records per site shrink with the site count; the batch is 8, or half the mean
records per site where that is smaller (500 sites have about 9, 1000 about 4).

``code_root`` runs the point from another checkout (its own ``benchmarks.scale``
worker and product code), for a before/after comparison in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.memory import descendants, tree_memory_mb
from cli.main import quiet_flower
from common.config import RunConfig
from common.flowerlog import PROJECT_LOGGERS
from simulations.scenarios import resolve_config
from simulations.simulate import simulate

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stop(proc: subprocess.Popen, seen: dict[int, str | None], grace: float = 10.0) -> None:
    """Stop the worker's group, then any straggler we saw, by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    for pid, started in seen.items():
        if started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


DEFAULT_BATCH = 8


def batch_size_for(sites: int, train_records: int) -> int:
    """Batch 8, or half the mean records per site where that is smaller."""
    return max(1, min(DEFAULT_BATCH, train_records // max(sites, 1) // 2))


def train_records(data_path: Path) -> int:
    import numpy as np

    with np.load(data_path) as z:
        return len(z["train_labels"])


def measure(sites: int, *, rounds: int, data_path: Path, work_dir: Path,
            timeout_s: float, image_size: int = 28, interval: float = 0.5,
            code_root: Path | None = None, batch_size: int | None = None) -> dict:
    """Run one simulation of ``sites`` hospitals; return its scale entry.

    ``code_root``: the checkout to run (default: this one); ``batch_size``:
    default :func:`batch_size_for`.
    """
    root = (code_root or Path(__file__).resolve().parents[1]).resolve()
    batch = batch_size or batch_size_for(sites, train_records(data_path))
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{sites}-", dir=work_dir))
    # Ray's socket paths must stay under 107 bytes: a short folder in /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ftb-ray-"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "FLWR_HOME": str(tmp / "flwr"),
           "HF_HOME": str(tmp / "hf"), "MPLCONFIGDIR": str(tmp / "mpl"),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "HF_DATASETS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for sub in ("flwr", "hf", "mpl"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.scale", "--sites", str(sites), "--rounds",
           str(rounds), "--data", str(data_path), "--out", str(tmp / "run"),
           "--image-size", str(image_size)]
    if batch != DEFAULT_BATCH:  # an older checkout's worker knows only batch 8
        cmd += ["--batch-size", str(batch)]
    t0 = time.perf_counter()
    peak = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}
    seen: dict[int, str | None] = {}
    timed_out = False
    with (tmp / "worker.log").open("wb") as logfh:
        proc = subprocess.Popen(cmd, stdout=logfh, stderr=subprocess.STDOUT, env=env,
                                cwd=root, start_new_session=True)
        try:
            while proc.poll() is None:
                m = tree_memory_mb(proc.pid)
                for k in peak:
                    peak[k] = max(peak[k], m[k])
                for pid in descendants(proc.pid):
                    seen.setdefault(pid, _start_time(pid))
                if time.perf_counter() - t0 > timeout_s:
                    timed_out = True
                    break
                time.sleep(interval)
        finally:
            _stop(proc, seen)
            shutil.rmtree(ray_tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    summary_path = tmp / "run" / "summary.json"
    entry = {"sites": sites, "batch_size": batch, "code_root": str(root),
             "wall_seconds": wall, "timed_out": timed_out,
             "returncode": proc.returncode, "peak_memory_mb": round(peak["pss_mb"], 1),
             "peak_rss_sum_mb": round(peak["rss_mb"], 1), "peak_processes": peak["processes"],
             "memory_statistic": "peak over time of PSS summed over the process tree"}
    if not summary_path.is_file():
        tail = (tmp / "worker.log").read_text(errors="replace")[-2000:]
        entry.update({"error": "no summary.json", "log_tail": tail, "seconds_per_round": None})
        log.warning("scale %d sites failed: %s", sites, tail[-500:])
        return entry
    s = json.loads(summary_path.read_text())
    round_s = [r["round_seconds"] for r in s["rounds"]]
    train_s = [r["train_phase_seconds"] for r in s["rounds"]]
    steady = round_s[1:] or round_s
    hist = [h for site in s["sites"].values() for h in site.get("history", [])]
    records = [site.get("num_examples", 0) for site in s["sites"].values()]

    def mean_of(key: str) -> float | None:
        v = [h[key] for h in hist if h.get(key) is not None]
        return statistics.fmean(v) if v else None

    entry.update({
        "seconds_per_round": statistics.median(steady),
        "round_seconds": round_s, "train_phase_seconds": train_s,
        "total_records": int(sum(records)),
        "records_per_site_mean": statistics.fmean(records) if records else 0,
        "site_call_seconds_mean": {k: mean_of(k) for k in ("site_seconds", "train_seconds",
                                                           "feature_seconds", "privacy_seconds")},
        "final_auc": s["final"].get("auc"),
    })
    site_s, train_ = entry["site_call_seconds_mean"]["site_seconds"], \
        entry["site_call_seconds_mean"]["train_seconds"]
    if site_s is not None and train_ is not None:
        entry["site_call_seconds_mean"]["other"] = site_s - train_ - (
            entry["site_call_seconds_mean"]["feature_seconds"] or 0) - (
            entry["site_call_seconds_mean"]["privacy_seconds"] or 0)
    log.info("scale %d sites: %.1f s per round (rounds %s), peak PSS %.0f MB (RSS sum %.0f MB, "
             "%d processes)", sites, entry["seconds_per_round"],
             ", ".join(f"{x:.1f}" for x in round_s), peak["pss_mb"], peak["rss_mb"],
             peak["processes"])
    return entry


def worker_config(sites: int, rounds: int, data_path: Path, out: Path, image_size: int,
                  batch_size: int = DEFAULT_BATCH):

    base = resolve_config("pneumonia", [], None)
    changes = dict(dataset=f"medmnist:{data_path}", data_dir="", backbone="identity",
                   image_size=image_size, num_sites=sites, partitioner="iid", num_rounds=rounds,
                   local_epochs=1, batch_size=batch_size, noise_multiplier=1.0, target_epsilon=100.0,
                   min_sites=sites, out_dir=str(out), cache_dir=str(out / "cache"),
                   device="cpu")
    if "distill" in RunConfig.__dataclass_fields__:  # not part of what is measured here
        changes["distill"] = False
    return base.replace(**changes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one scale point (run by benchmarks.scale.measure)")
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)

    quiet_flower(False)
    simulate(worker_config(a.sites, a.rounds, a.data, a.out, a.image_size, a.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def compare(before: list[dict], after: list[dict], low: int = 20, high: int = 200) -> dict:
    """Per-round seconds of the two checkouts at each site count both measured, and
    the ``high``/``low`` growth ratio of each (linear in sites would be high/low)."""
    def by_sites(points):  # string keys: the document is JSON
        return {str(p["sites"]): p.get("seconds_per_round") for p in points}

    b, a = by_sites(before), by_sites(after)
    out = {"sites": sorted(int(n) for n in set(b) & set(a)), "before": b, "after": a,
           "before_code": before[0]["code_root"] if before else None}
    for name, pts in (("before", b), ("after", a)):
        if pts.get(str(low)) and pts.get(str(high)):
            out[f"ratio_{high}_{low}_{name}"] = pts[str(high)] / pts[str(low)]
    return out
