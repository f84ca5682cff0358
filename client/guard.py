"""The site's request checks: every one runs before any record is read.

A request is compared with the site's policy, its declaration and its public
count only, in one fixed order (:func:`check_train`), and the first stage that
finds a problem declines the message with every problem of that stage named:

1. **policy** (``policy-declined``): DP on or off as the site's policy says,
   the unit of privacy the site declares (a request for another unit is declined,
   never obeyed: the site's unit and its ``max-records-per-patient`` come from its
   own policy only), rounds within its ``max-rounds``, σ not below its floor, a trainable mode it
   accepts;
2. **declaration** (``policy-declined``): the request's schema and backbone are
   the site's declared ones (:func:`common.declaration.differences`), compared
   as declarations; the site never reads a record, or opens a path, to find out;
3. **values** (``request-rejected``): every number finite and in its range,
   names known, class weights bounded;
4. **model** (``request-rejected``): the global head's arrays have exactly the
   names and shapes the declaration, mode and head imply, are finite and
   bounded (a huge weight could overflow a record's loss, and clipping cannot
   bound a NaN);
5. **count** (``request-rejected``): the expected batch planned from the request and
   the site's training-unit count (:mod:`common.batches`), and the steps it implies,
   against that count, which is public and was fixed when its data was checked.

So every decline is a function of the request, the site's policy and
declaration and its public count: two sites that differ in one record decline
the same requests with the same words.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from client.settings import SiteConfigError, SiteSettings
from common.batches import BatchPlanError, plan_batch
from common.data.schema import Schema, SchemaError
from common.declaration import Declaration, differences
from common.models.names import HEAD_NAMES, TRAINABLE_MODES
from common.privacy.accounting import dp_plan
from common.protocol import MAX_CLASS_WEIGHT, RoundRequest

# Bounds that keep every per-record loss and gradient finite whatever the records hold
# (features are clamped to FEATURE_LIMIT at the site): a NaN or inf gradient would pass
# clipping and make the released head depend on whether one record was sampled.
MAX_LEARNING_RATE = 1e3
MAX_CLIP_NORM = 1e3
MAX_ABS_PARAMETER = 1e4
MAX_HIDDEN_DIM = 4096
MAX_LOCAL_EPOCHS = 1000


class PolicyDeclined(ValueError):
    """The request is outside the site's policy or declaration; nothing was read or recorded."""


class RequestRejected(ValueError):
    """The request is unsafe or malformed; nothing was read or recorded."""


@dataclass(frozen=True)
class Stage:
    name: str
    error: type[ValueError]


STAGES = (Stage("policy", PolicyDeclined), Stage("declaration", PolicyDeclined),
          Stage("values", RequestRejected), Stage("model", RequestRejected),
          Stage("count", RequestRejected))


def check_train(req: RoundRequest, settings: SiteSettings, arrays: Mapping[str, np.ndarray],
                num_units: int, record_shape: tuple[int, ...]) -> None:
    """All checks of a train request, in :data:`STAGES` order.

    Raises:
        PolicyDeclined, RequestRejected: the first stage with a problem, naming each.
    """
    _run(req, settings, [
        lambda: policy_problems(req, settings, trainable=req.trainable),
        lambda: declaration_problems(req, settings, fitted=True),
        lambda: value_problems(req, settings),
        lambda: model_problems(req, settings.declaration, arrays, record_shape),
        lambda: count_problems(req, settings, num_units),
    ])


def check_query(req: RoundRequest, settings: SiteSettings) -> None:
    """The checks of a query that trains nothing (``query.scaling``, which fits the
    schema's DP constants): policy, declaration and values, in that order."""
    _run(req, settings, [
        lambda: policy_problems(req, settings, trainable=None),
        lambda: declaration_problems(req, settings, fitted=False),
        lambda: value_problems(req, settings, first_round=0),
    ])


def _run(req: RoundRequest, settings: SiteSettings, checks) -> None:
    for stage, check in zip(STAGES, checks, strict=False):
        problems = check()
        if problems:
            what = ("outside the site's policy" if stage.name == "policy" else
                    "the request's declaration differs from the site's" if
                    stage.name == "declaration" else "request rejected by site")
            raise stage.error(f"{what}: " + "; ".join(problems))


def policy_problems(req: RoundRequest, settings: SiteSettings, *,
                    trainable: str | None) -> list[str]:
    problems = []
    if trainable is not None and trainable not in settings.trainable:
        problems.append(f"trainable {trainable!r} is not among the modes this site accepts "
                        f"({', '.join(settings.trainable)})")
    if req.dp != settings.dp:
        problems.append(
            "this site trains only with DP-SGD (its policy: dp = true); the request asks for "
            "dp = false" if settings.dp else
            "this site's policy trains without DP (dp = false); the request asks for dp = true")
    if req.privacy_unit != settings.privacy_unit:
        problems.append(f"this site's unit of privacy is one {settings.privacy_unit} (its own "
                        f"policy: privacy-unit = {settings.privacy_unit!r}); the request asks for "
                        f"privacy-unit = {req.privacy_unit[:40]!r}")
    for key, value in (("server-round", req.server_round), ("num-rounds", req.num_rounds)):
        if value > settings.max_rounds:
            problems.append(f"{key} {value} exceeds the site's max-rounds {settings.max_rounds}")
    sigma = req.noise_multiplier
    if settings.dp and math.isfinite(sigma) and 0 < sigma < settings.min_noise_multiplier:
        problems.append(f"noise-multiplier {sigma} is below this site's minimum "
                        f"{settings.min_noise_multiplier}")
    return problems


def declaration_problems(req: RoundRequest, settings: SiteSettings, *, fitted: bool
                         ) -> list[str]:
    """The request's schema and backbone against the site's declaration; with
    ``fitted``, a tabular schema must carry all of its scaling constants."""
    if not req.schema:
        return ["the request carries no schema; this site reads its records only as declared "
                f"(schema {settings.declaration.sha256[:12]}...)"]
    try:
        schema = Schema.from_json(req.schema)
    except SchemaError as exc:
        return [f"the request's schema is malformed: {exc}"]
    problems = differences(settings.declaration, schema, req.backbone)
    if not problems and fitted and schema.input == "tabular" and not schema.fitted:
        problems.append(f"features {[f.name for f in schema.features if not f.fitted]} have "
                        "no scaling constants yet")
    return problems


def value_problems(req: RoundRequest, settings: SiteSettings, *, first_round: int = 1
                   ) -> list[str]:
    """Numbers in range and names known (``first_round``: 0 for a query made before
    round 1)."""
    problems = []
    if req.server_round < first_round:
        problems.append(f"server-round must be an integer >= {first_round}, got "
                        f"{req.server_round!r}")
    for key, value, high in (
                             ("num-rounds", req.num_rounds, None),
                             ("local-epochs", req.local_epochs, MAX_LOCAL_EPOCHS),
                             ("batch-size", req.batch_size, None),
                             ("hidden-dim", req.hidden_dim, MAX_HIDDEN_DIM)):
        if value < 1 or (high is not None and value > high):
            problems.append(f"{key} must be an integer in [1, {high or 'inf'}], got {value!r}")
    for key, value, high in (("learning-rate", req.learning_rate, MAX_LEARNING_RATE),
                             ("clip-norm", req.clip_norm, MAX_CLIP_NORM)):
        if not (math.isfinite(value) and 0 < value <= high):
            problems.append(f"{key} must be a finite number in (0, {high:g}], got {value!r}")
    if not (math.isfinite(req.momentum) and 0 <= req.momentum < 1):
        problems.append(f"momentum must be in [0, 1), got {req.momentum!r}")
    sigma = req.noise_multiplier
    if not math.isfinite(sigma) or sigma < 0:
        problems.append(f"noise-multiplier must be >= 0 (0: the site calibrates), got {sigma!r}")
    if req.trainable not in TRAINABLE_MODES:
        problems.append(f"trainable must be one of {', '.join(TRAINABLE_MODES)}, got "
                        f"{req.trainable[:40]!r}")
    if req.head not in HEAD_NAMES:
        problems.append(f"head must be one of {', '.join(HEAD_NAMES)}, got {req.head[:40]!r}")
    weights, classes = req.class_weights, settings.declaration.num_classes
    if weights and len(weights) != classes:
        problems.append(f"class-weights has {len(weights)} values, this site declares {classes} "
                        "classes")
    if weights and not all(math.isfinite(w) and 0 < w <= MAX_CLASS_WEIGHT for w in weights):
        problems.append(f"class-weights must be finite numbers in (0, {MAX_CLASS_WEIGHT:g}], got "
                        f"{list(weights)[:10]!r}")
    return problems


def model_problems(req: RoundRequest, declaration: Declaration,
                   arrays: Mapping[str, np.ndarray], record_shape: tuple[int, ...]) -> list[str]:
    """The global model's arrays against what the declaration, mode and head imply
    (``record_shape``: one record as the declaration reads it, from the admission)."""
    expected = expected_shapes(declaration, req.trainable, req.head, req.hidden_dim,
                               record_shape)
    if list(arrays) != list(expected):
        return [f"the model's arrays {list(arrays)[:20]} are not the {len(expected)} this site "
                f"expects for trainable {req.trainable!r}, head {req.head!r}: "
                f"{list(expected)[:20]}"]
    problems = []
    for name, shape in expected.items():
        a = arrays[name]
        if tuple(a.shape) != shape:
            problems.append(f"array '{name}' has shape {tuple(a.shape)}, expected {shape}")
        elif not np.issubdtype(a.dtype, np.floating):
            problems.append(f"array '{name}' has dtype {a.dtype}, expected a float type")
        elif a.size and not (np.isfinite(a).all() and np.abs(a).max() <= MAX_ABS_PARAMETER):
            problems.append(f"array '{name}' must be finite with |values| <= "
                            f"{MAX_ABS_PARAMETER:g}")
    return problems


def count_problems(req: RoundRequest, settings: SiteSettings, num_units: int) -> list[str]:
    """The planned batch and the steps against the site's public training-unit count."""
    try:
        batch = planned_batch(req, num_units)
    except BatchPlanError as exc:
        return [str(exc)]
    _, steps = dp_plan(num_units, batch_size=batch, epochs=req.local_epochs)
    if steps > settings.max_steps:
        return [f"the round would take {steps} steps, above the site's max-steps "
                f"{settings.max_steps}"]
    return []


def planned_batch(req: RoundRequest, num_units: int) -> int:
    """The site's expected batch: :func:`common.batches.plan_batch` of the requested
    batch and its own public count, exactly as the coordinator plans it."""
    return plan_batch(num_units, batch_size=req.batch_size)


def expected_shapes(declaration: Declaration, trainable: str, head: str, hidden_dim: int,
                    record_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the arrays a round trains and sends, from declarations only."""
    return dict(_expected_shapes(declaration, trainable, head, hidden_dim, tuple(record_shape)))


@functools.lru_cache(maxsize=16)
def _expected_shapes(declaration: Declaration, trainable: str, head: str, hidden_dim: int,
                     record_shape: tuple[int, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # lazy: torch and the backbones load only once a request has passed the cheap checks
    from common.models.finetune import model_shapes

    try:
        return tuple(model_shapes(trainable, head=head, backbone=declaration.backbone,
                                  schema=declaration.schema, hidden_dim=hidden_dim,
                                  record_shape=record_shape).items())
    except (OSError, ValueError) as exc:  # the site's own declared backbone cannot be built
        raise SiteConfigError(f"the site's declared backbone {declaration.backbone!r} cannot be "
                              f"used ({type(exc).__name__})") from exc
