"""Resume a run from its last completed round (config key ``resume = true``).

After every round the server writes ``<out>/checkpoint/``: the global head
(``head.safetensors``), each site's last accepted head (``site-<id>.safetensors``,
the ensemble teacher's members) and ``state.json`` (the round number, the
round records, and every site's reported state). A restarted ServerApp with
the same ``out-dir`` and ``resume = true`` continues from round k+1.

Nothing is double counted: ε is never summed on the server. Each site reports
its cumulative ε from its own ledger, which also holds any round that a site
trained (and committed) while the server was down; the site's calibration
treats the interrupted run as prior spend and plans only the remaining rounds
(the request's ``num-rounds`` is the number of rounds left).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from server.strategy import HeadFedAvg, SiteRecord

log = logging.getLogger("fedtransfer.server")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoint"


def save_site_heads(out: Path, strategy: HeadFedAvg) -> None:
    ck = checkpoint_dir(out)
    for site_id, head in strategy.site_heads.items():
        tmp = ck / f"site-{site_id}.safetensors.tmp"
        save_file({k: np.ascontiguousarray(v) for k, v in head.items()}, str(tmp))
        tmp.replace(ck / f"site-{site_id}.safetensors")


def resume_state(out: Path, strategy: HeadFedAvg, arrays: dict, *, num_rounds: int
                 ) -> tuple[int, dict, list[dict], dict]:
    """Restore ``strategy`` from ``out``'s checkpoint.

    Returns ``(first round to run, global head, round records, resumed-from info)``.
    Without a checkpoint the run starts at round 1 (and says so).

    Raises:
        ValueError: the checkpoint's head does not fit this run's head, or it
            records more rounds than ``num_rounds``.
    """
    ck = checkpoint_dir(out)
    state_path = ck / "state.json"
    if not state_path.is_file():
        log.warning("resume: no checkpoint at %s; starting at round 1", ck)
        return 1, arrays, [], {}
    state = json.loads(state_path.read_text())
    head = load_file(str(ck / "head.safetensors"))
    if set(head) != set(arrays) or any(head[k].shape != arrays[k].shape for k in arrays):
        raise ValueError(f"resume: the checkpoint head in {ck} does not match this run's head "
                         f"(keys/shapes {[(k, v.shape) for k, v in head.items()]}); was the "
                         "dataset, backbone or head changed?")
    done = int(state["round"])
    if done > num_rounds:
        raise ValueError(f"resume: the checkpoint is at round {done}, beyond num-rounds="
                         f"{num_rounds}")
    for sid, s in state.get("sites", {}).items():
        rec = SiteRecord(site_id=int(sid), node_id=int(s.get("node_id", -1)),
                         epsilon=float(s.get("epsilon") or 0.0), delta=float(s.get("delta") or 0.0),
                         status=str(s.get("status", "active")), reason=str(s.get("reason", "")),
                         dp=bool(s.get("dp", True)), history=list(s.get("history", [])))
        strategy.sites[rec.site_id] = rec
        if rec.node_id >= 0:
            strategy._node_site[rec.node_id] = rec.site_id
        site_head = ck / f"site-{sid}.safetensors"
        if site_head.is_file():
            strategy.site_heads[rec.site_id] = load_file(str(site_head))
    strategy.dropped.extend(state.get("dropped", []))
    ordered = {k: head[k] for k in arrays}  # the head's own key order
    info = {"run_id": state.get("run_id"), "round": done, "checkpoint": str(ck)}
    log.info("resume: continuing run %s from round %d of %d (checkpoint %s)",
             state.get("run_id"), done + 1, num_rounds, ck)
    return done + 1, ordered, list(state.get("rounds", [])), info
