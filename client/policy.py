"""The site's privacy policy: what its records cost and what may leave, decided by the site.

A deployed site reads its policy from its own node config
(``flower-supernode --node-config '...'``), or from a TOML file that the node
config names (``policy-file``); node-config keys win over the file. The run
config the server sends is only a *request*: :func:`check_request` declines
anything outside the policy, with a named reason, before any record is read
and before anything is written to the ledger.

In a simulation (``fedtransfer simulate``, or ``flwr run .`` on Flower's
simulation engine) one person plays every site's administrator, so the
scenario's config is every simulated site's policy (:func:`scenario_policy`).
A node config that looks like a simulated partition (``partition-id``) but runs
anywhere else is refused: falling back to the run config there would let the
coordinator choose the site's cap, ledger and data.
"""

from __future__ import annotations

import logging
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig, simulated_ledger_dir
from common.models.names import TRAINABLE_MODES
from common.privacy.accounting import dp_plan
from common.protocol import MAX_CLASS_WEIGHT, RoundRequest

log = logging.getLogger(__name__)


class SiteConfigError(ValueError):
    """The site's own node config or policy file is incomplete or invalid; it does not train."""


class PolicyDeclined(ValueError):
    """The server's request is outside the site's policy; nothing was read or recorded."""


class RequestRejected(ValueError):
    """The server's round request is unsafe or malformed; nothing was touched."""


@dataclass(frozen=True)
class SiteSettings:
    """The site's own settings and privacy policy. The server can neither see nor
    override them (it learns only what the protocol declares public)."""

    site_id: int
    ledger_path: Path
    cache_dir: Path
    dp: bool
    target_epsilon: float
    target_delta: float
    min_noise_multiplier: float = 0.3
    model_dir: Path | None = None  # delivered models; default: <ledger dir>/models
    # A deployed site's own data (node config ``data-path``: a dataset spec such as
    # ``imagefolder:<dir>``); None in simulation, where the site is a partition.
    data_path: str | None = None
    site_name: str = ""
    holdout: float = 0.2  # the fraction of the site's records held out (never trained on)
    holdout_seed: int = 0  # the site's own seed for that split
    max_rounds: int = 100  # the most rounds one run may ask of this site
    max_steps: int = 10_000  # the most DP-SGD steps one round may take
    class_names: tuple[str, ...] | None = None  # labels by name, in the federation's order
    ledger_key: Path | None = None  # the chain's HMAC key; default <ledger-path>.key
    # The trainable modes (common/models/finetune.py) the site accepts: what leaves the
    # site each round (the head alone, or backbone tensors too) is the site's call.
    trainable: tuple[str, ...] = TRAINABLE_MODES

    @property
    def models(self) -> Path:
        return self.model_dir or self.ledger_path.parent / "models"


# Node-config keys of a deployed site, with their meaning (`fedtransfer site check`
# and docs/deployment.md list them). Simulation adds Flower's own partition-id / num-partitions.
POLICY_KEYS = {
    "data-path": "the site's data: imagefolder:<dir>, csv:<file>?..., medmnist:<file.npz> (required)",
    "ledger-path": "the site's privacy ledger, SQLite (required)",
    "ledger-key": "the ledger chain's secret key, a file outside the ledger (default: "
                  "<ledger-path>.key, made on first use)",
    "target-epsilon": "the site's ε cap over all runs (required)",
    "target-delta": "the site's δ (required)",
    "dp": "true (default): train only with DP-SGD; false: this site trains without DP, says "
          "so in every reply, and the audit flags it",
    "site-id": "the site's id in the run records (default 0)",
    "site-name": "a label for the site's own log",
    "cache-dir": "feature cache and calibration memo (default: <ledger dir>/cache)",
    "model-dir": "where delivered models are saved (default: <ledger dir>/models)",
    "holdout": "fraction of records held out from training, for local evaluation (default 0.2)",
    "holdout-seed": "the site's seed for the holdout split (default 0)",
    "min-noise-multiplier": "the smallest σ the site accepts (default 0.3)",
    "max-rounds": "the most rounds one run may ask of the site (default 100)",
    "max-steps": "the most DP-SGD steps one round may take (default 10000)",
    "class-names": "comma-separated class names in the federation's order; labels are mapped "
                   "by name (needed when labels are not integer indices)",
    "trainable": "comma-separated trainable modes the site accepts, of "
                 f"{', '.join(TRAINABLE_MODES)} (default: all); 'head' keeps every backbone "
                 "tensor at the site",
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


def scenario_policy(cfg: RunConfig, node: dict) -> SiteSettings:
    """A simulated hospital's policy: the scenario's, since one person runs every
    site, except where the node config sets a policy key itself (a site's own
    setting always wins)."""
    site_id = int(node.get("partition-id", 0))
    root = simulated_ledger_dir(cfg)  # issue 24: one home, recorded by the server for the audit
    scenario = {"site-id": site_id, "ledger-path": str(root / f"site-{site_id}" / "ledger.sqlite"),
                "cache-dir": cfg.cache_dir, "dp": cfg.dp, "target-epsilon": cfg.target_epsilon,
                "target-delta": cfg.target_delta, "holdout": cfg.site_holdout,
                "holdout-seed": cfg.seed}
    return _parse_policy({**scenario, **node}, data_path=None)


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
    return data


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
    except (TypeError, ValueError):
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
            f"target-epsilon=1.0 target-delta=1e-5 ...'")
    return _parse_policy(node, data_path=str(node["data-path"]))


def _parse_policy(node: dict, *, data_path: str | None) -> SiteSettings:
    unknown = sorted(set(node) - set(POLICY_KEYS) - set(FLOWER_KEYS))
    if unknown:
        raise SiteConfigError(f"unknown node config key(s) {unknown}; allowed: "
                              f"{', '.join(POLICY_KEYS)}")
    ledger = Path(str(node["ledger-path"]))
    names = node.get("class-names")
    classes = tuple(c.strip() for c in str(names).split(",")) if names else None
    if classes is not None and (any(not c for c in classes) or len(set(classes)) != len(classes)):
        raise SiteConfigError(f"node config 'class-names' must be distinct, non-empty names, "
                              f"got {names!r}")
    return SiteSettings(
        site_id=_number(node, "site-id", int, 0, low=0),
        ledger_path=ledger,
        cache_dir=Path(str(node.get("cache-dir", ledger.parent / "cache"))),
        dp=_bool(node, "dp", True),
        target_epsilon=_number(node, "target-epsilon", float, low=0, open_low=True),
        target_delta=_number(node, "target-delta", float, low=0, high=1, open_low=True),
        min_noise_multiplier=_number(node, "min-noise-multiplier", float, 0.3, low=0,
                                     open_low=True),
        model_dir=Path(str(node["model-dir"])) if "model-dir" in node else None,
        data_path=data_path, site_name=str(node.get("site-name", "")),
        holdout=_number(node, "holdout", float, 0.2, low=0, high=1, open_low=True),
        holdout_seed=_number(node, "holdout-seed", int, 0),
        max_rounds=_number(node, "max-rounds", int, 100, low=1),
        max_steps=_number(node, "max-steps", int, 10_000, low=1),
        class_names=classes,
        ledger_key=Path(str(node["ledger-key"])) if "ledger-key" in node else None,
        trainable=_modes(node))


def _modes(node: dict) -> tuple[str, ...]:
    raw = node.get("trainable", ",".join(TRAINABLE_MODES))
    modes = tuple(m.strip() for m in str(raw).split(",") if m.strip())
    if not modes or any(m not in TRAINABLE_MODES for m in modes):
        raise SiteConfigError(f"node config 'trainable' must be comma-separated modes of "
                              f"{', '.join(TRAINABLE_MODES)}, got {raw!r}")
    return modes


def site_settings(cfg: RunConfig, node: dict, *, simulated: bool) -> SiteSettings:
    """The site's settings: its own node config, or the scenario's in a simulation.

    ``simulated`` is true only where one person runs every site: the
    ``fedtransfer simulate`` harness, or Flower's simulation engine
    (:func:`in_flower_simulation`). A node config with ``data-path`` is always
    a deployed site's, and one without it outside a simulation is refused.
    """
    if "data-path" in node or "policy-file" in node:
        return deployed_policy(node)
    if simulated and "partition-id" in node:
        return scenario_policy(cfg, node)
    raise SiteConfigError(
        "the site's node config has no 'data-path': a deployed site names its own data, ledger "
        "and cap (flower-supernode --node-config 'data-path=\"...\" ledger-path=\"...\" "
        "target-epsilon=1.0 target-delta=1e-5'); it never takes them from the server")


def check_policy(req: RoundRequest, settings: SiteSettings, *,
                 trainable: str | None = None) -> None:
    """Decline a request outside the site's policy, before any record is read.
    ``trainable``: the mode the run would train (None for a query that trains nothing).

    Raises:
        PolicyDeclined: naming each request field and the policy it breaks.
    """
    problems = []
    if trainable is not None and trainable not in settings.trainable:
        problems.append(f"trainable {trainable!r} is not among the modes this site accepts "
                        f"({', '.join(settings.trainable)})")
    if req.dp != settings.dp:
        problems.append(
            "this site trains only with DP-SGD (its policy: dp = true); the request asks for "
            "dp = false" if settings.dp else
            "this site's policy trains without DP (dp = false); the request asks for dp = true")
    for key, value in (("server-round", req.server_round), ("num-rounds", req.num_rounds)):
        if isinstance(value, int) and value > settings.max_rounds:
            problems.append(f"{key} {value} exceeds the site's max-rounds {settings.max_rounds}")
    sigma = req.noise_multiplier
    if settings.dp and math.isfinite(sigma) and 0 < sigma < settings.min_noise_multiplier:
        problems.append(f"noise-multiplier {sigma} is below this site's minimum "
                        f"{settings.min_noise_multiplier}")
    if problems:
        raise PolicyDeclined("outside the site's policy: " + "; ".join(problems))


def check_request(req: RoundRequest, num_records: int, settings: SiteSettings, *,
                  num_classes: int) -> None:
    """Reject a hostile or buggy request before any data is used for training.

    The record count is public (the reply declares it), so naming it is safe;
    so is the class count (the head's shape, which the server sent).
    """
    problems = []
    for key in ("server_round", "num_rounds", "local_epochs", "batch_size"):
        value = getattr(req, key)
        if not isinstance(value, int) or value < 1:
            problems.append(f"{key.replace('_', '-')} must be an integer >= 1, got {value!r}")
    for key in ("learning_rate", "clip_norm"):
        value = getattr(req, key)
        if not (isinstance(value, float | int) and math.isfinite(value) and value > 0):
            problems.append(f"{key.replace('_', '-')} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(req.momentum) and 0 <= req.momentum < 1):
        problems.append(f"momentum must be in [0, 1), got {req.momentum!r}")
    sigma = req.noise_multiplier
    if not math.isfinite(sigma) or sigma < 0:
        problems.append(f"noise-multiplier must be >= 0 (0: the site calibrates), got {sigma!r}")
    weights = req.class_weights
    if weights and len(weights) != num_classes:
        problems.append(f"class-weights has {len(weights)} values, the head has {num_classes} "
                        "classes")
    if weights and not all(math.isfinite(w) and 0 < w <= MAX_CLASS_WEIGHT for w in weights):
        problems.append(f"class-weights must be finite numbers in (0, {MAX_CLASS_WEIGHT:g}], got "
                        f"{list(weights)[:10]!r}")
    if isinstance(req.batch_size, int) and req.batch_size > num_records:
        problems.append(f"batch-size {req.batch_size} exceeds this site's {num_records} training records")
    elif not problems:
        _, steps = dp_plan(num_records, batch_size=req.batch_size, epochs=req.local_epochs)
        if steps > settings.max_steps:
            problems.append(f"the round would take {steps} steps, above the site's max-steps "
                            f"{settings.max_steps}")
    if problems:
        raise RequestRejected("request rejected by site: " + "; ".join(problems))
