"""``fedtransfer federation init``: the coordinator writes the file every site shares.

It resolves a scenario (``--config`` / ``--set``, as ``simulate``) into a
federation file (:mod:`common.federation`): the schema with the classes in order,
the backbone, the coordinator's public data and the plan; and it publishes the
digests of the coordinator's public (val) and test records next to it
(:mod:`common.data.digests`), which each site checks its own records against.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a federation file fixes: what every site must agree on, and the plan.
FEDERATION_KEYS = ("dataset", "data-dir", "backbone", "image-size", "image-channels", "head",
                   "hidden-dim", "trainable", "num-rounds", "local-epochs", "batch-size",
                   "learning-rate", "clip-norm", "momentum", "target-epsilon", "target-delta",
                   "min-sites", "round-timeout")
HASHES_FILE = "public-hashes.json"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def cmd_federation_init(args) -> int:
    """Write ``<out>/federation.toml`` and ``<out>/public-hashes.json``."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.data.datasets import federation
    # lazy: as above
    from common.data.digests import write_public_hashes
    # lazy: as above
    from common.federation import load_federation
    # lazy: as above
    from simulations.scenarios import resolve_config

    cfg = resolve_config(args.config, args.set, None)
    if cfg.backbone == "auto":
        print("error: a federation fixes its backbone before sites declare it: run "
              "`fedtransfer select` on the same scenario and pass --set backbone=<its choice>")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "federation.toml"
    if path.exists() and not args.force:
        print(f"error: {path} exists (--force to overwrite)")
        return 2
    splits, schema = federation(cfg)
    values = cfg.to_dict()
    if values["data-dir"]:
        values["data-dir"] = os.path.relpath(Path(values["data-dir"]).resolve(), out.resolve())
    values["learning-rate"] = cfg.lr
    lines = ["# The federation file: every site and the coordinator share it (docs/deployment.md).",
             "# Paths are relative to this file."]
    lines += [f"{k} = {_toml(values[k])}" for k in FEDERATION_KEYS]
    lines += ["", "[federation]", f"name = {_toml(args.name or out.resolve().name)}",
              f"public-hashes = {_toml(HASHES_FILE)}"]
    declared = schema.to_dict()
    lines += ["", "[schema]"] + [f"{k} = {_toml(v)}" for k, v in declared.items()
                                 if k not in ("features", "image-size", "image-channels")]
    for feature in declared.get("features", []):
        lines += ["", "[[schema.features]]"] + [f"{k} = {_toml(v)}" for k, v in feature.items()
                                                if k not in ("center", "scale")
                                                or feature.get("scaling") == "declared"]
    path.write_text("\n".join(lines) + "\n")
    hashes = write_public_hashes(out / HASHES_FILE, {"val": splits.val_x, "test": splits.test_x},
                                 source=cfg.dataset)
    fed = load_federation(path)  # what a site will read: checked here first
    print(f"wrote {path} (declaration {fed.declaration.sha256[:16]}, {len(schema.classes)} "
          f"classes, backbone {cfg.backbone}) and {hashes} ({len(splits.val_y)} public val and "
          f"{len(splits.test_y)} test records); give both to every site")
    return 0


def add_federation_commands(sub) -> None:
    sp = sub.add_parser("federation", help="the coordinator's federation file")
    fed = sp.add_subparsers(dest="federation_command", required=True)
    init = fed.add_parser("init", help="write federation.toml (schema, backbone, public data, "
                          "plan) and the digests of the public and test records")
    init.add_argument("--config", help="a scenario name in simulations/configs/ or a TOML path")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config key (repeatable)")
    init.add_argument("--out", required=True, help="the folder for the two files")
    init.add_argument("--name", help="the federation's name (default: the folder's)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(func=cmd_federation_init)
