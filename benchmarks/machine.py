"""What machine a result came from: CPU model, cores, memory, GPU, library versions."""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from pathlib import Path

from common.privacy.ledger import library_versions

REPO = Path(__file__).resolve().parents[1]
# The report's own line naming the code it was generated from: what
# tests/test_benchmarks_current.py reads back.
STAMP = "<!-- fedtransfer-benchmarks: commit={commit} committed={committed} dirty={dirty} -->"
STAMP_RE = re.compile(r"<!-- fedtransfer-benchmarks: commit=(?P<commit>[0-9a-f]{40}|unknown) "
                      r"committed=(?P<committed>\S+) dirty=(?P<dirty>true|false|unknown) -->")

LIBRARIES = ("torch", "opacus", "flwr", "flwr-datasets", "ray", "numpy", "scikit-learn",
             "efficientnet-lite-pytorch", "dp-accounting", "safetensors")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def gpu_info() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "count": torch.cuda.device_count(),
            "memory_gb": round(props.total_memory / 1024 ** 3, 1),
            "cuda": torch.version.cuda}


def machine_info() -> dict:
    """A one-level dict describing this machine (written into every results file)."""
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    gpu = gpu_info()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": total_memory_gb(),
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(LIBRARIES),
    }


def machine_tag(info: dict) -> str:
    """Short file-name-safe tag, e.g. ``cpu2-xeon`` or ``h100``."""
    if info.get("gpu"):
        name = info["gpu"]["name"].lower()
        m = re.search(r"(h100|h200|a100|l4|t4|v100|a10g?|rtx ?\d+)", name)
        return (m.group(1) if m else "gpu").replace(" ", "")
    cpu = info.get("cpu_model", "").lower()
    vendor = "xeon" if "xeon" in cpu else "epyc" if "epyc" in cpu else "cpu"
    return f"cpu{info.get('cpu_cores_usable') or info.get('cpu_cores')}-{vendor}"


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def code_version() -> dict:
    """The commit this checkout is at (full SHA), its commit date, and whether tracked
    files differ from it; ``None`` values outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "committed": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "committed": _git("show", "-s", "--format=%cI", commit),
            "dirty": bool(status) if status is not None else None}
