"""Where a deployed site's round goes: the per-message latency breakdown.

Under ``flower-supernode`` every message starts a fresh ClientApp process, so
each round pays interpreter start, imports, data loading and accounting again.
This tool replays that: each round runs in a fresh Python process that imports
the ClientApp, hands it a real ``train`` message for a deployed site (node
config with ``data-path``, its own ledger and cache), and serialises the reply
the way the SuperNode does (``message_to_proto``). It prints one row per round::

    python -m benchmarks.latency --out /tmp/lat --rounds 3 [--backbone identity]

Columns (seconds): ``start`` (exec to first line of Python), ``import flwr``,
``import app`` (``client.app`` and what it pulls in), ``data`` (reading the
site's files), ``features`` (backbone or cache), ``accounting`` (σ calibration,
ε projection and ledger commit), ``dp-train`` (Opacus), ``serialize`` (reply
to protobuf bytes) and ``total`` (process wall time, measured by the parent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

T_MAIN = time.time()


def _process_start_time() -> float:
    """This process's start (wall clock), from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + start


def write_site_file(path: Path, n_sites: int = 3, site: int = 0) -> None:
    import numpy as np

    # lazy: this tool measures these imports' cost in a cold process
    from common.data.datasets import load_dataset

    s = load_dataset("digits")
    idx = np.array_split(np.random.default_rng(0).permutation(len(s.train_y)), n_sites)[site]
    x, y = (s.train_x[idx] * 255).round().astype(np.uint8), s.train_y[idx].reshape(-1, 1)
    np.savez(path, train_images=x, train_labels=y, val_images=x[:2], val_labels=y[:2],
             test_images=x[:2], test_labels=y[:2])


def one_round(args) -> dict:
    """Runs inside the fresh process: what a ClientApp process does for one message."""
    t_start = _process_start_time()
    out = {"start": T_MAIN - t_start}
    t = time.perf_counter()
    import flwr.clientapp  # noqa: F401  (Flower's own process imports this first)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.common.serde import message_to_proto
    from flwr.supercore.task_identity import TaskIdentity
    out["import flwr"] = time.perf_counter() - t
    t = time.perf_counter()
    # lazy: this tool measures these imports' cost in a cold process
    import client.app as client_app
    out["import app"] = time.perf_counter() - t

    import numpy as np

    # lazy: this tool measures these imports' cost in a cold process
    from common.config import RunConfig

    # lazy, as above
    from common.protocol import to_array_record

    root = Path(args.out)
    cfg = RunConfig(backbone=args.backbone, image_size=args.image_size, num_rounds=args.rounds,
                    local_epochs=1, batch_size=32, learning_rate=2.0,
                    noise_multiplier=args.noise_multiplier, distill=False)
    head_path = root / "global.npz"
    if head_path.is_file():
        head = dict(np.load(head_path))
    else:
        # lazy: this tool measures these imports' cost in a cold process
        from common.models.heads import head_state, make_head

        dim = 64 if args.backbone == "identity" else 1280
        head = head_state(make_head("linear", in_dim=dim, num_classes=10, seed=0))
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = 1, 7, SUPERLINK_NODE_ID
    request = {"server-round": args.round, "num-rounds": args.rounds, "local-epochs": 1,
               "batch-size": 32, "learning-rate": 2.0, "momentum": 0.0, "clip-norm": 1.0,
               "noise-multiplier": args.noise_multiplier}
    msg = Message(content=RecordDict({"arrays": to_array_record(head),
                                      "config": ConfigRecord(request)}),
                  message_type="train", dst_node_id=11)
    node = {"site-id": 0, "data-path": f"medmnist:{root / 'site.npz'}",
            "ledger-path": str(root / "site" / "ledger.sqlite"),
            "cache-dir": str(root / "site" / "cache"), "target-epsilon": 4.0,
            "target-delta": 1e-5}
    ctx = Context(run_id=7, node_id=11, node_config=node, state=RecordDict(), run_config={})
    app = client_app.make_app(cfg)
    t = time.perf_counter()
    reply = app(msg, ctx)
    out["handler"] = time.perf_counter() - t
    status = reply.content.config_records["status"]["status"]
    if status != "ok":
        raise RuntimeError(f"site declined: {reply.content.config_records['status']['reason']}")
    m = reply.content.metric_records["metrics"]
    out["features"] = float(m["feature-seconds"])
    out["accounting"] = float(m["privacy-seconds"])
    out["dp-train"] = float(m["train-seconds"])
    out["data"] = float(m["site-seconds"]) - out["features"] - out["accounting"] - out["dp-train"]
    t = time.perf_counter()
    size = len(message_to_proto(reply).SerializeToString())
    out["serialize"] = time.perf_counter() - t
    out["reply bytes"] = size
    arrays: ArrayRecord = reply.content.array_records["arrays"]
    np.savez(head_path, **{k: v.numpy() for k, v in arrays.items()})
    return out


COLUMNS = ("start", "import flwr", "import app", "data", "features", "accounting", "dp-train",
           "serialize", "total")


def measure(out: Path, *, rounds: int, backbone: str, image_size: int,
            noise_multiplier: float) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "site.npz").is_file():
        write_site_file(out / "site.npz")
    rows = []
    for r in range(1, rounds + 1):
        cmd = [sys.executable, "-m", "benchmarks.latency", "--one-round", "--round", str(r),
               "--out", str(out), "--rounds", str(rounds), "--backbone", backbone,
               "--image-size", str(image_size), "--noise-multiplier", str(noise_multiplier)]
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        total = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["round"], row["total"] = r, total
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["round " + " ".join(f"{c:>11}" for c in COLUMNS)]
    for row in rows:
        lines.append(f"{row['round']:>5} " + " ".join(f"{row[c]:>11.3f}" for c in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--noise-multiplier", type=float, default=0.0,
                   help="0: the site calibrates σ to its cap (the default deployment)")
    p.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_round:
        print(json.dumps(one_round(args)))
        return 0
    rows = measure(Path(args.out), rounds=args.rounds, backbone=args.backbone,
                   image_size=args.image_size, noise_multiplier=args.noise_multiplier)
    print(format_rows(rows))
    (Path(args.out) / "latency.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
