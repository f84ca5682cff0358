"""The keys every results document must carry (issue 6), checked without timings."""

from __future__ import annotations

REQUIRED = {
    "machine": ("cpu_model", "cpu_cores", "gpu", "libraries"),
    "cached_vs_naive": ("speedup_per_round", "auc", "seconds_per_round", "peak_memory",
                        "total_seconds"),
    "dp_overhead": ("linear", "mlp"),
    "communication": ("head_bytes", "full_bytes", "rows"),
}
PU_KEYS = ("epsilon", "setting", "seed", "auc", "accuracy")
SCALE_KEYS = ("sites", "seconds_per_round", "peak_memory_mb")


def problems(doc: dict, parts: tuple[str, ...] | None = None) -> list[str]:
    """What is missing or malformed in ``doc`` (empty when it is well formed).

    ``parts``: the parts that were run (default: all); ``machine`` is always checked.
    """
    out: list[str] = []
    want = {"machine", *(parts if parts is not None else
                         ("cached_vs_naive", "dp_overhead", "communication", "privacy_utility",
                          "scale"))}
    for block, keys in REQUIRED.items():
        if block not in want:
            continue
        if not isinstance(doc.get(block), dict):
            out.append(f"missing block {block!r}")
            continue
        out += [f"{block}.{k} missing" for k in keys if k not in doc[block]]
    cvn = doc.get("cached_vs_naive")
    if "cached_vs_naive" in want and isinstance(cvn, dict):
        if not {"naive", "cached"} <= set(cvn.get("auc", {})):
            out.append("cached_vs_naive.auc must have both arms (naive, cached)")
        if not isinstance(cvn.get("speedup_per_round"), list):
            out.append("cached_vs_naive.speedup_per_round must be a list")
    dpo = doc.get("dp_overhead")
    if "dp_overhead" in want and isinstance(dpo, dict):
        for h in ("linear", "mlp"):
            if isinstance(dpo.get(h), dict):
                out += [f"dp_overhead.{h}.{k} missing" for k in
                        ("ratio_hooks", "ratio_ghost", "auto_choice", "ratio_auto")
                        if k not in dpo[h]]
    for block, keys in (("privacy_utility", PU_KEYS), ("scale", SCALE_KEYS)):
        if block not in want:
            continue
        rows = doc.get(block)
        if not isinstance(rows, list) or not rows:
            out.append(f"{block} must be a non-empty list")
            continue
        for i, r in enumerate(rows):
            out += [f"{block}[{i}].{k} missing" for k in keys if k not in r]
    return out
