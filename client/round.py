"""What one site does with a message, without Flower: check, charge, train, reply.

The order never changes: the site's admission (its data checked once against
its declaration, :mod:`client.admission`), every request check that needs no
record (:mod:`client.guard`), the budget projected from the ledger alone
(:mod:`client.budget`), and only then the records: read as declared, trained on
with DP-SGD, the spend committed to the ledger, and the reply built from
:mod:`common.protocol`'s typed classes. A fault while the records are in use
takes the site out of the federation (:func:`client.admission.take_out`): the
coordinator sees one fixed status, never the fault.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client import admission, budget, guard
from client.admission import FEATURE_LIMIT, SiteUnavailable, load_site_data, scaled
from client.budget import BudgetExhausted
from client.guard import RequestRejected
from client.settings import SiteSettings
from common import protocol
from common.data.schema import Schema
from common.data.splits import SiteData
from common.models import training
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
from common.privacy.accounting import PATIENT
from common.privacy.ledger import Ledger, canonical_json, export_ledger
from common.protocol import RoundRequest, TrainReply

log = logging.getLogger(__name__)


@dataclass
class SiteReply:
    arrays: OrderedDict[str, np.ndarray]  # the DP release
    public: TrainReply  # everything else that leaves, each field declared in common.protocol


@contextmanager
def records_in_use(settings: SiteSettings):
    """Around every use of the site's records: a fault here depends on them, so it
    takes the site out (one fixed status) instead of answering the request.
    A spent budget found after training (Opacus ran more than planned) is an
    answer about the ledger, and passes through."""
    try:
        yield
    except BudgetExhausted:
        raise
    except Exception as exc:  # noqa: BLE001  (whatever failed, the coordinator learns one bit)
        log.exception("site %d: a fault while using its records", settings.site_id)
        admission.take_out(settings, f"{type(exc).__name__}: {exc}")
        raise SiteUnavailable(str(exc)) from exc


def admitted_records(settings: SiteSettings, adm: admission.Admission,
                     fitted: Schema | None = None) -> SiteData:
    """The records as admitted: read as declared, the same records that were checked
    (else the site is out), then scaled by the federation's public constants."""
    data = load_site_data(settings)
    if data.fingerprint != adm.fingerprint:
        raise SiteUnavailable("the records no longer match those checked at admission")
    return scaled(data, fitted)


@dataclass
class SiteFeatures:
    train: np.ndarray
    holdout: np.ndarray
    data: SiteData
    seconds: float
    hit: bool


def site_features(settings: SiteSettings, trainable: str, data: SiteData) -> SiteFeatures:
    """Features of the site's train and holdout splits, from the on-disk cache:
    pooled backbone features (``trainable = head``), or the activations before
    the first trainable block (the cache key covers the cut point). Clamped to
    :data:`client.admission.FEATURE_LIMIT` (a declared, record-independent transform)."""
    schema = settings.declaration.schema
    backbone = input_backbone(settings.declaration.backbone, schema.image_size or 64, trainable)
    device = training.resolve_device(settings.device)
    tr = cached_features(backbone, data.train_x, cache_dir=settings.cache_dir, device=device,
                         data_fingerprint=data.fingerprint + ":train")
    ho = cached_features(backbone, data.holdout_x, cache_dir=settings.cache_dir, device=device,
                         data_fingerprint=data.fingerprint + ":holdout")
    train, holdout = (np.clip(f, -FEATURE_LIMIT, FEATURE_LIMIT) for f in (tr.features, ho.features))
    if not (np.isfinite(train).all() and np.isfinite(holdout).all()):
        raise ValueError("non-finite features")
    return SiteFeatures(train, holdout, data, tr.seconds + ho.seconds, tr.hit and ho.hit)


def _model(settings: SiteSettings, req: RoundRequest, in_dim: int):
    decl = settings.declaration
    return make_model(req.trainable, head=req.head, backbone=decl.backbone,
                      image_size=decl.schema.image_size or 64, in_dim=in_dim,
                      num_classes=decl.num_classes, hidden_dim=req.hidden_dim)


def anchor_fields(ledger: Ledger | None) -> dict:
    """The signed anchor a reply carries (count, head, signature, ledger and key ids):
    deterministic for a ledger state, verifiable with the site's public key only."""
    if ledger is None:  # a site without DP keeps no ledger, and says so (dp = 0)
        return {"ledger_entries": 0, "ledger_head": ""}
    a = ledger.anchor()
    return {"ledger_entries": a.count, "ledger_head": a.head, "ledger_signature": a.signature,
            "ledger_id": a.ledger_id, "ledger_key_id": a.key_id}


def ledger_export(settings: SiteSettings) -> str:
    """What the site sends at delivery: its ledger's rows, caps and a fresh signed seal
    (canonical JSON; all of it mechanism tuples and public values). '' without DP."""
    if not settings.dp or not settings.ledger_path.is_file():
        return ""
    return canonical_json(export_ledger(settings.ledger_path, settings.ledger_key)).decode()


def _timings(settings: SiteSettings, **seconds: float) -> dict[str, float] | None:
    return {f"{k}-seconds": v for k, v in seconds.items()} if settings.release_timings else None


def train_round(settings: SiteSettings, req: RoundRequest,
                global_arrays: dict[str, np.ndarray],
                adm: admission.Admission | None = None) -> SiteReply:
    """One site round: admission, checks, budget, then the records: train, charge, reply.

    The reply carries only what :mod:`common.protocol` declares: the DP head and
    public values. The training loss, the holdout metrics of the head it received
    and the feature-cache flag stay in the site's log.

    Raises:
        SiteUnavailable: the site is not admitted, or a fault while using its records
            took it out.
        PolicyDeclined, RequestRejected: the request is outside the policy or the
            declaration, or unsafe; no record was read, nothing was recorded.
        BudgetExhausted: the round would pass the cap; nothing was trained.
    """
    t_start = time.perf_counter()
    adm = adm or admission.require(settings)
    guard.check_train(req, settings, global_arrays, adm.num_train, adm.record_shape)
    req = dataclasses.replace(req, batch_size=guard.planned_batch(req, adm.num_train))
    fitted = Schema.from_json(req.schema)
    ledger = budget.open_ledger(settings)
    t_privacy = time.perf_counter()
    planned = None
    if ledger is not None:
        budget.check_cap(ledger, settings)
        planned = budget.plan(req, settings, ledger, adm.num_train)
    privacy_seconds = time.perf_counter() - t_privacy
    with records_in_use(settings):
        data = admitted_records(settings, adm, fitted)
        feats = site_features(settings, req.trainable, data)
        model = _model(settings, req, feats.train.shape[1])
        load_model_state(model, global_arrays)  # the head (and the tuned part of the backbone)
        if req.server_round > 1:  # the incoming head is the previous round's global head
            log.info("site %d: round %d's global head on the site's holdout (kept here): %s",
                     settings.site_id, req.server_round - 1, holdout_metrics(model, feats))
        device = training.resolve_device(settings.device)
        weights = list(req.class_weights) or None  # public, checked by the guard
        if planned is None:
            seed = settings.holdout_seed + settings.site_id + 1000 * req.server_round
            result = training.train_plain(model, feats.train, data.train_y,
                                          epochs=req.local_epochs, batch_size=req.batch_size,
                                          lr=req.learning_rate, momentum=req.momentum, seed=seed,
                                          device=device, class_weights=weights)
            eps = math.inf  # no DP: no finite guarantee, and every reply says so (dp = 0)
        else:
            dp_args = dict(epochs=req.local_epochs, batch_size=req.batch_size,
                           lr=req.learning_rate, momentum=req.momentum,
                           noise_multiplier=planned.mechanism.noise_multiplier,
                           clip_norm=req.clip_norm, seed=None, device=device,
                           class_weights=weights)
            if settings.privacy_unit == PATIENT:  # Poisson over patients, one bag each
                result = training.train_dp_patients(
                    model, feats.train, data.train_y, groups=data.train_groups,
                    max_records_per_patient=settings.group_size, **dp_args)
            else:
                result = training.train_dp(model, feats.train, data.train_y, **dp_args)
            if [m.as_tuple() for m in result.mechanisms] != [planned.mechanism.as_tuple()]:
                # Record what really ran, never what was planned.
                log.warning("Opacus ran %s, planned %s", result.mechanisms, planned.mechanism)
            t_commit = time.perf_counter()
            eps = budget.charge(ledger, settings, run_id=req.run_id, server_round=req.server_round,
                                mechanisms=result.mechanisms, clip_norm=req.clip_norm,
                                num_units=adm.num_train, sampler="poisson",
                                secure_rng=training.SECURE_RNG, planned=planned,
                                trained=json.dumps({"trainable": req.trainable,
                                                    "params": num_trainable(model)},
                                                   sort_keys=True))
            privacy_seconds += time.perf_counter() - t_commit
            if eps > settings.target_epsilon:
                # Opacus ran more than was planned and projected. The spend stays
                # recorded (it happened); the update is withheld, so the released
                # output never carries more than the cap.
                raise BudgetExhausted(eps, settings.target_epsilon, eps, settings.target_delta,
                                      settings.privacy_unit)
        arrays = model_state(model)
        if not all(np.isfinite(v).all() for v in arrays.values()):
            raise ValueError("the trained model holds non-finite values")
    log.info("site %d round %d (kept here): train loss %.4f, features %.2f s (cache %s)",
             settings.site_id, req.server_round, result.loss, feats.seconds,
             "hit" if feats.hit else "miss")
    mech = result.mechanisms[0] if result.mechanisms else None
    public = TrainReply(
        site_id=settings.site_id, num_examples=adm.num_train, dp=settings.dp, epsilon=eps,
        delta=settings.target_delta if mech is not None else 0.0,
        noise_multiplier=mech.noise_multiplier if mech is not None else 0.0,
        sample_rate=mech.sample_rate if mech is not None else 0.0, steps=result.steps,
        **anchor_fields(ledger), privacy_unit=settings.privacy_unit,
        timings=_timings(settings, feature=feats.seconds, train=result.seconds,
                         privacy=privacy_seconds, site=time.perf_counter() - t_start))
    return SiteReply(arrays=arrays, public=public)


def scaling_release(settings: SiteSettings, req: RoundRequest,
                    adm: admission.Admission | None = None) -> tuple[np.ndarray, TrainReply]:
    """The site's DP release for ``dp`` feature scaling (``query.scaling``):
    noisy clipped sums over its training records, charged to its ledger as
    round 0 *before* they leave (:mod:`common.privacy.scaling`). One release per
    run: a repeated query (averaging the noise away) is declined.

    Raises:
        SiteUnavailable, PolicyDeclined, RequestRejected, BudgetExhausted: as for
            a round; nothing is released or recorded.
    """
    t_start = time.perf_counter()
    adm = adm or admission.require(settings)
    guard.check_query(req, settings)
    schema = Schema.from_json(req.schema)
    if settings.privacy_unit == PATIENT and settings.dp:
        # The scaling sums add one vector per record: their sensitivity is per record.
        raise guard.PolicyDeclined("outside the site's policy: this site's unit of privacy is "
                                   "one patient, and DP feature scaling releases sums bounded "
                                   "per record; use public scaling constants")
    if not schema.needs("dp"):
        raise RequestRejected("request rejected by site: a scaling query needs a schema with "
                              "'dp'-scaled features")
    if not 0 < req.scaling_budget <= 0.5:
        raise RequestRejected(f"request rejected by site: scaling-budget must be in (0, 0.5] of "
                              f"the cap, got {req.scaling_budget!r}")
    ledger = budget.open_ledger(settings)
    mech = None
    if ledger is not None:
        budget.check_cap(ledger, settings)
        if ledger.has_round(req.run_id, 0):
            raise RequestRejected("request rejected by site: this run's scaling release was "
                                  "already made (one per run)")
        sigma = scaling.scaling_sigma(cap=settings.target_epsilon, delta=settings.target_delta,
                                      budget=req.scaling_budget,
                                      floor=settings.min_noise_multiplier)
        mech = scaling.mechanism(sigma)
        budget.project(settings, ledger, mech)
    with records_in_use(settings):
        data = admitted_records(settings, adm)
        vectors, bound = schema.scaling_vectors(data.train_x)
        if mech is None:  # the site's own policy: no DP, exact sums, and the reply says so
            sums, eps = vectors.sum(axis=0), math.inf
        else:
            sums = scaling.noisy_sum(vectors, norm_bound=bound, sigma=mech.noise_multiplier)
            eps = budget.charge(ledger, settings, run_id=req.run_id, server_round=0,
                                mechanisms=[mech], clip_norm=bound, num_units=adm.num_train,
                                sampler=scaling.SAMPLER, secure_rng=scaling.SECURE_RNG)
    log.info("site %d: DP scaling release of %d features over %d records (σ=%s), ε %.4f",
             settings.site_id, len(schema.needs("dp")), adm.num_train,
             mech and mech.noise_multiplier, eps)
    seconds = time.perf_counter() - t_start
    public = TrainReply(
        site_id=settings.site_id, num_examples=adm.num_train, dp=settings.dp, epsilon=eps,
        delta=settings.target_delta if mech is not None else 0.0,
        noise_multiplier=mech.noise_multiplier if mech is not None else 0.0,
        sample_rate=1.0 if mech is not None else 0.0, steps=1 if mech is not None else 0,
        **anchor_fields(ledger), privacy_unit=settings.privacy_unit,
        timings=_timings(settings, feature=0.0, train=0.0, privacy=seconds, site=seconds))
    return sums, public


def evaluate_site(settings: SiteSettings, arrays: dict[str, np.ndarray], *, trainable: str,
                  head: str, hidden_dim: int, card_schema: dict | None = None
                  ) -> dict[str, float]:
    """Evaluate a model (the delivered one) on the site's own holdout.

    For the site's own log: holdout metrics are computed from private records
    without DP, so :mod:`common.protocol` forbids sending them.
    """
    fitted = Schema.from_dict(card_schema) if card_schema else None
    data = scaled(load_site_data(settings), fitted)
    feats = site_features(settings, trainable, data)
    req = RoundRequest(run_id="", server_round=0, num_rounds=0, local_epochs=0, batch_size=0,
                       learning_rate=0.0, momentum=0.0, clip_norm=0.0, noise_multiplier=0.0,
                       trainable=trainable, head=head, hidden_dim=hidden_dim)
    model = _model(settings, req, feats.holdout.shape[1])
    load_model_state(model, arrays)
    return {"site-id": settings.site_id, **holdout_metrics(model, feats)}


def holdout_metrics(model, feats: SiteFeatures, prefix: str = "") -> dict[str, float]:
    """``model`` on the site's holdout features: accuracy, balanced accuracy, AUC, loss."""
    m = training.evaluate(model, feats.holdout, feats.data.holdout_y)
    return {f"{prefix}{k}": v for k, v in (
        ("num-examples", len(feats.data.holdout_y)), ("accuracy", m["accuracy"]),
        ("balanced-accuracy", m["balanced_accuracy"]), ("auc", m["auc"]), ("loss", m["loss"]))}


def save_delivery(settings: SiteSettings, card: dict, arrays: dict[str, np.ndarray],
                  student: dict[str, np.ndarray] | None) -> tuple[Path, str]:
    """Save the delivered head and student under the site's model directory.

    The card gains this site's own view: its id and its ε recomputed from its
    own ledger (not the server's report), with its unit. Returns the card path
    and the bundle hash (over the saved files), which the server checks.
    """
    own = None
    if settings.dp and settings.ledger_path.is_file():
        own = Ledger(settings.ledger_path, settings.ledger_key).epsilon(
            delta=settings.target_delta)
    card = {**card, "site": {"site_id": settings.site_id, "epsilon_own_ledger": own,
                             "delta": settings.target_delta if settings.dp else None,
                             "unit": settings.unit_text}}
    path = save_bundle(settings.models, card=card, head=arrays, student=student)
    log.info("site %d saved the delivered models to %s", settings.site_id, path.parent)
    return path, read_card(path)["sha256"]
