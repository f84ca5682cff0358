"""Run configuration: parsed once into a frozen dataclass.

:class:`RunConfig`'s defaults are the one source of defaults: they are the offline
default scenario that ``make demo``, ``fedtransfer simulate`` without ``--config``
and ``flwr run .`` all run (``[tool.flwr.app.config]`` in pyproject.toml repeats
them for Flower, and a test fails when the two drift). Their hyperparameters were
chosen on the digits public validation split, never on a site's records.

Keys are kebab-case, as in Flower's ``[tool.flwr.app.config]``. Every consumer
below the apps takes :class:`RunConfig`, never a raw mapping. Unknown keys and
bad values fail here, before any work starts, with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.aggregation import AGGREGATIONS
from common.data.schema import SchemaError, load_schema
from common.models.names import HEAD_NAMES, STUDENT_NAMES, TRAINABLE_MODES

# The names each key takes. Registries with an implementation live beside it
# (aggregations, accountants, backbones, datasets) and are imported here; the
# torch-backed ones (heads, students, trainable modes) by name from
# common/models/names.py, so that parsing a config never imports torch; the rest
# are listed here once.
MODES = ("federated", "centralized")
PARTITIONERS = ("iid", "dirichlet", "site")  # site: the records' own sites (natural)
DEVICES = ("auto", "cpu", "cuda")
# Which teacher the student is distilled from (common/models/distill.py).
TEACHERS = ("auto", "global", "ensemble")
# Where the training hyperparameters came from. Tuning on the sites' private
# records costs privacy that no ledger charges, so the run records say which.
HYPERPARAMETER_SOURCES = ("unspecified", "public", "private")
# common.privacy.accounting.PRIVACY_UNITS (tests/common/test_config.py keeps them equal; the
# accountant is not imported here).
PRIVACY_UNITS = ("record", "patient")
# Class weights in the sites' training loss. "public": balanced weights from the
# class counts of the server's public validation split, sent in every round
# request; never from a site's private counts, which would be an uncharged release.
CLASS_WEIGHTS = ("none", "public")
# What the shipped decision rule maximises on the public validation split (common/models/decision.py);
# argmax: ship no threshold.
DECISION_OBJECTIVES = ("balanced-accuracy", "accuracy", "argmax")
SELECTION_SCORES = ("rehearsal", "logme", "probe")  # backbone = "auto" (common/models/transfer.py)
# learning-rate = 0: by input. Image features: chosen on the digits public validation split
# (the demo's); tabular records: chosen on breast-cancer's public validation split
# (simulations/configs/breast-cancer.toml says how).
DEFAULT_LEARNING_RATES = {"image": 8.0, "tabular": 0.5}
# Datasets whose records are tabular, by name (a CSV, or a tabular registry entry).
TABULAR_DATASETS = ("breast-cancer-hospitals",)
# Backbones that take tabular records (the features as they are).
TABULAR_BACKBONES = ("auto", "identity")


def simulated_ledger_dir(cfg: RunConfig) -> Path:
    """Where a simulated site keeps its ledger: ``ledger-dir``, else ``<out-dir>/sites``,
    else ``.fedtransfer/sites`` (``flwr run .`` with the default paths). The server records
    it in the run's config.toml, so ``fedtransfer audit <run>`` finds the ledgers."""
    return Path(cfg.ledger_dir or (Path(cfg.out_dir or ".fedtransfer") / "sites"))


def is_tabular_dataset(spec: str) -> bool:
    """Whether ``dataset`` names tabular records: ``csv:...``, a bare ``.csv`` path, or a
    tabular registry name. Decided from the name alone, so a config error needs no data."""
    return spec in TABULAR_DATASETS or spec.startswith("csv:") or spec.lower().endswith(".csv")


@dataclass(frozen=True)
class RunConfig:
    """Typed, validated run configuration (one object per run).

    Field names are the snake_case form of the kebab-case config keys.
    """

    # What runs
    mode: str = "federated"
    dp: bool = True
    seed: int = 0
    device: str = "auto"
    # Data and sites
    dataset: str = "digits"
    data_dir: str = ""
    num_sites: int = 4
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    site_holdout: float = 0.2
    site_shift: float = 0.3  # per-site acquisition shift of simulated hospitals (0: none)
    # Backbone and head
    # "auto" (the default, what `make demo` runs): identity for tabular records; for images,
    # chosen before any ε is spent by the rehearsal on the public validation split
    # (common/models/transfer.py, `fedtransfer select`).
    backbone: str = "auto"
    image_size: int = 64
    image_channels: int = 1  # an image-folder site converts every image to this (1 or 3)
    # backbone = "auto": chosen before any ε is spent, by a transferability score on the
    # public validation split (common/models/transfer.py, `fedtransfer select`); "" = the default zoo.
    backbone_candidates: str = ""
    selection_score: str = "rehearsal"  # rehearsal | logme | probe
    backbone_selection: str = ""  # the selection's evidence (JSON), written by the selection
    # The federation's schema (common/data/schema.py): a [schema] table in the scenario file, JSON
    # text, or a .toml/.json path. Empty: derived from the dataset (classes; a CSV's columns).
    schema: str = ""
    scaling_budget: float = 0.1  # dp scaling: the share of each site's cap its scaling release spends
    head: str = "linear"
    hidden_dim: int = 128
    # What each site trains with DP-SGD (common/models/finetune.py): the head on frozen
    # features, or also the backbone's last block (bitfit: its BN affine terms; last-block: all).
    trainable: str = "head"
    # Federated schedule
    num_rounds: int = 5
    local_epochs: int = 3
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 600.0
    # Robustness against broken or hostile site updates (common/aggregation.py)
    aggregation: str = "fedavg"  # fedavg | median | trimmed-mean (Flower's FedMedian/FedTrimmedAvg maths) | secagg+
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut at each end (Flower's beta)
    max_update_norm: float = 0.0  # L2 bound on (site head - global head); 0: derive from clip-norm, < 0: off
    max_site_weight: float = 1.0  # the largest share of the FedAvg weight one site's num-examples can carry
    secagg_max_weight: float = 1000.0  # secagg+: the num-examples a site's quantised weight is scaled by (Flower's max_weight)
    resume: bool = False  # continue from <out-dir>/checkpoint (the last completed round)
    # Optimisation
    batch_size: int = 64  # the expected batch; smaller sites get a smaller one (common/batches.py)
    # 0 = by input (RunConfig.lr): 8.0 on image features (chosen on the digits public
    # validation split), 0.5 on tabular records (chosen on breast-cancer's public validation
    # split, simulations/configs/breast-cancer.toml).
    learning_rate: float = 0.0
    momentum: float = 0.0
    class_weights: str = "none"  # none | public (from the server's public val split counts)
    decision_objective: str = "balanced-accuracy"  # balanced-accuracy | accuracy | argmax
    # Differential privacy (the site's own cap: target-epsilon / target-delta)
    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 4.0
    target_delta: float = 1e-5
    # The unit of privacy the federation asks for and simulated sites declare (their policy:
    # a deployed site's own node config decides, and declines a request for another unit).
    privacy_unit: str = "record"  # record | patient
    # The most records one patient has at a simulated site (public): required with the patient
    # unit (the bag cap); with the record unit, 0 (none declared) or k for the group-privacy ε.
    max_records_per_patient: int = 0
    # Where the hyperparameters were chosen: public (e.g. a public val split) | private |
    # unspecified. The defaults were chosen on public data; say so when you tune your own.
    hyperparameter_source: str = "public"
    # Distillation after the last round (public data only: post-processing, no ε)
    distill: bool = True
    student: str = "cnn"
    student_width: int = 32
    student_depth: int = 3
    teacher: str = "auto"
    distill_epochs: int = 30
    distill_patience: int = 5
    distill_temperature: float = 4.0
    distill_learning_rate: float = 3e-3
    distill_augment: int = 4
    distill_val_fraction: float = 0.3
    transfer_data: str = ""
    # A federation file (TOML) the coordinator and every site share: the schema, the backbone,
    # the public data and the plan (common/federation.py). Its keys are this config's keys,
    # with paths relative to the file; a run config may not contradict it.
    federation: str = ""
    # Where things go
    cache_dir: str = ".fedtransfer/cache"
    ledger_dir: str = ""
    out_dir: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def tabular(self) -> bool:
        """Whether the dataset holds tabular records (known from its name, no data read)."""
        return is_tabular_dataset(self.dataset)

    @property
    def lr(self) -> float:
        """The learning rate the sites are asked to use: ``learning-rate``, or with 0
        the default for the input (:data:`DEFAULT_LEARNING_RATES`)."""
        if self.learning_rate > 0:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES["tabular" if self.tabular else "image"]

    def resolved_backbone(self) -> RunConfig:
        """``backbone = "auto"`` on tabular records is ``identity`` (nothing to choose)."""
        if self.backbone == "auto" and self.tabular:
            return self.replace(backbone="identity")
        return self

    # -- conversions -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping, the inverse of :func:`parse_config`."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_toml(self) -> str:
        lines = ["# Resolved fedtransfer configuration (all keys, after overrides)"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


_FIELDS = {f.name.replace("_", "-"): f for f in fields(RunConfig)}
_TYPES = {f.name.replace("_", "-"): type(f.default) for f in fields(RunConfig)}
ALLOWED_KEYS = tuple(sorted(_FIELDS))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _coerce(key: str, value: Any) -> Any:
    """Convert one raw value to the field's type, or raise naming the key."""
    kind = _TYPES[key]
    if key == "schema" and isinstance(value, Mapping):  # a [schema] table: canonical JSON
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"config key '{key}' must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key '{key}' must be a number, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"config key '{key}' must be a string, got {value!r}")
    return value


def parse_config(raw: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Parse a kebab-case mapping into a :class:`RunConfig`.

    Raises:
        ValueError: on an unknown key (listing the allowed ones) or a bad value.
    """
    values = (base or RunConfig()).to_dict()
    raw = _with_federation(raw, values)
    for key, value in raw.items():
        if key not in _FIELDS:
            raise ValueError(
                f"unknown config key '{key}'. Allowed keys: {', '.join(ALLOWED_KEYS)}"
            )
        values[key] = _coerce(key, value)
    return RunConfig(**{k.replace("-", "_"): v for k, v in values.items()})


# Keys of a federation file that name files: relative to the federation file.
FEDERATION_PATH_KEYS = ("data-dir", "schema", "transfer-data")
# The federation file's own table (name, published hashes), not config keys.
FEDERATION_TABLE = "federation"


def read_federation_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config keys, [federation] table)`` of a federation file; paths in it are
    resolved against the file, and its ``[schema]`` table becomes the ``schema`` key.

    Raises:
        ValueError: the file cannot be read, or names a key this config does not have.
    """
    path = Path(path).expanduser()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"federation file {path}: {exc}") from exc
    meta = data.pop(FEDERATION_TABLE, {})
    if not isinstance(meta, Mapping):
        raise ValueError(f"federation file {path}: [{FEDERATION_TABLE}] must be a table")
    unknown = sorted(k for k in data if k not in _FIELDS or k == "federation")
    if unknown:
        raise ValueError(f"federation file {path}: unknown key(s) {unknown}; allowed: "
                         f"{', '.join(k for k in ALLOWED_KEYS if k != 'federation')}, and a "
                         f"[{FEDERATION_TABLE}] table")
    for key in FEDERATION_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and not value.lstrip().startswith("{") \
                and not Path(value).expanduser().is_absolute():
            data[key] = str((path.parent / value).resolve())
    return data, {**meta, "path": str(path.resolve())}


def _with_federation(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` on top of the federation file it names: the file's keys replace the
    defaults; a raw value may repeat the file's, or leave a key at its default, but
    never contradict it (that would be two plans for one federation)."""
    path = raw.get("federation")
    if not path:
        return dict(raw)
    keys, _ = read_federation_file(str(path))
    out = {**keys, "federation": str(Path(str(path)).expanduser().resolve())}
    for key, value in raw.items():
        if key == "federation" or key not in _FIELDS:
            out.setdefault(key, value)
            continue
        if key in keys:
            mine = _coerce(key, value)
            if mine != _coerce(key, keys[key]) and mine != defaults.get(key):
                raise ValueError(f"config key '{key}' = {value!r} contradicts the federation file "
                                 f"{path} ({keys[key]!r}); change the file, which every site "
                                 "shares, not one run's config")
            continue
        out[key] = value
    return out


# Keys that name files or folders (a run config's relative path resolves against whichever
# process reads it: under `flwr run` that is the SuperLink's working directory).
PATH_KEYS = ("data-dir", "schema", "transfer-data", "cache-dir", "ledger-dir", "out-dir",
             "federation")


def relative_paths(raw: Mapping[str, Any]) -> list[str]:
    """The keys of ``raw`` that give a relative path different from the default."""
    defaults = RunConfig().to_dict()
    out = []
    for key in PATH_KEYS:
        value = raw.get(key)
        if (isinstance(value, str) and value and value != defaults[key]
                and not value.lstrip().startswith("{") and not Path(value).expanduser().is_absolute()):
            out.append(key)
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["key=value", ...]`` (from ``--set``) into a raw mapping.

    Values are read as TOML scalars when they parse (``dp=false``, ``seed=3``),
    else as plain strings (``dataset=medmnist:pneumoniamnist``).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a scenario TOML. Keys may sit at top level or under ``[config]``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    if "config" in data and isinstance(data["config"], dict):
        data = {**{k: v for k, v in data.items() if k != "config"}, **data["config"]}
    return data


def _validate(cfg: RunConfig) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"config key '{key}': {why}")

    if cfg.mode not in MODES:
        raise bad("mode", f"got {cfg.mode!r}, allowed: {', '.join(MODES)}")
    if cfg.partitioner not in PARTITIONERS:
        raise bad("partitioner", f"got {cfg.partitioner!r}, allowed: {', '.join(PARTITIONERS)}")
    if cfg.trainable not in TRAINABLE_MODES:
        raise bad("trainable", f"got {cfg.trainable!r}, allowed: {', '.join(TRAINABLE_MODES)}")
    if is_tabular_dataset(cfg.dataset) and cfg.backbone not in TABULAR_BACKBONES:
        raise bad("backbone", f"dataset {cfg.dataset!r} holds tabular records; backbone "
                  f"{cfg.backbone!r} takes images. Set backbone = \"identity\" (or leave the "
                  "default, \"auto\")")
    if cfg.trainable != "head" and cfg.backbone != "efficientnet-lite0":
        raise bad("trainable", f"{cfg.trainable!r} tunes EfficientNet-Lite0's last block; "
                  f"backbone {cfg.backbone!r} supports only 'head' (set backbone = "
                  "\"efficientnet-lite0\")")
    if cfg.trainable != "head" and cfg.aggregation == "secagg+":
        raise bad("trainable", f"{cfg.trainable!r} is not supported with aggregation='secagg+' "
                  "(its masking is sized for a head); use 'head'")
    if cfg.head not in HEAD_NAMES:
        raise bad("head", f"got {cfg.head!r}, allowed: {', '.join(HEAD_NAMES)}")
    if cfg.device not in DEVICES:
        raise bad("device", f"got {cfg.device!r}, allowed: {', '.join(DEVICES)}")
    if cfg.student not in STUDENT_NAMES:
        raise bad("student", f"got {cfg.student!r}, allowed: {', '.join(STUDENT_NAMES)}")
    if cfg.selection_score not in SELECTION_SCORES:
        raise bad("selection-score", f"got {cfg.selection_score!r}, allowed: "
                  f"{', '.join(SELECTION_SCORES)}")
    if cfg.teacher not in TEACHERS:
        raise bad("teacher", f"got {cfg.teacher!r}, allowed: {', '.join(TEACHERS)}")
    if cfg.privacy_unit not in PRIVACY_UNITS:
        raise bad("privacy-unit", f"got {cfg.privacy_unit!r}, allowed: {', '.join(PRIVACY_UNITS)}")
    if cfg.max_records_per_patient < 0 or (cfg.privacy_unit == "patient"
                                           and cfg.max_records_per_patient < 1):
        raise bad("max-records-per-patient", f"must be an integer >= 1 with privacy-unit = "
                  f"\"patient\" (0: none declared, record unit only), got "
                  f"{cfg.max_records_per_patient!r}")
    if cfg.hyperparameter_source not in HYPERPARAMETER_SOURCES:
        raise bad("hyperparameter-source", f"got {cfg.hyperparameter_source!r}, allowed: "
                  f"{', '.join(HYPERPARAMETER_SOURCES)}")
    if cfg.decision_objective not in DECISION_OBJECTIVES:
        raise bad("decision-objective", f"got {cfg.decision_objective!r}, allowed: "
                  f"{', '.join(DECISION_OBJECTIVES)}")
    if cfg.class_weights not in CLASS_WEIGHTS:
        raise bad("class-weights", f"got {cfg.class_weights!r}, allowed: "
                  f"{', '.join(CLASS_WEIGHTS)} (public: from the server's public validation split)")
    if cfg.aggregation not in AGGREGATIONS:
        raise bad("aggregation", f"got {cfg.aggregation!r}, allowed: {', '.join(AGGREGATIONS)}")
    if not 0.0 <= cfg.trim_fraction < 0.5:
        raise bad("trim-fraction", f"must be in [0, 0.5), got {cfg.trim_fraction!r}")
    if not 0.0 < cfg.max_site_weight <= 1.0:
        raise bad("max-site-weight", f"must be in (0, 1], got {cfg.max_site_weight!r}")
    if cfg.aggregation == "secagg+":
        why = "the server sees only the SecAgg+ masked sum of the site heads"
        if cfg.max_site_weight < 1.0:
            raise bad("max-site-weight", f"cannot be capped with aggregation='secagg+': {why}")
        if cfg.max_update_norm > 0:
            raise bad("max-update-norm", f"cannot bound single updates with aggregation='secagg+': "
                      f"{why}")
        if cfg.teacher == "ensemble":
            raise bad("teacher", f"'ensemble' needs each site's head; with aggregation='secagg+' "
                      f"{why} (use 'global' or 'auto')")
        if cfg.min_sites < 2:
            raise bad("min-sites", "must be >= 2 with aggregation='secagg+' (a sum over one site "
                      "hides nothing)")
    if not cfg.secagg_max_weight > 0 or cfg.secagg_max_weight == float("inf"):
        raise bad("secagg-max-weight", f"must be a finite number > 0, got {cfg.secagg_max_weight!r}")
    if cfg.resume and not cfg.out_dir:
        raise bad("resume", "needs out-dir: the run directory whose checkpoint/ to continue from")
    if cfg.max_update_norm != cfg.max_update_norm or cfg.max_update_norm == float("inf"):
        raise bad("max-update-norm", f"must be finite (0: derive from clip-norm, < 0: off), "
                  f"got {cfg.max_update_norm!r}")
    positive_ints = ("num-sites", "num-rounds", "local-epochs", "batch-size", "image-size", "hidden-dim",
                     "student-width", "student-depth", "distill-epochs", "distill-patience")
    for key in positive_ints:
        if getattr(cfg, key.replace("-", "_")) < 1:
            raise bad(key, "must be >= 1")
    if cfg.min_sites < 1:
        raise bad("min-sites", "must be >= 1")
    if cfg.min_sites > cfg.num_sites:
        raise bad("min-sites", f"{cfg.min_sites} exceeds num-sites={cfg.num_sites}")
    if cfg.image_channels not in (1, 3):
        raise bad("image-channels", f"must be 1 or 3, got {cfg.image_channels!r}")
    if cfg.student_depth > 6:
        raise bad("student-depth", f"must be between 1 and 6, got {cfg.student_depth}")
    if cfg.student_width > 256:
        raise bad("student-width", f"must be between 1 and 256, got {cfg.student_width}")
    if cfg.distill_augment < 0:
        raise bad("distill-augment", f"must be >= 0 (augmented copies of the transfer set), "
                  f"got {cfg.distill_augment}")
    if not 0.0 < cfg.distill_val_fraction < 1.0:
        raise bad("distill-val-fraction", f"must be in (0, 1), got {cfg.distill_val_fraction!r}")
    if not (0 <= cfg.learning_rate < float("inf")):  # also rejects NaN
        raise bad("learning-rate", f"must be a finite number > 0, or 0 for the default by input "
                  f"(8.0 on image features, 0.5 on tabular records), got {cfg.learning_rate!r}")
    for key in ("clip-norm", "dirichlet-alpha", "round-timeout", "target-epsilon",
                "distill-temperature", "distill-learning-rate"):
        value = getattr(cfg, key.replace("-", "_"))
        if not value > 0 or value != value or value == float("inf"):
            raise bad(key, f"must be a finite number > 0, got {value!r}")
    if not 0.0 < cfg.target_delta < 1.0:
        raise bad("target-delta", f"must be in (0, 1), got {cfg.target_delta!r}")
    if not 0.0 < cfg.fraction_train <= 1.0:
        raise bad("fraction-train", f"must be in (0, 1], got {cfg.fraction_train!r}")
    if not 0.0 < cfg.site_holdout < 1.0:
        raise bad("site-holdout", f"must be in (0, 1), got {cfg.site_holdout!r}")
    if not 0.0 <= cfg.site_shift <= 1.0:
        raise bad("site-shift", f"must be in [0, 1], got {cfg.site_shift!r}")
    if not 0.0 <= cfg.momentum < 1.0:
        raise bad("momentum", f"must be in [0, 1), got {cfg.momentum!r}")
    if not 0.0 < cfg.scaling_budget <= 0.5:
        raise bad("scaling-budget", f"must be in (0, 0.5] (the share of each site's ε cap spent "
                  f"on DP feature scaling), got {cfg.scaling_budget!r}")
    if cfg.schema:
        try:
            load_schema(cfg.schema)
        except SchemaError as exc:
            raise bad("schema", str(exc)) from exc
    if not 0 <= cfg.noise_multiplier < float("inf"):  # also rejects NaN
        raise bad("noise-multiplier", f"must be a finite number >= 0 (0 means: calibrate to "
                  f"target-epsilon), got {cfg.noise_multiplier!r}")


# --------------------------------------------------------------------------
# The key reference (docs/configuration.md's table is generated from this and
# RunConfig's defaults; tests/common/test_config.py fails when the file drifts).
# --------------------------------------------------------------------------
KEY_DOCS: dict[str, str] = {
    "mode": "`federated` (Flower simulation) or `centralized` (all site records pooled: the utility ceiling)",
    "dp": "`true`: DP-SGD at every site; `false`: the same run without DP (baseline)",
    "seed": "base seed: splits, partitions, initial head; site `i` trains with `seed + i` (DP noise is never seeded)",
    "device": "`auto` (CUDA when present), `cpu`, `cuda`",
    "dataset": "`digits` (offline default), `medmnist:<name>` / `medmnist:<path.npz>`, `imagefolder:<dir>`, `dicom:<dir>` (`?site=folder&patient=...`), `csv:<file>` (`?label=COL&site=COL&missing=error\\|drop\\|zero&patient=column:COL`) or `csv:<dir of one file per site>`, or `breast-cancer-hospitals` ([data.md](data.md))",
    "data-dir": "where `medmnist:<name>` looks for `<name>.npz` (then `$MEDMNIST_DIR`, `~/.medmnist`, then download)",
    "num-sites": "hospitals; with `partitioner = \"site\"` it must equal the records' own sites",
    "partitioner": "`iid`, `dirichlet` (label skew, flwr-datasets) or `site` (the records' own sites: a natural partition)",
    "dirichlet-alpha": "Dirichlet concentration of the label skew (smaller: more skewed)",
    "site-holdout": "each site's own held-out fraction, for local evaluation (by patient where patient ids are declared)",
    "site-shift": "0–1: per-hospital contrast, brightness and noise (a simulated scanner difference; images only)",
    "backbone": "`auto` (default: `identity` for tabular records; for images chosen on the public validation split before any ε is spent, [selection.md](selection.md)), `efficientnet-lite0`/`-lite1`/`-lite2`, `identity` (tabular / precomputed features), or `file:<TorchScript or state-dict>`",
    "image-size": "the side images are resized to (each on its own)",
    "image-channels": "1 or 3: every image is converted to this (colour to grey by luma)",
    "backbone-candidates": "for `backbone = \"auto\"`: comma-separated `name@size`; empty: the offline zoo",
    "selection-score": "for `backbone = \"auto\"`: `rehearsal` (default), `logme` or `probe`",
    "backbone-selection": "written by the selection: its evidence (JSON); leave empty",
    "federation": "a federation file (`fedtransfer federation init`, [deployment.md](deployment.md)): its keys are the defaults of this run; a key given here that contradicts it is an error",
    "schema": "the federation's schema ([data.md](data.md)): a `[schema]` table in the scenario file, JSON text, or a `.toml`/`.json` path; empty: derived from the dataset",
    "scaling-budget": "for `dp`-scaled features: the share of each site's cap its scaling release spends (0–0.5)",
    "head": "`linear` or `mlp` classifier head (with `trainable = head`, the only weights that cross the wire)",
    "hidden-dim": "the `mlp` head's hidden width",
    "trainable": "what each site trains with DP-SGD: `head`, `bitfit` or `last-block` ([finetuning.md](finetuning.md))",
    "num-rounds": "federated rounds the server requests",
    "local-epochs": "epochs per round at each site",
    "fraction-train": "share of connected sites sampled per round",
    "min-sites": "sites that must be connected for a round",
    "round-timeout": "seconds the server waits for replies (a dead site costs one timeout per message)",
    "aggregation": "`fedavg` (weighted), `median`, `trimmed-mean`, or `secagg+` ([deployment.md](deployment.md#secure-aggregation-secagg))",
    "trim-fraction": "`trimmed-mean`: the fraction cut at each end",
    "max-update-norm": "L2 bound on a site's head minus the global head: `0` derives it from the round's clip norm, learning rate, momentum, steps, expected batch and σ; `> 0` explicit; `< 0` off",
    "max-site-weight": "the largest share of the FedAvg weight one site's `num-examples` can carry (1: no cap)",
    "secagg-max-weight": "`secagg+`: each site scales its head by `num-examples / secagg-max-weight` before quantising",
    "resume": "`true`: continue the run in `out-dir` from its last completed round",
    "batch-size": "the expected batch (Poisson sampling); a site with fewer than 4 batches' worth of training records gets `floor(n / 4)` (`common/batches.py`), and one with fewer than 4 records stops the run before round 1, named",
    "learning-rate": "`0` (default): by input, 8.0 on image features, 0.5 on tabular records (each chosen on a public validation split); or any value > 0",
    "momentum": "SGD momentum at the sites",
    "class-weights": "`none`, or `public`: balanced loss weights from the public validation split's class counts (never a site's), sent in the round request",
    "decision-objective": "what the shipped decision rule (the head's and the student's) maximises on public validation data: `balanced-accuracy`, `accuracy`, or `argmax` (no threshold)",
    "clip-norm": "per-sample clip norm",
    "noise-multiplier": "σ; `0`: each site calibrates σ to its own cap (never below its `min-noise-multiplier`)",
    "target-epsilon": "each site's ε cap (in deployment: the site's node config; unit: `privacy-unit`, one training record or one patient at one site)",
    "target-delta": "each site's δ (in deployment: the site's node config)",
    "privacy-unit": "the unit of privacy asked of the sites: `record` (one training record) or `patient` (all of one patient's records, clipped together; q is over patients, `batch-size` is patients per step). A simulated site's policy; a deployed site's own node config decides and declines a request for another unit",
    "max-records-per-patient": "the most records one patient has at a simulated site (public; a deployed site's own node config): required with `privacy-unit = \"patient\"` (each step uses at most this many of a patient's records); with `record`, `0` (none declared) or k, for the group-privacy ε per patient the audit prints",
    "hyperparameter-source": "`public`, `private` or `unspecified`: where the hyperparameters were chosen; the audit flags `private` (error) and `unspecified` (warning)",
    "distill": "distil a student on public data after the last round (no ε)",
    "student": "`cnn` (raw images) or `mlp`",
    "student-width": "the student's width (1–256)",
    "student-depth": "the student's depth (1–6)",
    "teacher": "`auto`, `global` (backbone + global head) or `ensemble` (the sites' last heads)",
    "distill-epochs": "distillation epochs (early-stopped)",
    "distill-patience": "epochs without improvement before distillation stops",
    "distill-temperature": "softmax temperature of the distillation loss",
    "distill-learning-rate": "the student's learning rate",
    "distill-augment": "shifted/jittered copies of the transfer set",
    "distill-val-fraction": "share of the public validation split kept to early-stop and choose the student's rule",
    "transfer-data": "a server-side folder or `.npz` used as the transfer set instead (refused if it shares a record with training data)",
    "cache-dir": "feature cache",
    "ledger-dir": "simulated sites' ledgers (default: `<out-dir>/sites`)",
    "out-dir": "the run directory (default: `runs/<timestamp>`)",
}


def reference_table() -> str:
    """docs/configuration.md's key table: every RunConfig key, its default, its meaning."""
    missing = sorted(set(ALLOWED_KEYS) - set(KEY_DOCS))
    extra = sorted(set(KEY_DOCS) - set(ALLOWED_KEYS))
    if missing or extra:
        raise ValueError(f"KEY_DOCS out of step with RunConfig: missing {missing}, unknown {extra}")
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, value in RunConfig().to_dict().items():
        rows.append(f"| `{key}` | `{_toml_value(value)}` | {KEY_DOCS[key]} |")
    return "\n".join(rows) + "\n"


REFERENCE_BEGIN = "<!-- generated from common/config.py (RunConfig, KEY_DOCS): python -m common.config -->"
REFERENCE_END = "<!-- end of generated table -->"


def render_reference(doc: str) -> str:
    """``doc`` with the text between the generated-table markers replaced."""
    head, sep, rest = doc.partition(REFERENCE_BEGIN)
    if not sep:
        raise ValueError(f"the page has no {REFERENCE_BEGIN!r} marker")
    _, sep2, tail = rest.partition(REFERENCE_END)
    if not sep2:
        raise ValueError(f"the page has no {REFERENCE_END!r} marker")
    return f"{head}{REFERENCE_BEGIN}\n{reference_table()}{REFERENCE_END}{tail}"


if __name__ == "__main__":  # regenerate docs/configuration.md's table
    page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    page.write_text(render_reference(page.read_text()))
    print(f"wrote {page}")
