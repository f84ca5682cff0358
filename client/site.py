"""What one site does in a round, without Flower.

The site owns its data, its feature cache, its ledger and its privacy cap.
The server may *request* rounds, epochs, batch size, learning rate, clip
norm and σ; the site checks the request, projects ε before touching data,
trains under DP-SGD, commits the spend to its ledger, and only then returns
the update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.policy import (
    PolicyDeclined,
    RequestRejected,
    SiteSettings,
    check_policy,
    check_request,
)
from client.sigma_cache import calibrated_sigma
from common import protocol
from common.batches import BatchPlanError, plan_batch
from common.config import RunConfig
from common.data.datasets import SiteData, load_dataset, site_data
from common.data.readers import SiteDataError, own_site_data
from common.data.schema import Schema, SchemaError
from common.models import training
from common.models.backbones import BACKBONE_NAMES
from common.models.features import cached_features
from common.models.finetune import (
    input_backbone,
    load_model_state,
    make_model,
    model_state,
    num_trainable,
)
from common.models.modelio import read_card, save_bundle
from common.privacy import scaling
from common.privacy.accounting import (
    LEDGER_ACCOUNTANT,
    UNIT_OF_PRIVACY,
    Mechanism,
    dp_plan,
    epsilon,
)
from common.privacy.ledger import Entry, Ledger, accountant_version, library_versions
from common.protocol import RoundRequest

log = logging.getLogger(__name__)


class BudgetExhausted(RuntimeError):
    """The site declines: this round would take it past its own cap."""

    def __init__(self, spent: float, cap: float, projected: float, delta: float):
        self.spent, self.cap, self.projected, self.delta = spent, cap, projected, delta
        super().__init__(
            f"budget exhausted: spent {spent:.4f}, cap {cap:.4f}, this round would reach "
            f"{projected:.4f} (ε at δ={delta:g}, unit: one record at this site)"
        )


@dataclass
class SiteReply:
    arrays: OrderedDict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]  # built by common.protocol.train_metrics
    ledger_head: str = ""  # the anchor (keyed hash of the ledger's last entry)


def head_classes(head: dict[str, np.ndarray]) -> int:
    """The class count of a head's weights (its last bias)."""
    return next(int(v.shape[0]) for k, v in reversed(list(head.items())) if k.endswith("bias"))


@functools.lru_cache(maxsize=2)
def _splits(spec: str, data_dir: str, seed: int, schema_json: str = ""):
    """The simulated federation's dataset, read once per process (arrays are
    never modified downstream); a CSV's columns mapped by the schema's names."""
    return load_dataset(spec, data_dir, seed,
                        schema=Schema.from_json(schema_json) if schema_json else None)


def request_schema(req: RoundRequest, settings: SiteSettings, *, fitted: bool = True
                   ) -> Schema | None:
    """The federation's schema from the request (``None`` from an old server).

    Raises:
        RequestRejected: the schema is malformed, or (``fitted``) a tabular
            schema lacks scaling constants.
        SiteDataError: the site's own declared class names differ from the
            federation's (named in the site's log).
    """
    if not req.schema:
        return None
    try:
        schema = Schema.from_json(req.schema)
        if fitted and not schema.fitted:
            raise SchemaError(f"features {[f.name for f in schema.features if not f.fitted]} "
                              "have no scaling constants yet")
    except SchemaError as exc:
        raise RequestRejected(f"request rejected by site: schema: {exc}") from exc
    if settings.class_names is not None and tuple(settings.class_names) != schema.classes:
        raise SiteDataError(f"this site's class-names {list(settings.class_names)} differ from "
                            f"the federation's schema classes {list(schema.classes)}")
    return schema


def load_site_data(cfg: RunConfig, settings: SiteSettings, num_classes: int | None = None,
                   schema: Schema | None = None, *, scaled: bool = True) -> SiteData:
    """A deployed site's own files (``settings.data_path``), or its simulated partition.

    The holdout fraction and its seed are the site's own (its policy); how the
    records are read (image size and channels, class names, the columns of a
    CSV by name) is declared, never estimated from the other records. With
    ``scaled``, tabular records are clipped, centred and scaled by the
    schema's public or DP constants (:meth:`Schema.transform`).

    Raises:
        common.data.readers.SiteDataError: corrupt files, unknown labels or missing
            features at ``data_path`` (named); nothing has been trained or recorded.
    """
    if settings.data_path:
        classes = schema.classes if schema is not None else settings.class_names
        try:
            data = own_site_data(settings.data_path, site_id=settings.site_id,
                                 holdout=settings.holdout, seed=settings.holdout_seed,
                                 num_classes=num_classes, classes=classes,
                                 image_size=cfg.image_size, channels=cfg.image_channels,
                                 schema=schema if schema is not None and schema.features else None)
        except SchemaError as exc:
            raise SiteDataError(str(exc)) from exc
    else:
        # issue 24: an image schema's declared window applies to simulated sites too
        mapping = schema if schema is not None and (schema.features or schema.image_window) \
            else None
        splits = _splits(cfg.dataset, cfg.data_dir, cfg.seed,
                         mapping.to_json() if mapping is not None else "")
        data = site_data(splits, site_id=settings.site_id, num_sites=cfg.num_sites,
                         partitioner=cfg.partitioner, alpha=cfg.dirichlet_alpha,
                         holdout=settings.holdout, shift=cfg.site_shift, seed=cfg.seed)
    if scaled and schema is not None and schema.input == "tabular":
        data = dataclasses.replace(data, train_x=schema.transform(data.train_x),
                                   holdout_x=schema.transform(data.holdout_x))
    return data


@dataclass
class SiteFeatures:
    train: np.ndarray
    holdout: np.ndarray
    data: SiteData
    seconds: float
    hit: bool


def site_features(cfg: RunConfig, cache_dir: Path, data: SiteData) -> SiteFeatures:
    """Features of the site's train and holdout splits, from the on-disk cache:
    pooled backbone features (``trainable = head``), or the activations before
    the first trainable block (the cache key covers the cut point)."""
    backbone = input_backbone(cfg.backbone, cfg.image_size, cfg.trainable)
    device = training.resolve_device(cfg.device)
    tr = cached_features(backbone, data.train_x, cache_dir=cache_dir, device=device,
                         data_fingerprint=data.fingerprint + ":train")
    ho = cached_features(backbone, data.holdout_x, cache_dir=cache_dir, device=device,
                         data_fingerprint=data.fingerprint + ":holdout")
    return SiteFeatures(tr.features, ho.features, data, tr.seconds + ho.seconds, tr.hit and ho.hit)


def _model(cfg: RunConfig, in_dim: int, num_classes: int):
    """What the site trains: the head, or the tuned suffix + head (``cfg.trainable``)."""
    return make_model(cfg.trainable, head=cfg.head, backbone=cfg.backbone,
                      image_size=cfg.image_size, in_dim=in_dim, num_classes=num_classes,
                      hidden_dim=cfg.hidden_dim, seed=cfg.seed)


def check_cap(ledger: Ledger, settings: SiteSettings) -> None:
    """The ledger keeps the cap of its first use. A policy may lower it (stricter),
    never raise it or change δ: that is ``fedtransfer site raise-cap``, an explicit,
    recorded action of the site's operator.

    Raises:
        PolicyDeclined: the policy's cap is above the recorded one, or δ differs.
    """
    recorded = ledger.cap()
    if recorded is None:
        ledger.record_cap(epsilon=settings.target_epsilon, delta=settings.target_delta,
                          reason="first use")
        return
    cap, delta = recorded
    if settings.target_epsilon > cap or settings.target_delta != delta:
        raise PolicyDeclined(
            f"the cap in force (ε={settings.target_epsilon:g}, δ={settings.target_delta:g}) differs "
            f"from the one this site's ledger recorded (ε={cap:g}, δ={delta:g}); raising a cap or "
            "changing δ is an explicit site action: fedtransfer site raise-cap --ledger <the "
            "site's ledger> --epsilon ... --reason '...'")


# -- issue 24 (reader helper): the run's backbone, and each site's planned batch ----------
def request_backbone(cfg: RunConfig, req: RoundRequest) -> RunConfig:
    """The run's backbone: a site whose run config says ``auto`` (``flwr run .`` with the
    defaults) takes the one the server chose on public data, a registry name only.

    Raises:
        RequestRejected: the request names a file, an unknown backbone, or one that
            differs from the site's own run config; nothing was read.
    """
    if not req.backbone or (req.backbone == cfg.backbone and req.image_size in (0, cfg.image_size)):
        return cfg
    if cfg.backbone != "auto":
        raise RequestRejected(f"request rejected by site: backbone {req.backbone!r} differs from "
                              f"the run config's {cfg.backbone!r}")
    if req.backbone not in BACKBONE_NAMES or req.image_size < 0:
        raise RequestRejected(f"request rejected by site: backbone {req.backbone!r} is not a "
                              f"registry name ({', '.join(BACKBONE_NAMES[:-1])})")
    return cfg.replace(backbone=req.backbone, image_size=req.image_size or cfg.image_size)


def planned_batch(req: RoundRequest, num_records: int) -> RoundRequest:
    """The request at this site's expected batch: :func:`common.batches.plan_batch` of
    the requested batch and the site's (public) record count, as the server plans it."""
    try:
        batch = plan_batch(num_records, batch_size=req.batch_size)
    except BatchPlanError as exc:
        raise RequestRejected(f"request rejected by site: {exc}") from exc
    return dataclasses.replace(req, batch_size=batch)


def plan_noise(req: RoundRequest, settings: SiteSettings, ledger: Ledger,
               num_records: int) -> tuple[float, Mechanism, list[Mechanism]]:
    """σ for this round and the mechanism it will run, plus the full prior history.

    σ is calibrated so that every run the ledger already holds, plus all of
    this run's planned rounds, fits the site's cap. It depends only on the
    history *before* this run, so it is the same in every round of the run.
    """
    q, steps = dp_plan(num_records, batch_size=req.batch_size, epochs=req.local_epochs)
    history = ledger.history()
    sigma = req.noise_multiplier
    if sigma == 0:
        # Everything before this run's training rounds: earlier runs, and this
        # run's round-0 releases (DP feature scaling), so σ is the same every round.
        before_run = [e.mechanism for e in ledger.entries()
                      if e.run_id != req.run_id or e.round == 0]
        sigma = calibrated_sigma(
            settings.cache_dir, target_epsilon=settings.target_epsilon, delta=settings.target_delta,
            sample_rate=q, steps=steps * req.num_rounds, prior=before_run)
        sigma = max(sigma, settings.min_noise_multiplier)
    return sigma, Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps), history


def train_round(cfg: RunConfig, settings: SiteSettings, req: RoundRequest,
                global_head: dict[str, np.ndarray], data: SiteData | None = None) -> SiteReply:
    """One site round: check, project ε, train, commit the spend, then reply.

    The reply carries only what :mod:`common.protocol` declares: the DP head
    and public values. The training loss, the holdout metrics of the head it
    received and the feature-cache flag stay in the site's log.

    Raises:
        PolicyDeclined: the request is outside the site's policy; no record was read.
        RequestRejected: the request is unsafe; nothing was trained or recorded.
        BudgetExhausted: the round would pass the cap; nothing was trained.
    """
    t_start = time.perf_counter()
    check_policy(req, settings, trainable=cfg.trainable)
    cfg = request_backbone(cfg, req)  # issue 24: backbone = "auto" takes the run's choice
    schema = request_schema(req, settings)
    data = data if data is not None else load_site_data(cfg, settings, head_classes(global_head),
                                                        schema)
    n = len(data.train_y)
    req = planned_batch(req, n)  # issue 24: this site's expected batch (common/batches.py)
    check_request(req, n, settings, num_classes=data.num_classes)
    ledger = Ledger(settings.ledger_path, settings.ledger_key) if settings.dp else None
    mech = None
    t_privacy = time.perf_counter()
    if ledger is not None:
        check_cap(ledger, settings)
        try:
            sigma, mech, history = plan_noise(req, settings, ledger, n)
        except ValueError as exc:  # calibration found no σ: the cap is already spent
            spent = ledger.epsilon(delta=settings.target_delta)
            raise BudgetExhausted(spent, settings.target_epsilon, spent,
                                  settings.target_delta) from exc
        projected = epsilon([*history, mech], delta=settings.target_delta)
        if projected > settings.target_epsilon:
            spent = epsilon(history, delta=settings.target_delta)
            raise BudgetExhausted(spent, settings.target_epsilon, projected, settings.target_delta)
    privacy_seconds = time.perf_counter() - t_privacy
    feats = site_features(cfg, settings.cache_dir, data)
    head = _model(cfg, feats.train.shape[1], data.num_classes)
    load_model_state(head, global_head)  # the head (and the tuned part of the backbone)
    if req.server_round > 1:  # the incoming head is the previous round's global head
        log.info("site %d: round %d's global head on the site's holdout (kept here): %s",
                 settings.site_id, req.server_round - 1, holdout_metrics(head, feats))
    seed = cfg.seed + settings.site_id + 1000 * req.server_round
    device = training.resolve_device(cfg.device)
    weights = list(req.class_weights) or None  # public, checked by check_request
    if mech is None:
        result = training.train_plain(head, feats.train, data.train_y, epochs=req.local_epochs,
                                      batch_size=req.batch_size, lr=req.learning_rate,
                                      momentum=req.momentum, seed=seed, device=device,
                                      class_weights=weights)
        eps = math.inf  # no DP: no finite guarantee, and every reply says so (dp = 0)
    else:
        result = training.train_dp(head, feats.train, data.train_y, epochs=req.local_epochs,
                                   batch_size=req.batch_size, lr=req.learning_rate,
                                   momentum=req.momentum, noise_multiplier=mech.noise_multiplier,
                                   clip_norm=req.clip_norm, seed=None, device=device,
                                   class_weights=weights)
        if [m.as_tuple() for m in result.mechanisms] != [mech.as_tuple()]:
            # Record what really ran, never what was planned.
            log.warning("Opacus ran %s, planned %s", result.mechanisms, mech)
        t_commit = time.perf_counter()
        eps = commit_spend(ledger, settings, req, result.mechanisms, data,
                           known=(history, mech, projected),
                           trained=json.dumps({"trainable": cfg.trainable,
                                               "params": num_trainable(head)}, sort_keys=True))
        privacy_seconds += time.perf_counter() - t_commit
        if eps > settings.target_epsilon:
            # Opacus ran more than was planned and projected. The spend stays
            # recorded (it happened); the update is withheld, so the released
            # output never carries more than the cap.
            raise BudgetExhausted(eps, settings.target_epsilon, eps, settings.target_delta)
    log.info("site %d round %d (kept here): train loss %.4f, features %.2f s (cache %s)",
             settings.site_id, req.server_round, result.loss, feats.seconds,
             "hit" if feats.hit else "miss")
    anchor = ledger.head() if ledger is not None else (0, "")
    metrics = protocol.train_metrics({
        "site-id": settings.site_id,
        "num-examples": n,
        "dp": int(settings.dp),
        "epsilon": eps,
        "delta": settings.target_delta if mech is not None else 0.0,
        "noise-multiplier": mech.noise_multiplier if mech is not None else 0.0,
        "sample-rate": result.mechanisms[0].sample_rate if result.mechanisms else 0.0,
        "steps": result.steps,
        "ledger-entries": anchor[0],
        "feature-seconds": feats.seconds,
        "train-seconds": result.seconds,
        "privacy-seconds": privacy_seconds,
        "site-seconds": time.perf_counter() - t_start,
    })
    return SiteReply(arrays=model_state(head), num_examples=n, metrics=metrics,
                     ledger_head=anchor[1])


def scaling_release(cfg: RunConfig, settings: SiteSettings, req: RoundRequest
                    ) -> tuple[np.ndarray, dict[str, float], str]:
    """The site's DP release for ``dp`` feature scaling (``query.scaling``):
    noisy clipped sums over its training records, charged to its ledger as
    round 0 *before* they leave (:mod:`common.privacy.scaling`).

    Returns ``(sums, metrics, ledger head)``. One release per run: a repeated
    query (averaging the noise away) is declined.

    Raises:
        PolicyDeclined, RequestRejected, BudgetExhausted, SiteDataError: as for
            a round; nothing is released or recorded.
    """
    t_start = time.perf_counter()
    check_policy(req, settings)
    schema = request_schema(req, settings, fitted=False)
    if schema is None or not schema.needs("dp"):
        raise RequestRejected("request rejected by site: a scaling query needs a schema with "
                              "'dp'-scaled features")
    if not 0 < req.scaling_budget <= 0.5:
        raise RequestRejected(f"request rejected by site: scaling-budget must be in (0, 0.5] of "
                              f"the cap, got {req.scaling_budget!r}")
    data = load_site_data(cfg, settings, len(schema.classes), schema, scaled=False)
    vectors, bound = schema.scaling_vectors(data.train_x)
    n = len(data.train_y)
    if not settings.dp:  # the site's own policy: no DP, exact sums, and the reply says so
        sums, mech, eps, anchor = vectors.sum(axis=0), None, math.inf, (0, "")
    else:
        ledger = Ledger(settings.ledger_path, settings.ledger_key)
        check_cap(ledger, settings)
        if ledger.has_round(req.run_id, 0):
            raise RequestRejected("request rejected by site: this run's scaling release was "
                                  "already made (one per run)")
        sigma = scaling.scaling_sigma(cap=settings.target_epsilon, delta=settings.target_delta,
                                      budget=req.scaling_budget,
                                      floor=settings.min_noise_multiplier)
        mech = scaling.mechanism(sigma)
        history = ledger.history()
        eps = epsilon([*history, mech], delta=settings.target_delta)
        if eps > settings.target_epsilon:
            spent = epsilon(history, delta=settings.target_delta)
            raise BudgetExhausted(spent, settings.target_epsilon, eps, settings.target_delta)
        sums = scaling.noisy_sum(vectors, norm_bound=bound, sigma=sigma)
        ledger.append(Entry(
            run_id=req.run_id, round=0, noise_multiplier=sigma, sample_rate=1.0, steps=1,
            clip_norm=bound, delta=settings.target_delta, sampler=scaling.SAMPLER,
            secure_rng=scaling.SECURE_RNG, accountant=LEDGER_ACCOUNTANT,
            accountant_version=accountant_version(),
            libraries=json.dumps(library_versions(), sort_keys=True), dataset_size=n, data_fingerprint=data.fingerprint,
            epsilon_after=eps))
        anchor = ledger.head()
    log.info("site %d: DP scaling release of %d features over %d records (σ=%s), ε %.4f",
             settings.site_id, len(schema.needs("dp")), n, mech and mech.noise_multiplier, eps)
    metrics = protocol.train_metrics({
        "site-id": settings.site_id, "num-examples": n, "dp": int(settings.dp), "epsilon": eps,
        "delta": settings.target_delta if mech is not None else 0.0,
        "noise-multiplier": mech.noise_multiplier if mech is not None else 0.0,
        "sample-rate": 1.0 if mech is not None else 0.0, "steps": 1 if mech is not None else 0,
        "ledger-entries": anchor[0], "feature-seconds": 0.0, "train-seconds": 0.0,
        "privacy-seconds": time.perf_counter() - t_start,
        "site-seconds": time.perf_counter() - t_start})
    return sums, metrics, anchor[1]


def commit_spend(ledger: Ledger, settings: SiteSettings, req: RoundRequest,
                 mechanisms: list[Mechanism], data: SiteData,
                 known: tuple[list[Mechanism], Mechanism, float] | None = None,
                 trained: str = "") -> float:
    """Durably record what ran; returns the cumulative ε after it, computed
    from the ledger's tuples (read inside this call) plus what ran.

    ``known = (history, mechanism, epsilon)`` is the projection made before
    training. When the ledger still holds exactly that history and Opacus ran
    exactly that mechanism, the projected ε *is* the ε after, and the PRV
    computation is not repeated. ``trained`` (JSON: the trainable mode and its
    parameter count) is recorded beside each mechanism; ε never depends on it.
    """
    history = ledger.history()
    eps_after = epsilon(history, delta=settings.target_delta) if not mechanisms else 0.0
    for m in mechanisms:
        history.append(m)
        if known is not None and history == [*known[0], known[1]]:
            eps_after = known[2]
        else:
            eps_after = epsilon(history, delta=settings.target_delta)
        ledger.append(Entry(
            run_id=req.run_id, round=req.server_round,
            noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate, steps=m.steps,
            clip_norm=req.clip_norm, delta=settings.target_delta, sampler="poisson",
            secure_rng=training.SECURE_RNG, accountant=LEDGER_ACCOUNTANT,
            accountant_version=accountant_version(),
            libraries=json.dumps(library_versions(), sort_keys=True), dataset_size=len(data.train_y),
            data_fingerprint=data.fingerprint, epsilon_after=eps_after, trained=trained))
    return eps_after


def evaluate_site(cfg: RunConfig, settings: SiteSettings,
                  global_head: dict[str, np.ndarray], data: SiteData | None = None,
                  card_schema: dict | None = None) -> dict[str, float]:
    """Evaluate a head (the delivered one) on the site's own holdout.

    For the site's own log: holdout metrics are computed from private records
    without DP, so :mod:`common.protocol` forbids sending them.
    """
    if data is None:
        schema = Schema.from_dict(card_schema) if card_schema else None
        data = load_site_data(cfg, settings, head_classes(global_head), schema)
    feats = site_features(cfg, settings.cache_dir, data)
    head = _model(cfg, feats.holdout.shape[1], data.num_classes)
    load_model_state(head, global_head)
    return {"site-id": settings.site_id, **holdout_metrics(head, feats)}


def holdout_metrics(head, feats: SiteFeatures, prefix: str = "") -> dict[str, float]:
    """``head`` on the site's holdout features: accuracy, balanced accuracy, AUC, loss."""
    m = training.evaluate(head, feats.holdout, feats.data.holdout_y)
    return {f"{prefix}{k}": v for k, v in (
        ("num-examples", len(feats.data.holdout_y)), ("accuracy", m["accuracy"]),
        ("balanced-accuracy", m["balanced_accuracy"]), ("auc", m["auc"]), ("loss", m["loss"]))}


def save_delivery(settings: SiteSettings, card: dict, head: dict[str, np.ndarray],
                  student: dict[str, np.ndarray] | None) -> tuple[Path, str]:
    """Save the delivered head and student under the site's model directory.

    The card gains this site's own view: its id and its ε recomputed from its
    own ledger (not the server's report). Returns the card path and the
    bundle hash (over the saved files), which the server checks.
    """

    own = None
    if settings.dp and settings.ledger_path.is_file():
        own = Ledger(settings.ledger_path, settings.ledger_key).epsilon(
            delta=settings.target_delta)
    card = {**card, "site": {"site_id": settings.site_id, "epsilon_own_ledger": own,
                             "delta": settings.target_delta if settings.dp else None,
                             "unit": UNIT_OF_PRIVACY}}
    path = save_bundle(settings.models, card=card, head=head, student=student)
    log.info("site %d saved the delivered models to %s", settings.site_id, path.parent)
    return path, read_card(path)["sha256"]
