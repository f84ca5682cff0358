"""The wire protocol between the server and the sites: one home for every field.

The server sends a :class:`RoundRequest` (the ``config`` record of a ``train``
message) and the global head. A site answers with one of three replies, each a
typed class here: a trained head with its public values (:class:`TrainReply`),
a decline with a status code (:class:`Decline`), or (after the last round) a
delivery receipt (:class:`DeliveryReceipt`). No reply is built by hand.

Every value that leaves a site has a privacy class (:class:`Privacy`):

* ``dp``: a differentially private release charged to the site's ledger (the
  DP-SGD head);
* ``public``: declared public. It is a function of the request, the site's own
  policy and declaration, its ledger (itself a function of those) and its record
  count fixed when its data was checked, never of the records' values; the run
  summary and the audit list it as such;
* ``forbidden``: computed from private records without DP (a training loss,
  holdout metrics, a feature-cache flag, file or class names, exception text).
  It never leaves; the site logs it locally.

Timings are a side channel (they depend on the machine, its load and the
site's caches): they leave only where the site's own policy opts in
(``release-timings = true``), coarsened to :data:`TIMING_RESOLUTION_S`.

A site answers every failure with a fixed status code (:data:`STATUSES`); a
reason is text built from the request, the site's policy and public values
only, or a fixed sentence (:data:`FIXED_REASONS`). Exception text stays in the
site's log.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum

import numpy as np


class Privacy(str, Enum):
    DP = "dp"
    PUBLIC = "public"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Field:
    key: str
    privacy: Privacy
    meaning: str


# Timings, where a site's policy releases them, are coarsened to this resolution.
# The site's own log keeps the exact values.
TIMING_RESOLUTION_S = 0.1

_P, _DP, _F = Privacy.PUBLIC, Privacy.DP, Privacy.FORBIDDEN

TRAIN_REPLY = (
    Field("arrays", _DP, "the head trained with DP-SGD (Opacus), charged to the ledger; with "
          "trainable = bitfit / last-block also the backbone tensors that mode trains "
          "('backbone.<name>', same DP-SGD run; never BN running statistics)"),
    Field("site-id", _P, "the site's id (its own node config)"),
    Field("num-examples", _P, "the site's training-unit count, fixed when its data was checked "
                              "(the FedAvg weight; public under replace-one neighbours)"),
    Field("dp", _P, "1 when the site's own policy trains with DP-SGD, 0 when it does not"),
    Field("epsilon", _P, "cumulative ε from the site's ledger (a function of σ, q, steps, δ)"),
    Field("delta", _P, "the site's δ (its own policy)"),
    Field("noise-multiplier", _P, "σ of the round (calibrated from the cap and the plan)"),
    Field("sample-rate", _P, "q of the round (from batch size and unit count)"),
    Field("steps", _P, "DP-SGD steps of the round (from epochs and unit count)"),
    Field("ledger-entries", _P, "entries in the site's ledger after the round (an anchor)"),
    Field("ledger-head", _P, "hash of the ledger's last entry (an anchor; the entries hold "
                             "mechanism tuples and public values only)"),
    Field("ledger-signature", _P, "the site's Ed25519 signature over its ledger's anchor "
                                  "(ledger id, entry count, head hash): verifiable with the "
                                  "site's public key only"),
    Field("ledger-id", _P, "the ledger's random id (part of the signed anchor)"),
    Field("ledger-key-id", _P, "which of the site's public keys signed the anchor"),
    Field("privacy-unit", _P, "the unit of privacy the site's ε is stated in (its own policy)"),
    Field("feature-seconds", _P, f"seconds for features, to {TIMING_RESOLUTION_S} s; only where "
                                 "the site's policy sets release-timings = true (a side channel)"),
    Field("train-seconds", _P, f"seconds of training, to {TIMING_RESOLUTION_S} s; opt-in as above"),
    Field("privacy-seconds", _P, f"seconds of accounting, to {TIMING_RESOLUTION_S} s; opt-in as "
                                 "above"),
    Field("site-seconds", _P, f"seconds the site spent on the round, to {TIMING_RESOLUTION_S} s; "
                              "opt-in as above"),
    # Computed from private records without DP: logged at the site, never sent.
    Field("train-loss", _F, "training loss on private batches (a membership oracle)"),
    Field("feature-cache-hit", _F, "whether the site's data changed since the last run"),
    Field("holdout-metrics", _F, "accuracy / AUC / loss on the site's holdout records"),
    Field("exception-text", _F, "the text of an error at the site (names files, classes, paths)"),
)
DECLINE_REPLY = (
    Field("status", _P, "a status code (see STATUSES)"),
    Field("reason", _P, "why: built from the request, the site's policy and declaration and "
                        "public values only, or a fixed sentence"),
    Field("site-id", _P, "the site's id"),
)
DELIVERY_REPLY = (
    Field("status", _P, "'saved'"),
    Field("site-id", _P, "the site's id"),
    Field("sha256", _P, "hash of the bundle the site saved (what the server sent, plus the "
                        "site's own ε)"),
    Field("ledger-export", _P, "the site's ledger: its rows (raw mechanism tuples and public "
                               "values), caps and a fresh signed seal, as canonical JSON, so "
                               "the audit works where the run lives; the site keeps the "
                               "original"),
)
# Before round 1, for features with ``dp`` scaling (common/data/schema.py): each site's
# noisy clipped sums (the Gaussian mechanism through OpenDP), charged to its
# ledger as round 0, with the same public values as a train reply.
SCALING_REPLY = (
    Field("sums", _DP, "the site's clipped per-feature sums plus Gaussian noise (OpenDP), "
                       "charged to the ledger as round 0"),
    *(f for f in TRAIN_REPLY if f.privacy is not _DP),
)
SCALING_MESSAGE_TYPE = "query.scaling"
# Before round 1 (and for a site that joins later), the coordinator's declaration-only
# question: which declaration does the site hold, in which unit, and is it admitted?
# Nothing in the answer is read from a record.
DECLARATION_REPLY = (
    Field("status", _P, "'ok' (the site is admitted; otherwise a decline)"),
    Field("site-id", _P, "the site's id"),
    Field("declaration", _P, "the hash of the site's declaration (schema and backbone)"),
    Field("declaration-json", _P, "the site's declaration itself (what it reads its records "
                                  "as: no record is in it)"),
    Field("privacy-unit", _P, "the unit of privacy the site's ε is stated in"),
    Field("num-examples", _P, "the training-unit count fixed when the site's data was checked "
                              "(the FedAvg weight; public under replace-one neighbours)"),
    Field("ledger-public-key", _P, "the public half of the site's ledger signing key (PEM): "
                                   "the coordinator registers it with the run (or checks it "
                                   "against the key it holds) so the audit can verify"),
    Field("public-check", _P, "the hash of the public-record hash list the site checked its "
                              "records against at admission ('' when the federation publishes "
                              "none)"),
)
DECLARATION_MESSAGE_TYPE = "query.declaration"
REPLIES = {"train": TRAIN_REPLY, "scaling": SCALING_REPLY, "decline": DECLINE_REPLY,
           "delivery": DELIVERY_REPLY, "declaration": DECLARATION_REPLY}
_TRAIN = {f.key: f for f in TRAIN_REPLY}
TIMING_KEYS = ("feature-seconds", "train-seconds", "privacy-seconds", "site-seconds")
# The text values of a train reply travel in its status record, not in its metrics.
TRAIN_STATUS = ("ledger-head", "ledger-signature", "ledger-id", "ledger-key-id", "privacy-unit")
# What a train reply must carry (all public; the server drops a reply without them).
TRAIN_METRICS = tuple(f.key for f in TRAIN_REPLY if f.privacy is _P
                      and f.key not in TRAIN_STATUS and f.key not in TIMING_KEYS)

OK = "ok"
BUDGET_EXHAUSTED = "budget-exhausted"
REQUEST_REJECTED = "request-rejected"
POLICY_DECLINED = "policy-declined"
SITE_CONFIG_ERROR = "site-config-error"
SITE_UNAVAILABLE = "site-unavailable"
SITE_ERROR = "site-error"
STATUSES = (OK, BUDGET_EXHAUSTED, REQUEST_REJECTED, POLICY_DECLINED, SITE_CONFIG_ERROR,
            SITE_UNAVAILABLE, SITE_ERROR)
# Statuses after which a site is not sampled again in the run.
OUT_OF_RUN = (BUDGET_EXHAUSTED, SITE_UNAVAILABLE)
# The only reasons these statuses ever carry: a fixed sentence each. The details
# (which file, which row, the exception) are in the site's own log.
FIXED_REASONS = {
    SITE_UNAVAILABLE: ("the site is out of the federation until its operator acts: its data "
                       "no longer reads as it did when it was checked, or a round failed "
                       "there (its own log says why; `fedtransfer site check` re-admits it)"),
    SITE_ERROR: ("the site failed to handle the message before reading any record (its own "
                 "log says why)"),
}


def released_fields() -> dict[str, list[dict[str, str]]]:
    """Every field a site may send, by reply, with its privacy class (for the run
    summary and the audit)."""
    return {name: [{"field": f.key, "class": f.privacy.value, "meaning": f.meaning}
                   for f in reply] for name, reply in REPLIES.items()}


def train_metrics(values: dict[str, float]) -> dict[str, float]:
    """The metrics of a train reply, checked against :data:`TRAIN_REPLY`.

    Raises:
        ValueError: a key without a privacy class, a forbidden key, or a
            missing public key. This is a bug at the site, never sent.
    """
    unknown = sorted(set(values) - set(_TRAIN) | set(values) & set(TRAIN_STATUS))
    if unknown:
        raise ValueError(f"reply field(s) {unknown} have no privacy class in common/protocol.py")
    forbidden = sorted(k for k in values if _TRAIN[k].privacy is _F)
    if forbidden:
        raise ValueError(f"reply field(s) {forbidden} are computed from private records "
                         "without DP and may not leave the site")
    missing = [k for k in TRAIN_METRICS if k not in values]
    if missing:
        raise ValueError(f"train reply lacks {missing}")
    out = {}
    for k, v in values.items():
        if k in TIMING_KEYS:
            v = round(float(v) / TIMING_RESOLUTION_S) * TIMING_RESOLUTION_S
        out[k] = v
    return out


@dataclass(frozen=True)
class TrainReply:
    """The public part of a train (or scaling) reply; the DP arrays travel beside it.

    ``timings`` is ``None`` unless the site's own policy releases them.
    """

    site_id: int
    num_examples: int
    dp: bool
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    ledger_entries: int
    ledger_head: str
    ledger_signature: str = ""
    ledger_id: str = ""
    ledger_key_id: str = ""
    privacy_unit: str = "record"
    timings: Mapping[str, float] | None = None

    def metrics(self) -> dict[str, float]:
        values = {"site-id": self.site_id, "num-examples": self.num_examples, "dp": int(self.dp),
                  "epsilon": self.epsilon, "delta": self.delta,
                  "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate,
                  "steps": self.steps, "ledger-entries": self.ledger_entries}
        if self.timings is not None:
            values.update({k: float(self.timings[k]) for k in TIMING_KEYS})
        return train_metrics(values)

    def status(self) -> dict[str, str]:
        return {"status": OK, "ledger-head": self.ledger_head,
                "ledger-signature": self.ledger_signature, "ledger-id": self.ledger_id,
                "ledger-key-id": self.ledger_key_id, "privacy-unit": self.privacy_unit}


@dataclass(frozen=True)
class Decline:
    """A declined message: a status code and a reason built from public values only."""

    site_id: int
    status: str
    reason: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES or self.status == OK:
            raise ValueError(f"unknown decline status {self.status!r}; allowed: "
                             f"{', '.join(STATUSES[1:])}")
        if self.status in FIXED_REASONS and self.reason != FIXED_REASONS[self.status]:
            raise ValueError(f"status {self.status!r} carries only its fixed reason")

    @classmethod
    def fixed(cls, site_id: int, status: str) -> Decline:
        return cls(site_id, status, FIXED_REASONS[status])

    def record(self) -> dict[str, int | str]:
        return {"status": self.status, "reason": self.reason, "site-id": int(self.site_id)}


@dataclass(frozen=True)
class DeclarationReply:
    site_id: int
    declaration: str
    declaration_json: str
    privacy_unit: str
    num_examples: int
    public_check: str = ""
    ledger_public_key: str = ""

    def record(self) -> dict[str, int | str]:
        return {"status": OK, "site-id": int(self.site_id), "declaration": self.declaration,
                "declaration-json": self.declaration_json, "privacy-unit": self.privacy_unit,
                "num-examples": int(self.num_examples), "public-check": self.public_check,
                "ledger-public-key": self.ledger_public_key}


@dataclass(frozen=True)
class DeliveryReceipt:
    site_id: int
    sha256: str
    ledger_export: str = ""  # canonical JSON ("" for a site without DP, which keeps no ledger)

    def record(self) -> dict[str, int | str]:
        return {"status": "saved", "site-id": int(self.site_id), "sha256": self.sha256,
                "ledger-export": self.ledger_export}


# --------------------------------------------------------------------------
# Server -> site: the round request
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of a site for one round. It is only a request: the
    site checks it against its own policy and declaration (:mod:`client.guard`)."""

    run_id: str
    server_round: int
    num_rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    clip_norm: float
    noise_multiplier: float  # 0: the site calibrates σ to its own cap
    dp: bool = True  # the federation asks for DP-SGD; a site trains only as its policy allows
    # The federation's fitted schema (common/data/schema.py), canonical JSON; "" in old requests.
    schema: str = ""
    scaling_budget: float = 0.1  # query.scaling: the share of the site's cap to spend
    # One loss weight per class, from the server's public validation split (config
    # ``class-weights = "public"``); empty: plain cross-entropy. The site checks them.
    class_weights: tuple[float, ...] = ()
    # The model the federation trains. The backbone must be the site's declared one
    # (compared as declarations: the site never opens a path the request names); the
    # trainable mode one the site's policy accepts; the head's arrays must have the
    # shapes these imply for the site's declaration.
    backbone: str = ""
    trainable: str = "head"
    head: str = "linear"
    hidden_dim: int = 128
    # The unit of privacy the federation asks for ("record" | "patient"). The site's own
    # policy decides its unit; a request for another is declined (client.guard), never obeyed.
    privacy_unit: str = "record"


# The largest class weight a round may ask for. The weights do not change the DP
# guarantee (see common.models.training.WeightedCrossEntropy), but a weight large enough
# to overflow the loss would make a gradient non-finite, and clipping cannot bound
# a NaN: whether the released head is NaN would then tell whether a record of that
# class was sampled. Balanced weights from a public split are far below this bound.
MAX_CLASS_WEIGHT = 100.0
REQUEST_KEYS = tuple(f.name.replace("_", "-") for f in fields(RoundRequest) if f.name != "run_id")
OPTIONAL_REQUEST_KEYS = ("dp", "schema", "scaling-budget", "class-weights", "trainable", "head",
                         "hidden-dim", "privacy-unit")


def encode_class_weights(weights) -> str:
    """Class weights on the wire: comma-separated, each as ``repr`` (exact).

    A string, not a list: SecAgg+ runs on Flower's legacy workflow, whose
    config values are scalars only.
    """
    return ",".join(repr(float(w)) for w in weights)


def decode_class_weights(text) -> tuple[float, ...]:
    """The inverse of :func:`encode_class_weights` (``""``: no weights).

    Raises:
        ValueError: not a string of comma-separated numbers, naming the field.
    """
    if not isinstance(text, str):
        raise ValueError(f"request field 'class-weights' must be a string of comma-separated "
                         f"numbers, got {text!r}")
    try:
        return tuple(float(v) for v in text.split(",")) if text.strip() else ()
    except ValueError:
        raise ValueError(f"request field 'class-weights' must be comma-separated numbers, got "
                         f"{text[:80]!r}") from None


def train_request(cfg, schema_json: str = "", *, class_weights=None
                  ) -> dict[str, int | float | bool | str]:
    """The per-round training config the server sends (``server-round`` is added
    by the strategy). ``cfg`` is a :class:`common.config.RunConfig`; ``schema_json``
    the fitted schema's canonical JSON; ``class_weights`` (public, one per class)
    are sent when given."""
    req = {"num-rounds": cfg.num_rounds, "local-epochs": cfg.local_epochs,
           "batch-size": cfg.batch_size, "learning-rate": cfg.lr,
           "momentum": cfg.momentum, "clip-norm": cfg.clip_norm,
           "noise-multiplier": cfg.noise_multiplier, "dp": bool(cfg.dp),
           "schema": schema_json, "scaling-budget": cfg.scaling_budget,
           "backbone": cfg.backbone, "trainable": cfg.trainable, "head": cfg.head,
           "hidden-dim": cfg.hidden_dim, "privacy-unit": cfg.privacy_unit}
    if class_weights:
        req["class-weights"] = encode_class_weights(class_weights)
    return req


def parse_request(config, run_id: str) -> RoundRequest:
    """A :class:`RoundRequest` from a message's config record.

    Raises:
        ValueError: a missing key or a value of the wrong type, naming the key.
    """
    missing = [k for k in REQUEST_KEYS if k not in config and k not in OPTIONAL_REQUEST_KEYS]
    if missing:
        raise ValueError(f"the round request lacks {missing}")

    def num(key: str, kind):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"request field '{key}' must be a number, got {value!r}")
        if kind is int:
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise ValueError(f"request field '{key}' must be an integer, got {value!r}")
            return int(value)
        return float(value)

    dp = config.get("dp", True)
    if not isinstance(dp, bool | int):
        raise ValueError(f"request field 'dp' must be a boolean, got {dp!r}")
    return RoundRequest(
        run_id=str(run_id), server_round=num("server-round", int),
        num_rounds=num("num-rounds", int), local_epochs=num("local-epochs", int),
        batch_size=num("batch-size", int), learning_rate=num("learning-rate", float),
        momentum=num("momentum", float), clip_norm=num("clip-norm", float),
        noise_multiplier=num("noise-multiplier", float), dp=bool(dp),
        schema=_text(config, "schema"),
        scaling_budget=num("scaling-budget", float) if "scaling-budget" in config else 0.1,
        class_weights=decode_class_weights(config.get("class-weights", "")),
        backbone=_text(config, "backbone"), trainable=_text(config, "trainable") or "head",
        head=_text(config, "head") or "linear",
        hidden_dim=num("hidden-dim", int) if "hidden-dim" in config else 128,
        privacy_unit=_text(config, "privacy-unit") or "record")


def _text(config, key: str) -> str:
    value = config.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"request field '{key}' must be text, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------
# Arrays <-> Flower records (Flower is imported lazily: common/ stays
# importable without it)
# --------------------------------------------------------------------------


def to_array_record(arrays: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord  # lazy: Flower is optional below the apps

    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v)))
                                              for k, v in arrays.items()))


def from_array_record(record) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy()) for k, v in record.items())


# SecAgg+ (``aggregation = "secagg+"``) runs on Flower's legacy workflow, whose
# parameters are a list of arrays: the head's array names travel in the config.
HEAD_KEYS = "head-keys"


def head_to_parameters(arrays: dict[str, np.ndarray]):
    from flwr.common import ndarrays_to_parameters  # lazy: see to_array_record

    return ndarrays_to_parameters([np.ascontiguousarray(v) for v in arrays.values()])


def head_from_parameters(parameters, keys: str) -> OrderedDict[str, np.ndarray]:
    """A legacy parameter list as a head dict, named by the ``head-keys`` config value."""
    from flwr.common import parameters_to_ndarrays  # lazy: see to_array_record

    names = [k for k in str(keys).split(",") if k]
    arrays = parameters_to_ndarrays(parameters)
    if len(names) != len(arrays):
        raise ValueError(f"'{HEAD_KEYS}' names {len(names)} arrays, the message holds "
                         f"{len(arrays)}")
    return OrderedDict(zip(names, arrays, strict=True))


# Under SecAgg+ a site that declines a round raises (the protocol has no "declined"
# reply), and the server reads only the error text: this is its format.
_DECLINED = re.compile(r"site (-?\d+) \(node (\d+)\) declines round \(([a-z-]+)\): (.*)", re.S)


def declined_text(site_id: int, node_id: int, status: str, reason: str) -> str:
    return f"site {site_id} (node {node_id}) declines round ({status}): {reason}"


def parse_declined(text: str) -> tuple[int, int, str, str] | None:
    """``(site id, node id, status, reason)`` from an error text made by :func:`declined_text`."""
    m = _DECLINED.search(text)
    return (int(m[1]), int(m[2]), m[3], m[4]) if m else None
