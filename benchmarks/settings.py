"""Benchmark sizes for quick and full mode, and the scenario they are drawn from.

Hyperparameters come from ``simulations/configs/pneumonia.toml`` (chosen on the
validation split only); the benchmark never tunes anything on test data.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.config import RunConfig
from simulations.scenarios import resolve_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pneumoniamnist.npz"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, float("inf"))
PARTS = ("cached_vs_naive", "dp_overhead", "communication", "privacy_utility", "scale",
         "deployment_vs_simulation")
# Full mode only: the trainable-mode sweep (benchmarks/finetuning.py), hours on 2 CPU cores.
FULL_PARTS = (*PARTS, "finetuning")


@dataclass(frozen=True)
class BenchSettings:
    """Everything that sizes a benchmark run (quick, full, or a test's tiny run)."""

    mode: str = "quick"
    data_path: Path = DEFAULT_DATA
    work_dir: Path = REPO / ".fedtransfer" / "bench"
    parts: tuple[str, ...] = PARTS
    # 1. cached vs naive
    naive_records: int = 512           # training records at the one measured site (0: all)
    naive_rounds: int = 3
    naive_epsilon: float = 4.0
    naive_epochs: int = 1
    naive_batch_size: int = 64         # 0: the scenario's batch size
    # 2. DP overhead
    overhead_repeats: int = 2
    overhead_epochs: int = 1
    overhead_batch_sizes: tuple[int, ...] = (64, 256)
    # 4. privacy-utility
    epsilons: tuple[float, ...] = EPSILONS
    seeds: tuple[int, ...] = (0,)
    # 5. scale
    scale_sites: tuple[int, ...] = (10, 50)
    scale_rounds: int = 2
    scale_timeout_s: float = 900.0
    # another checkout of fedtransfer (e.g. main) measured at scale_before_sites in the same
    # run, interleaved with this one: a before/after comparison under the same load
    scale_before: Path | None = None
    scale_before_sites: tuple[int, ...] = (20, 200)
    # the scenario (pneumonia.toml), resolved once
    scenario: RunConfig = field(default_factory=lambda: resolve_config("pneumonia", [], None))

    def replace(self, **changes) -> BenchSettings:
        return dataclasses.replace(self, **changes)

    def config(self, **changes) -> RunConfig:
        """The scenario with the benchmark's data path, cache and any changes."""
        return self.scenario.replace(dataset=f"medmnist:{self.data_path}", data_dir="",
                                     cache_dir=str(self.work_dir / "cache"), device="auto",
                                     **changes)


def quick() -> BenchSettings:
    return BenchSettings()


def full() -> BenchSettings:
    return BenchSettings(mode="full", parts=FULL_PARTS, naive_records=0, naive_rounds=3, naive_epochs=5,
                         naive_batch_size=0, seeds=(0, 1, 2), overhead_epochs=5,
                         scale_sites=(10, 20, 50, 100, 200, 500, 1000), overhead_repeats=3,
                         scale_timeout_s=1500.0)


MODES = {"quick": quick, "full": full}


def scratch_env() -> None:
    """Third-party caches and telemetry into a scratch folder, never $HOME."""
    tmp = Path(tempfile.mkdtemp(prefix="fedtransfer-bench-"))
    for var, sub in (("MPLCONFIGDIR", "mpl"), ("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg"),
                     ("FLWR_HOME", "flwr"), ("RAY_TMPDIR", "ray")):
        os.environ.setdefault(var, str(tmp / sub))
        Path(os.environ[var]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
