"""The site's settings: its privacy policy and its declaration, decided by the site.

A deployed site reads them from its own node config
(``flower-supernode --node-config '...'``), or from a TOML file that the node
config names (``policy-file``); node-config keys win over the file. The run
config the server sends is only a *request*: :mod:`client.guard` declines
anything outside the policy or the declaration, with a named reason, before any
record is read and before anything is written to the ledger. A deployed site
takes nothing from the run config.

The declaration (:class:`common.declaration.Declaration`) fixes how the site's
records are read: the federation's schema (a ``schema`` file, or for images
``class-names`` with ``image-size`` and ``image-channels``) and the backbone.
The site checks it against its data once (:mod:`client.admission`).

In a simulation (``fedtransfer simulate``, or ``flwr run .`` on Flower's
simulation engine) one person plays every site's administrator, so the
scenario's config is every simulated site's policy and declaration
(:func:`scenario_policy`). A node config that looks like a simulated partition
(``partition-id``) but runs anywhere else is refused: falling back to the run
config there would let the coordinator choose the site's cap, ledger and data.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.config import DEVICES, RunConfig, simulated_ledger_dir
from common.data.datasets import federation
from common.data.schema import SchemaError, image_schema, load_schema
from common.declaration import Declaration
from common.federation import Federation, load_federation
from common.models.backbones import BACKBONE_NAMES
from common.models.names import TRAINABLE_MODES
from common.data.readers import SiteDataError, data_spec
from common.privacy.accounting import PATIENT, PRIVACY_UNITS, RECORD, UNITS_OF_PRIVACY
from common.privacy.planning import DEFAULT_MIN_NOISE_MULTIPLIER

log = logging.getLogger(__name__)


class SiteConfigError(ValueError):
    """The site's own node config or policy file is incomplete or invalid; it does not train."""


@dataclass(frozen=True)
class SiteSettings:
    """The site's own settings, privacy policy and declaration. The server can neither
    see nor override them (it learns only what the protocol declares public)."""

    site_id: int
    ledger_path: Path
    cache_dir: Path
    dp: bool
    target_epsilon: float
    target_delta: float
    declaration: Declaration
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER
    model_dir: Path | None = None  # delivered models; default: <ledger dir>/models
    # A deployed site's own data (node config ``data-path``: a dataset spec such as
    # ``imagefolder:<dir>``); None in simulation, where the site is a partition.
    data_path: str | None = None
    site_name: str = ""
    holdout: float = 0.2  # the fraction of the site's records held out (never trained on)
    holdout_seed: int = 0  # the site's own seed for that split
    max_rounds: int = 100  # the most rounds one run may ask of this site
    max_steps: int = 10_000  # the most DP-SGD steps one round may take
    ledger_key: Path | None = None  # the ledger's signing key; default <ledger-path>.key
    # The trainable modes (common/models/finetune.py) the site accepts: what leaves the
    # site each round (the head alone, or backbone tensors too) is the site's call.
    trainable: tuple[str, ...] = TRAINABLE_MODES
    # Timings are a side channel (machine, load, caches): sent only where the site opts in.
    release_timings: bool = False
    device: str = "auto"
    privacy_unit: str = RECORD
    # The most records one patient has at this site (its public declaration; 1: one
    # record each). With record-level DP it gives the group-privacy ε per patient.
    group_size: int = 1
    # In a simulation, the scenario the simulated site is a partition of (None when deployed).
    scenario: RunConfig | None = None
    # The coordinator's published public and test record digests (common/data/digests.py):
    # the site is admitted only if it holds none of those records.
    public_hashes: Path | None = None
    # The federation file the site named (its plan for `site check`), if any.
    federation: Federation | None = None

    @property
    def models(self) -> Path:
        return self.model_dir or self.ledger_path.parent / "models"

    @property
    def state_dir(self) -> Path:
        """The site's own local state (admission record), beside its ledger."""
        return self.ledger_path.parent

    @property
    def unit_text(self) -> str:
        return UNITS_OF_PRIVACY[self.privacy_unit]


# Node-config keys of a deployed site, with their meaning (`fedtransfer site check`
# and docs/deployment.md list them). Simulation adds Flower's own partition-id / num-partitions.
POLICY_KEYS = {
    "data-path": "the site's data: imagefolder:<dir>, csv:<file>?..., medmnist:<file.npz> (required)",
    "ledger-path": "the site's privacy ledger, SQLite (required)",
    "ledger-key": "the ledger's signing key, a file outside the ledger (default: "
                  "<ledger-path>.key, made on first use)",
    "target-epsilon": "the site's ε cap over all runs (required)",
    "target-delta": "the site's δ (required)",
    "schema": "the federation's schema, a TOML ([schema] table) or JSON file: how the site's "
              "records are read (classes; image size and channels, or the features, levels, "
              "label and missing-value policy of a CSV). Relative to the policy file that names it",
    "class-names": "comma-separated class names in the federation's order, for an image site "
                   "without a schema file; labels are mapped by name",
    "image-size": "the side each image is resized to, for an image site without a schema file "
                  "(default 64)",
    "image-channels": "1 or 3, for an image site without a schema file (default 1)",
    "backbone": "the backbone that turns a record into features (default: efficientnet-lite0 "
                "for images, identity for tables); a request for another is declined",
    "federation": "the site's copy of the federation file (TOML) the coordinator and every "
                  "site share: the site's declaration (schema, backbone) and the plan come from "
                  "it, instead of the schema / class-names / image-* / backbone keys",
    "public-hashes": "the coordinator's published digests of its public and test records "
                     "(default: the federation file's); the site is admitted only if it holds "
                     "none of them",
    "dp": "true (default): train only with DP-SGD; false: this site trains without DP, says "
          "so in every reply, and the audit flags it",
    "site-id": "the site's id in the run records (default 0)",
    "site-name": "a label for the site's own log",
    "cache-dir": "feature cache and calibration memo (default: <ledger dir>/cache)",
    "model-dir": "where delivered models are saved (default: <ledger dir>/models)",
    "holdout": "fraction of records held out from training, for local evaluation (default 0.2)",
    "holdout-seed": "the site's seed for the holdout split (default 0)",
    "min-noise-multiplier": f"the smallest σ the site accepts (default "
                            f"{DEFAULT_MIN_NOISE_MULTIPLIER})",
    "max-rounds": "the most rounds one run may ask of the site (default 100)",
    "max-steps": "the most DP-SGD steps one round may take (default 10000)",
    "trainable": "comma-separated trainable modes the site accepts, of "
                 f"{', '.join(TRAINABLE_MODES)} (default: all); 'head' keeps every backbone "
                 "tensor at the site",
    "release-timings": "true: send coarse timings with each reply (a side channel: they depend "
                       "on the machine, its load and the site's caches); default false",
    "device": f"where the site trains: {', '.join(DEVICES)} (default auto)",
    "privacy-unit": "the site's unit of privacy: 'record' (default: one training record) or "
                    "'patient' (all of one patient's records, clipped together; needs patient "
                    "ids in data-path, ?patient=...); a request for another unit is declined",
    "max-records-per-patient": "the most records one patient has at this site (public): "
                               "required with privacy-unit = 'patient' (each step uses at most "
                               "this many of a patient's records); with 'record', an optional "
                               "declaration k for the group-privacy ε per patient",
    "policy-file": "a TOML file holding any of these keys (node-config keys win)",
}
REQUIRED_KEYS = ("data-path", "ledger-path", "target-epsilon", "target-delta")
FLOWER_KEYS = ("partition-id", "num-partitions")


def in_flower_simulation() -> bool:
    """True inside a ClientApp actor of Flower's Ray simulation engine.

    A deployed SuperNode runs its ClientApp in a plain ``flwr-clientapp``
    process that never starts Ray, and nothing the server sends can change that.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001  (not inside a Ray worker)
        return False


def scenario_policy(cfg: RunConfig, node: dict, *, chosen: tuple[str, int] | None = None
                    ) -> SiteSettings:
    """A simulated hospital's policy: the scenario's, since one person runs every
    site, except where the node config sets a policy key itself (a site's own
    setting always wins). Its declaration is the scenario's schema and backbone,
    and it releases timings (the operator is the one person who runs every site).

    A scenario with ``backbone = "auto"`` leaves the backbone (and its image size) to
    the selection on public data, which the ServerApp runs under ``flwr run .``:
    ``chosen`` is what the message says was chosen, a registry name only.

    Raises:
        SiteConfigError: ``auto`` without a choice in the message, or a choice that is
            not a registry backbone.
    """
    if cfg.backbone == "auto":
        names = [n for n in BACKBONE_NAMES if not n.startswith("file:")]
        if chosen is None or chosen[0] not in names:
            raise SiteConfigError(
                f"the scenario leaves the backbone to the selection on public data, and the "
                f"message names {chosen[0] if chosen else 'none'!r}; allowed: {', '.join(names)}")
        cfg = cfg.replace(backbone=chosen[0], image_size=chosen[1] or cfg.image_size)
    site_id = int(node.get("partition-id", 0))
    root = simulated_ledger_dir(cfg)  # one home, recorded by the server for the audit
    scenario = {"site-id": site_id, "ledger-path": str(root / f"site-{site_id}" / "ledger.sqlite"),
                "cache-dir": cfg.cache_dir, "dp": cfg.dp, "target-epsilon": cfg.target_epsilon,
                "target-delta": cfg.target_delta, "holdout": cfg.site_holdout,
                "holdout-seed": cfg.seed, "release-timings": True, "device": cfg.device}
    if cfg.privacy_unit != RECORD or cfg.max_records_per_patient:
        scenario.update({"privacy-unit": cfg.privacy_unit,
                         "max-records-per-patient": cfg.max_records_per_patient})
    return _parse_policy({**scenario, **node}, data_path=None,
                         declaration=scenario_declaration(cfg), scenario=cfg)


@functools.lru_cache(maxsize=4)
def scenario_declaration(cfg: RunConfig) -> Declaration:
    """What every simulated site of a scenario declares: the federation's schema
    (as the server builds it, from the same config) and the scenario's backbone."""
    return Declaration(schema=federation(cfg)[1], backbone=cfg.backbone)


def _read_policy_file(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        # The site's log has the path (the exception chain); the server gets no path.
        log.warning("policy-file %s: %s", p, exc)
        raise SiteConfigError(f"the site's policy-file cannot be read ({type(exc).__name__})") \
            from exc
    if "policy-file" in data:
        raise SiteConfigError("the site's policy-file may not name another policy-file")
    return {k: _resolve(k, v, p.parent) for k, v in data.items()}


# Keys that name files: a relative path in a policy file resolves against that file.
PATH_KEYS = ("data-path", "ledger-path", "ledger-key", "schema", "cache-dir", "model-dir",
             "federation", "public-hashes")
_SPEC_KINDS = ("imagefolder", "csv", "medmnist", "dicom")


def _resolve(key: str, value, base: Path):
    if key not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    kind, sep, rest = value.partition(":")
    if key == "data-path" and sep and kind in _SPEC_KINDS:
        return f"{kind}:{_resolve('schema', rest, base)}"
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _number(node: dict, key: str, kind, default=None, *, low=None, high=None, open_low=False):
    if key not in node:
        if default is None:
            raise SiteConfigError(f"the site's node config lacks '{key}'")
        return default
    raw = node[key]
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = kind(raw)
        if kind is int and float(raw) != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise SiteConfigError(f"node config '{key}' must be {'an integer' if kind is int else 'a number'}, "
                              f"got {raw!r}") from None
    bad = not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) \
        or (high is not None and value >= high)
    if bad:
        rng = f"{'(' if open_low else '['}{low if low is not None else '-inf'}, " \
              f"{high if high is not None else 'inf'})"
        raise SiteConfigError(f"node config '{key}' must be in {rng}, got {raw!r}")
    return value


def _bool(node: dict, key: str, default: bool) -> bool:
    raw = node.get(key, default)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise SiteConfigError(f"node config '{key}' must be true or false, got {raw!r}")


def deployed_policy(node: dict) -> SiteSettings:
    """A deployed site's settings, from its node config (and ``policy-file``).

    Raises:
        SiteConfigError: a required key is missing, a key is unknown, or a value
            is out of range (the message names the key and what is allowed).
    """
    node = dict(node)
    if "policy-file" in node:
        node = {**_read_policy_file(str(node.pop("policy-file"))), **node}
    missing = [k for k in REQUIRED_KEYS if k not in node]
    if missing:
        raise SiteConfigError(
            f"the site's node config lacks {', '.join(missing)}; a deployed site sets them "
            f"itself: flower-supernode --node-config 'data-path=\"...\" ledger-path=\"...\" "
            f"target-epsilon=1.0 target-delta=1e-5 class-names=\"...\" ...'")
    _check_keys(node)
    settings = _parse_policy(node, data_path=str(node["data-path"]),
                             declaration=declared(node), scenario=None)
    fed = load_federation(str(node["federation"])) if "federation" in node else None
    hashes = node.get("public-hashes") or (fed.public_hashes if fed is not None else None)
    return dataclasses.replace(settings, public_hashes=Path(str(hashes)) if hashes else None,
                               federation=fed)


def _check_keys(node: dict) -> None:
    unknown = sorted(set(node) - set(POLICY_KEYS) - set(FLOWER_KEYS))
    if unknown:
        raise SiteConfigError(f"unknown node config key(s) {unknown}; allowed: "
                              f"{', '.join(POLICY_KEYS)}")


def _class_names(node: dict) -> tuple[str, ...] | None:
    names = node.get("class-names")
    if not names:
        return None
    classes = tuple(c.strip() for c in str(names).split(","))
    if any(not c for c in classes) or len(set(classes)) != len(classes) or len(classes) < 2:
        raise SiteConfigError(f"node config 'class-names' must be at least two distinct, "
                              f"non-empty names, got {names!r}")
    return classes


def declared(node: dict) -> Declaration:
    """The site's declaration from its node config (see the module doc): its copy of
    the federation file (``federation``), or its own ``schema`` / ``class-names`` keys.

    Raises:
        SiteConfigError: no classes declared, a schema or federation file that cannot
            be read, or keys that contradict each other (named).
    """
    if "federation" in node:
        try:
            decl = load_federation(str(node["federation"])).declaration
        except (ValueError, SchemaError) as exc:
            log.warning("node config 'federation' %s: %s", node["federation"], exc)
            raise SiteConfigError(f"the site's federation file cannot be used: {exc}") from exc
        own = sorted(k for k in ("schema", "class-names", "image-size", "image-channels",
                                 "backbone") if k in node)
        if own:
            raise SiteConfigError(f"node config keys {own} are fixed by the site's federation "
                                  "file: remove them from the node config")
        return decl
    classes = _class_names(node)
    if "schema" in node:
        try:
            schema = load_schema(str(node["schema"]))
        except SchemaError as exc:
            log.warning("node config 'schema' %s: %s", node["schema"], exc)
            raise SiteConfigError(f"the site's schema file cannot be used: {exc}") from exc
        if classes is not None and classes != schema.classes:
            raise SiteConfigError(f"node config 'class-names' {list(classes)} differ from the "
                                  f"schema's classes {list(schema.classes)}")
        if schema.input == "image":  # the declared window (if any) stays
            schema = dataclasses.replace(
                schema, image_size=_number(node, "image-size", int, schema.image_size or 64,
                                           low=1),
                image_channels=_channels(node, schema.image_channels or 1))
    elif classes is not None:
        schema = image_schema(classes, image_size=_number(node, "image-size", int, 64, low=1),
                              image_channels=_channels(node, 1))
    else:
        raise SiteConfigError("the site declares how its records are read: set 'schema' (the "
                              "federation's schema file) or, for images, 'class-names' (and "
                              "'image-size', 'image-channels')")
    default = "identity" if schema.input == "tabular" else "efficientnet-lite0"
    return Declaration(schema=schema, backbone=str(node.get("backbone", default)))


def _channels(node: dict, default: int) -> int:
    value = _number(node, "image-channels", int, default)
    if value not in (1, 3):
        raise SiteConfigError(f"node config 'image-channels' must be 1 or 3, got {value!r}")
    return value


def _parse_policy(node: dict, *, data_path: str | None, declaration: Declaration,
                  scenario: RunConfig | None) -> SiteSettings:
    _check_keys(node)
    ledger = Path(str(node["ledger-path"]))
    device = str(node.get("device", "auto"))
    if device not in DEVICES:
        raise SiteConfigError(f"node config 'device' must be one of {', '.join(DEVICES)}, "
                              f"got {device!r}")
    return SiteSettings(
        site_id=_number(node, "site-id", int, 0, low=0),
        ledger_path=ledger,
        cache_dir=Path(str(node.get("cache-dir", ledger.parent / "cache"))),
        dp=_bool(node, "dp", True),
        target_epsilon=_number(node, "target-epsilon", float, low=0, open_low=True),
        target_delta=_number(node, "target-delta", float, low=0, high=1, open_low=True),
        declaration=declaration,
        min_noise_multiplier=_number(node, "min-noise-multiplier", float,
                                     DEFAULT_MIN_NOISE_MULTIPLIER, low=0, open_low=True),
        model_dir=Path(str(node["model-dir"])) if "model-dir" in node else None,
        data_path=data_path, site_name=str(node.get("site-name", "")),
        holdout=_number(node, "holdout", float, 0.2, low=0, high=1, open_low=True),
        holdout_seed=_number(node, "holdout-seed", int, 0),
        max_rounds=_number(node, "max-rounds", int, 100, low=1),
        max_steps=_number(node, "max-steps", int, 10_000, low=1),
        ledger_key=Path(str(node["ledger-key"])) if "ledger-key" in node else None,
        trainable=_modes(node), release_timings=_bool(node, "release-timings", False),
        device=device, scenario=scenario, **_unit(node, data_path))


def _unit(node: dict, data_path: str | None) -> dict:
    """The site's unit of privacy and its declared records per patient (see POLICY_KEYS).

    Raises:
        SiteConfigError: an unknown unit, a patient-level site without
            ``max-records-per-patient``, or (deployed) whose ``data-path`` declares no
            patient ids.
    """
    unit = str(node.get("privacy-unit", RECORD))
    if unit not in PRIVACY_UNITS:
        raise SiteConfigError(f"node config 'privacy-unit' must be one of "
                              f"{', '.join(PRIVACY_UNITS)}, got {unit!r}")
    declared = "max-records-per-patient" in node and node["max-records-per-patient"] != 0
    if unit == PATIENT and not declared:
        raise SiteConfigError("node config privacy-unit = 'patient' needs "
                              "'max-records-per-patient' (an integer >= 1, public: the most "
                              "records one patient contributes to a step)")
    k = _number(node, "max-records-per-patient", int, 1, low=1) if declared else 1
    if unit == PATIENT and data_path is not None:
        try:
            patient = data_spec(data_path).patient
        except SiteDataError as exc:
            raise SiteConfigError(f"node config 'data-path': {exc}") from exc
        if patient is None:
            raise SiteConfigError(
                "node config privacy-unit = 'patient' needs each record's patient id: declare "
                "where it comes from in data-path (?patient=column:COL | dicom | folder | "
                "name:PATTERN | manifest:FILE; docs/data.md, 'Patient ids')")
    return {"privacy_unit": unit, "group_size": k}


def _modes(node: dict) -> tuple[str, ...]:
    raw = node.get("trainable", ",".join(TRAINABLE_MODES))
    modes = tuple(m.strip() for m in str(raw).split(",") if m.strip())
    if not modes or any(m not in TRAINABLE_MODES for m in modes):
        raise SiteConfigError(f"node config 'trainable' must be comma-separated modes of "
                              f"{', '.join(TRAINABLE_MODES)}, got {raw!r}")
    return modes


def site_settings(node: dict, *, scenario: RunConfig | None,
                  chosen: tuple[str, int] | None = None) -> SiteSettings:
    """The site's settings: its own node config, or the scenario's in a simulation.

    ``scenario`` is given only where one person runs every site: the
    ``fedtransfer simulate`` harness, or Flower's simulation engine
    (:func:`in_flower_simulation`). A node config with ``data-path`` is always
    a deployed site's, and one without it outside a simulation is refused.
    ``chosen``: the backbone and image size a message names (only a scenario with
    ``backbone = "auto"`` takes them, see :func:`scenario_policy`).
    """
    if "data-path" in node or "policy-file" in node:
        return deployed_policy(node)
    if scenario is not None and "partition-id" in node:
        return scenario_policy(scenario, node, chosen=chosen)
    raise SiteConfigError(
        "the site's node config has no 'data-path': a deployed site names its own data, ledger "
        "and cap (flower-supernode --node-config 'data-path=\"...\" ledger-path=\"...\" "
        "target-epsilon=1.0 target-delta=1e-5'); it never takes them from the server")
