"""Distillation orchestration after the last round (server side).

The maths is in :mod:`common.models.distill`; this wires it to the run: it picks
the public transfer set, builds the teacher candidates from the final global
head and the sites' last accepted heads, distils the student, and measures
teacher and student side by side (test metrics, parameters, CPU time per
image) in this one process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from common.config import RunConfig
from common.data.datasets import Splits, fingerprint_arrays
from common.models import distill as kd
from common.models import students
from common.models.decision import choose_decision
from common.models.features import cached_features
from common.models.finetune import input_backbone, load_model_state, make_model
from common.models.metrics import classification_metrics, metrics_at_rule
from common.models.predict import read_inputs

log = logging.getLogger(__name__)

PRIVACY_NOTE = ("distillation uses only public data (the transfer set and the public validation "
                "split) and the DP-trained heads: it is post-processing of DP releases and costs "
                "no ε at any site")
TIMING_RECORDS = 256


@dataclass
class DistillOutcome:
    spec: students.StudentSpec
    student: OrderedDict[str, np.ndarray]
    summary: dict


@contextlib.contextmanager
def torch_threads(n: int):
    """Small convolutions run fastest (and time most stably) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transfer_and_val(cfg: RunConfig, splits: Splits) -> tuple[kd.TransferSet, kd.PublicVal]:
    """The public transfer set and the distillation-validation split.

    Default: the dataset's public validation split, divided disjointly (its
    labels are dropped for the transfer part). With ``transfer-data``: that
    server-side file or folder (its labels, if any, are not read), refused
    if it shares any record with the training split the sites draw from.
    """
    if not cfg.transfer_data:
        return kd.split_public(splits.val_x, splits.val_y, val_fraction=cfg.distill_val_fraction,
                               seed=cfg.seed)
    records = read_inputs(cfg.transfer_data).records
    if records.shape[1:] != splits.val_x.shape[1:]:
        raise ValueError(f"transfer-data {cfg.transfer_data}: records shaped {records.shape[1:]}, "
                         f"the dataset's records are {splits.val_x.shape[1:]}")
    kd.check_disjoint(records, [splits.train_x])
    return (kd.TransferSet(records, f"server file {cfg.transfer_data}"),
            kd.PublicVal(splits.val_x, splits.val_y))


def run_distillation(cfg: RunConfig, splits: Splits, test_features: np.ndarray,
                     global_head: dict[str, np.ndarray], site_heads: dict[int, dict[str, np.ndarray]],
                     ) -> DistillOutcome:
    t0 = time.perf_counter()
    # The teacher's input: pooled features, or the cut-point activations the tuned suffix takes.
    backbone = input_backbone(cfg.backbone, cfg.image_size, cfg.trainable)
    transfer, pval = transfer_and_val(cfg, splits)
    pool = kd.augment(transfer.images, copies=cfg.distill_augment, seed=cfg.seed)

    def feats(x: np.ndarray, tag: str) -> np.ndarray:
        return cached_features(backbone, x, data_fingerprint=fingerprint_arrays(x) + f":{tag}",
                               cache_dir=cfg.cache_dir).features

    t_feat = time.perf_counter()
    pool_f, val_f = feats(pool, "distill-pool"), feats(pval.images, "distill-val")
    t_feat = time.perf_counter() - t_feat
    in_dim, k = test_features.shape[1], splits.num_classes

    def head(arrays):
        # The head alone, or the tuned suffix + head (the teacher uses the tuned backbone).
        return load_model_state(make_model(cfg.trainable, head=cfg.head, backbone=cfg.backbone,
                                           image_size=cfg.image_size, in_dim=in_dim,
                                           num_classes=k, hidden_dim=cfg.hidden_dim), arrays)

    teachers = {"global": [head(global_head)]}
    if site_heads:
        teachers["ensemble"] = [head(site_heads[s]) for s in sorted(site_heads)]
    name, val_scores = kd.choose_teacher(
        cfg.teacher, {n: kd.ensemble_logits(h, val_f) for n, h in teachers.items()}, pval.labels)
    heads = teachers[name]
    log.info("distillation: teacher %s (%d head%s; public-val AUC %s), transfer set %d records "
             "(%s) x%d augmented = %d, val %d", name, len(heads), "s" * (len(heads) > 1),
             ", ".join(f"{n} {v['auc']:.3f}" for n, v in val_scores.items()), len(transfer),
             transfer.source, cfg.distill_augment + 1, len(pool), len(pval.labels))

    spec = students.student_spec_for(cfg.student, transfer.images, k, width=cfg.student_width,
                               depth=cfg.student_depth)
    student = students.make_student(spec, seed=cfg.seed)
    pool_in = students.to_student_input(pool, spec)
    if spec.name == "mlp":  # standardise with public transfer-set statistics
        student.mean.copy_(pool_in.mean(0))
        student.scale.copy_(pool_in.std(0).clamp_min(1e-6))
    # Training uses every core; only the speed comparison is single-threaded.
    result = kd.distill(student, pool_in, kd.ensemble_logits(heads, pool_f),
                        students.to_student_input(pval.images, spec), pval.labels,
                        epochs=cfg.distill_epochs, patience=cfg.distill_patience,
                        temperature=cfg.distill_temperature, lr=cfg.distill_learning_rate,
                        seed=cfg.seed)
    test_in = students.to_student_input(splits.test_x, spec)
    # The student's own decision rule, chosen on the distillation-validation part of
    # the public val split: public records the student was not fitted to (post-processing).
    # It follows `decision-objective`, as the head's rule does (server/evaluation.py).
    if cfg.decision_objective == "argmax":
        student_rule = {"rule": "argmax", "reason": "decision-objective = argmax"}
    else:
        student_rule = choose_decision(
            kd.probs_from_logits(kd.student_logits(
                student, students.to_student_input(pval.images, spec))),
            pval.labels, objective=cfg.decision_objective.replace("-", "_"),
            chosen_on=f"the public distillation-validation split ({len(pval.labels)} records "
                      "of the public validation split, not used to fit the student)")
    student_test = metrics_at_rule(kd.probs_from_logits(kd.student_logits(student, test_in)),
                                   splits.test_y, student_rule)
    teacher_test = classification_metrics(
        kd.probs_from_logits(kd.ensemble_logits(heads, test_features)), splits.test_y)
    sample = splits.test_x[:TIMING_RECORDS]

    def teacher_fn(x):
        f = torch.from_numpy(backbone.extract(x))
        return sum(h(f) for h in heads) / len(heads)

    def student_fn(x):
        return student(students.to_student_input(x, spec))

    with torch_threads(1):
        teacher_ms = kd.cpu_ms_per_image(teacher_fn, sample)
        student_ms = kd.cpu_ms_per_image(student_fn, sample)
    teacher_params = backbone.num_parameters() + sum(students.num_parameters(h) for h in heads)
    student_params = students.num_parameters(student)
    seconds = time.perf_counter() - t0
    log.info("distillation: %d epochs (best %d) in %.1f s | test AUC teacher %.3f student %.3f | "
             "params %d vs %d (x%.3g) | CPU ms/image %.3f vs %.3f (x%.3g)", result.epochs_run,
             result.best_epoch, seconds, teacher_test["auc"], student_test["auc"], teacher_params,
             student_params, teacher_params / student_params, teacher_ms, student_ms,
             teacher_ms / student_ms)
    pick = ("auc", "accuracy", "balanced_accuracy", "loss")
    summary = {
        "teacher": {"kind": name, "heads": len(heads), "backbone": cfg.backbone,
                    **{m: teacher_test[m] for m in pick}, "params": teacher_params,
                    "cpu_ms_per_image": teacher_ms, "val": val_scores[name],
                    "candidates_val": val_scores},
        "student": {"architecture": spec.architecture, "spec": spec.to_dict(),
                    **{m: student_test[m] for m in pick}, "argmax": student_test["argmax"],
                    "decision": student_rule, "params": student_params,
                    "cpu_ms_per_image": student_ms, "val": result.val},
        "distillation": {
            "transfer_source": transfer.source, "transfer_records": len(transfer),
            "augmented_copies": cfg.distill_augment, "pool_records": len(pool),
            "val_records": len(pval.labels), "temperature": cfg.distill_temperature,
            "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "early_stopping": "log loss on the public distillation-validation split",
            "params_ratio": teacher_params / student_params,
            "cpu_speedup": teacher_ms / student_ms,
            "timing": f"median of 3 passes over {len(sample)} test images, batch 64, 1 CPU thread, "
                      "raw image in to probabilities out (teacher includes resizing and backbone)",
            "seconds": seconds, "feature_seconds": t_feat, "train_seconds": result.seconds,
            "privacy": PRIVACY_NOTE,
        },
    }
    state = OrderedDict((k_, v.detach().cpu().numpy().copy()) for k_, v in student.state_dict().items())
    return DistillOutcome(spec=spec, student=state, summary=summary)
