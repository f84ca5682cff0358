"""``python -m benchmarks --mode quick|full``: run the suite, write results, plots, BENCHMARKS.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks import report
from benchmarks import settings as S
from benchmarks.machine import machine_info, machine_tag
from benchmarks.schema import problems
from common.data.datasets import read_medmnist_npz
from common.jsonio import clean_json
from common.models.training import resolve_device

log = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results"


def run_suite(st: S.BenchSettings) -> dict:
    """Run the parts named in ``st.parts``; returns the results document."""

    t_suite = time.perf_counter()
    info = machine_info()
    device = resolve_device("auto")
    st.work_dir.mkdir(parents=True, exist_ok=True)
    cfg = st.config()
    doc: dict = {"schema": 1, "mode": st.mode, "date": dt.date.today().isoformat(),
                 "machine": info, "device": device,
                 "notes": ["CPU timings are noisy when other processes share the cores; "
                           "compare ratios measured in the same process, not absolute times"],
                 "scenario": "simulations/configs/pneumonia.toml", "timings": {}}
    splits = None
    if {"cached_vs_naive"} & set(st.parts):
        splits = read_medmnist_npz(st.data_path)

    def part(name, fn):
        if name not in st.parts:
            return
        t0 = time.perf_counter()
        log.info("== %s ==", name)
        doc[name] = fn()
        doc["timings"][name] = time.perf_counter() - t0
        log.info("%s took %.0f s", name, doc["timings"][name])

    def cached_vs_naive():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import cached_vs_naive as cvn

        x, y = cvn.subset(splits.train_x, splits.train_y, st.naive_records, seed=0)
        return cvn.run(x, y, splits.test_x, splits.test_y, backbone_name=cfg.backbone,
                       image_size=cfg.image_size, head_name=cfg.head, rounds=st.naive_rounds,
                       epochs=st.naive_epochs, batch_size=st.naive_batch_size or cfg.batch_size,
                       lr=cfg.lr, momentum=cfg.momentum, clip_norm=cfg.clip_norm,
                       target_epsilon=st.naive_epsilon, delta=cfg.target_delta, device=device,
                       work_dir=st.work_dir, eval_cache_dir=Path(cfg.cache_dir))

    pooled: dict = {}

    def fixture():
        if "fx" not in pooled:
            # lazy: a benchmark part imports its module only when it runs
            from benchmarks.privacy_utility import Fixture

            pooled["fx"] = Fixture(cfg)
        return pooled["fx"]

    def dp_overhead():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import dp_overhead as dpo

        x, y = fixture().pooled()
        return dpo.run(x, y, batch_sizes=st.overhead_batch_sizes, epochs=st.overhead_epochs,
                       repeats=st.overhead_repeats, lr=cfg.lr, momentum=cfg.momentum,
                       clip=cfg.clip_norm, hidden_dim=cfg.hidden_dim, device=device)

    def communication():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import communication as comm

        return comm.run(image_size=cfg.image_size, hidden_dim=cfg.hidden_dim)

    def privacy_utility():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import privacy_utility as pu

        res = pu.run(cfg, epsilons=st.epsilons, seeds=st.seeds, fx=fixture())
        doc["privacy_utility_summary"] = {k: v for k, v in res.items() if k != "rows"}
        return res["rows"]

    def scale():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import scale as sc

        def point(n: int, code_root: Path | None = None) -> dict:
            return sc.measure(n, rounds=st.scale_rounds, data_path=st.data_path.resolve(),
                              work_dir=st.work_dir / "scale", timeout_s=st.scale_timeout_s,
                              code_root=code_root)

        after, before = [], []
        for n in st.scale_sites:
            if st.scale_before is not None and n in st.scale_before_sites:
                before.append(point(n, st.scale_before))  # interleaved: the same load
            after.append(point(n))
        if before:
            doc["scale_before"] = before
            doc["scale_comparison"] = sc.compare(before, after)
        return after

    part("cached_vs_naive", cached_vs_naive)
    part("dp_overhead", dp_overhead)
    part("communication", communication)
    part("privacy_utility", privacy_utility)
    part("scale", scale)

    def deployment_vs_simulation():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import deployment

        return deployment.run(st.work_dir / "deployment")

    part("deployment_vs_simulation", deployment_vs_simulation)

    def finetuning():
        # lazy: a benchmark part imports its module only when it runs
        from benchmarks import finetuning as ft

        return ft.run(cfg, seeds=st.seeds, learning_rates=ft.FULL_LRS)

    part("finetuning", finetuning)
    doc["timings"]["total"] = time.perf_counter() - t_suite

    for problem in problems(doc, st.parts):
        log.warning("results schema: %s", problem)
    return clean_json(doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--mode", choices=sorted(S.MODES), default="quick")
    p.add_argument("--parts", default=None,
                   help=f"comma-separated subset of {', '.join(S.FULL_PARTS)} (default: the "
                        "mode's parts; finetuning runs in full mode only)")
    p.add_argument("--data", type=Path, default=S.DEFAULT_DATA, help="pneumoniamnist.npz")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the results JSON and plots")
    p.add_argument("--report", type=Path, default=Path(__file__).parent / "BENCHMARKS.md",
                   help="the Markdown report to (re)write")
    p.add_argument("--report-only", type=Path, metavar="JSON",
                   help="only re-render plots and the report from an existing results file")
    p.add_argument("--scale-sites", help="comma-separated site counts for the scale part "
                   "(default: the mode's)")
    p.add_argument("--scale-before", type=Path, metavar="CHECKOUT",
                   help="also measure this other checkout of fedtransfer (e.g. main) at "
                        "--scale-before-sites, interleaved with this one: before/after in one run")
    p.add_argument("--scale-before-sites", default="20,200",
                   help="site counts for --scale-before (default: 20,200)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    for noisy in ("flwr", "ray", "datasets", "matplotlib", "opacus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    S.scratch_env()

    if a.report_only:
        doc = json.loads(a.report_only.read_text())
        report.write_all(doc, a.report_only, a.report)
        return 0
    parts = (S.MODES[a.mode]().parts if a.parts is None
             else tuple(x.strip() for x in a.parts.split(",") if x.strip()))
    unknown = sorted(set(parts) - set(S.FULL_PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; valid: {', '.join(S.FULL_PARTS)}")
    if not a.data.is_file():
        p.error(f"{a.data} not found: the benchmarks need PneumoniaMNIST (../shared/data)")
    st = S.MODES[a.mode]().replace(parts=parts, data_path=a.data)
    if a.scale_sites:
        st = st.replace(scale_sites=tuple(int(x) for x in a.scale_sites.split(",")))
    if a.scale_before:
        if not (a.scale_before / "benchmarks" / "scale.py").is_file():
            p.error(f"--scale-before {a.scale_before}: not a fedtransfer checkout")
        st = st.replace(scale_before=a.scale_before.resolve(), scale_before_sites=tuple(
            int(x) for x in a.scale_before_sites.split(",")))
    doc = run_suite(st)

    a.out.mkdir(parents=True, exist_ok=True)
    # A run of some parts only is its own file, with its own report beside it: it
    # never replaces the whole suite's results or BENCHMARKS.md.
    partial = set(parts) != set(S.PARTS)
    suffix = f"-{'+'.join(parts)}" if partial else ""
    path = a.out / f"{doc['date']}-{machine_tag(doc['machine'])}-{a.mode}{suffix}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    log.info("results: %s", path)
    explicit_report = any(x == "--report" or x.startswith("--report=") for x in (argv or sys.argv))
    report.write_all(doc, path, a.report if explicit_report or not partial
                     else path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
