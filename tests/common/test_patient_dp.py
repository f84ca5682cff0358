"""Patient-level DP-SGD (common/models/training.py: train_dp_patients, PatientBags,
BagCrossEntropy): each patient's clipped gradient, checked against per-patient
autograd over generated bag sizes, caps and shapes, for the head and each
trainable mode."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from common.models import finetune, training
from common.models.backbones import get_backbone
from common.models.heads import make_head
from common.privacy.accounting import PATIENT, RECORD, Mechanism, dp_plan

TUNED_SIZE = 32  # cut-point activations (N, 192, 1, 1)
TINY_SIGMA = 1e-9  # noise std σ·C: far below the float tolerance, so the update is the clipped sum


@pytest.fixture(scope="module")
def cut_activations():
    """Real cut-point activations of random images, per spatial size: random normal
    activations leave the pretrained suffix's ReLU6 outputs all zero (no gradient
    reaches the suffix), so tuned-mode records are drawn around these."""
    rng = np.random.default_rng(0)
    out = {}
    for size in (32, 64):
        prefix = finetune.prefix_backbone(get_backbone("efficientnet-lite0", size))
        acts = prefix.extract(rng.random((12, size, size)).astype(np.float32))
        out[acts.shape[2:]] = acts
    return out


@pytest.fixture(scope="module")
def tuned_models():
    """One pretrained model per trainable mode (tests take deep copies)."""
    return {mode: finetune.make_model(mode, head="linear", backbone="efficientnet-lite0",
                                      image_size=TUNED_SIZE, in_dim=0, num_classes=2, seed=0)
            for mode in ("bitfit", "last-block")}


def _data(sizes, feature_shape, num_classes, seed):
    """Records of patients with ``sizes`` records each; patient ids are strings, and
    the records of different patients are interleaved (ids are not sorted)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.array([f"p{i}" for i in range(len(sizes))], dtype=object), sizes)
    perm = rng.permutation(len(groups))
    groups = groups[perm]
    x = rng.normal(size=(len(groups), *feature_shape)).astype(np.float32)
    y = rng.integers(0, num_classes, len(groups))
    return x, y, groups


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _hand_clipped_sum(model, x, y, bag_idx, clip, weights=None):
    """Σ over patients of clip(∇ mean-over-bag loss): autograd on each patient's
    real records alone (record-shaped inputs, no bags, no Opacus)."""
    total = {n: torch.zeros_like(p) for n, p in _trainable(model)}
    for row in bag_idx:
        rec = row[row >= 0]
        m = copy.deepcopy(model).train()
        m.zero_grad()
        xb, yb = torch.as_tensor(x[rec.numpy()]), torch.as_tensor(y[rec.numpy()])
        per = F.cross_entropy(m(xb), yb, reduction="none")
        if weights is not None:
            per = torch.as_tensor(weights, dtype=torch.float32)[yb] * per
        per.mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in _trainable(m)}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = (clip / (norm + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
        for n in total:
            total[n] += factor * grads[n]
    return total


def _check_one_step(model, x, y, groups, *, cap, clip, mode, seed, weights=None,
                    rtol, atol):
    """One step of train_dp_patients with every patient sampled (q = 1) and a
    negligible σ. Opacus leaves the step's gradient in ``p.grad``: (Σ clipped
    per-patient gradients + noise) / expected batch size (P here), so ``p.grad · P``
    must equal the hand-clipped sum, tensor by tensor (tolerances relative to
    each tensor's own scale, so small tensors such as BN shifts count too); and
    the step moved the parameters by ``-lr · p.grad``."""
    bags = training.PatientBags(x, y, groups, max_records_per_patient=cap)
    num_patients = bags.num_patients
    # The bags the run will draw: the same generator stream (seed + 2) over all patients.
    bag_idx = bags.draw_indices(torch.arange(num_patients), torch.Generator().manual_seed(seed + 2))
    expected = _hand_clipped_sum(model, x, y, bag_idx, clip, weights)
    before = {n: p.detach().clone() for n, p in _trainable(model)}
    lr = 0.5
    res = training.train_dp_patients(
        model, x, y, groups=groups, max_records_per_patient=cap, epochs=1,
        batch_size=num_patients, lr=lr, noise_multiplier=TINY_SIGMA, clip_norm=clip,
        seed=seed, grad_sample_mode=mode, class_weights=weights)
    assert res.mechanisms == [Mechanism(noise_multiplier=TINY_SIGMA, sample_rate=1.0, steps=1)]
    assert res.unit == PATIENT and res.units == num_patients
    for n, p in _trainable(model):
        got = p.grad.detach() * num_patients
        scale = float(expected[n].abs().max())
        # atol: relative to the tensor's own scale, plus the noise (σ·C = 1e-9 per
        # coordinate, times P) as a floor.
        torch.testing.assert_close(got, expected[n], rtol=rtol, atol=atol * scale + 1e-7,
                                   msg=n)
        torch.testing.assert_close(before[n] - p.detach(), lr * p.grad.detach(), rtol=1e-3,
                                   atol=1e-6)


bag_sizes = st.lists(st.integers(1, 7), min_size=1, max_size=6)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(sizes=bag_sizes, cap=st.integers(1, 5), dim=st.integers(1, 6),
       num_classes=st.integers(2, 4), clip=st.floats(0.05, 5.0),
       head=st.sampled_from(["linear", "mlp"]), mode=st.sampled_from(["hooks", "ghost"]),
       weighted=st.booleans(), seed=st.integers(0, 2**20))
def test_head_per_patient_gradient_is_the_clipped_bag_mean_gradient(
        sizes, cap, dim, num_classes, clip, head, mode, weighted, seed):
    x, y, groups = _data(sizes, (dim,), num_classes, seed)
    model = make_head(head, in_dim=dim, num_classes=num_classes, hidden_dim=5, seed=seed)
    weights = list(np.linspace(0.5, 2.0, num_classes)) if weighted else None
    _check_one_step(model, x, y, groups, cap=cap, clip=clip, mode=mode, seed=seed,
                    weights=weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("trainable", ["bitfit", "last-block"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@settings(derandomize=True, max_examples=5, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=0, max_size=3), cap=st.integers(2, 3),
       spatial=st.sampled_from([(1, 1), (2, 2)]), clip=st.floats(0.01, 2.0),
       seed=st.integers(0, 2**20))
def test_tuned_per_patient_gradient_is_the_clipped_bag_mean_gradient(
        tuned_models, cut_activations, trainable, mode, sizes, cap, spatial, clip, seed):
    """The suffix sees (B, K, C, H, W) bags: its grad samplers (and ghost norms)
    sum over the bag, which must equal each patient's own gradient. One patient
    always has more records than the cap."""
    _, y, groups = _data([cap + 1, *sizes], (1,), 2, seed)
    pool = cut_activations[spatial]
    rng = np.random.default_rng(seed)
    x = (pool[rng.integers(0, len(pool), len(y))]
         + rng.normal(size=(len(y), *pool.shape[1:]))).astype(np.float32)
    model = copy.deepcopy(tuned_models[trainable])
    assert float(model.suffix(torch.as_tensor(x)).abs().sum()) > 0  # gradients reach the suffix
    _check_one_step(model, x, y, groups, cap=cap, clip=clip, mode=mode, seed=seed,
                    rtol=1e-3, atol=1e-4)


def _grad_samples(model, x, y, mode):
    """Per-sample gradients (hooks) or norms (ghost) of BagCrossEntropy on bags."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    crit = training.BagCrossEntropy()
    crit.reduction = "none"
    if mode == "hooks":
        gsm = GradSampleModule(model, loss_reduction="sum")
        gsm.zero_grad()
        crit(gsm(x), y).sum().backward()
        out = torch.cat([p.grad_sample.flatten(1) for _, p in _trainable(model)], dim=1)
    else:
        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1e9,
                                                   use_ghost_clipping=True, loss_reduction="sum")
        gsm.zero_grad()
        crit(gsm(x), y).sum().backward()
        out = gsm.get_norm_sample().detach()
    gsm._close()
    return out.detach().clone()


@settings(derandomize=True, max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4), extra=st.integers(1, 4),
       model_kind=st.sampled_from(["linear", "mlp", "bitfit", "last-block"]),
       mode=st.sampled_from(["hooks", "ghost"]), seed=st.integers(0, 2**20))
def test_padding_never_contributes(tuned_models, cut_activations, sizes, extra, model_kind,
                                   mode, seed):
    """Padded slots hold garbage here (not the zeros PatientBags writes) and the
    bags are padded further: every per-patient gradient (or ghost norm) is unchanged."""
    tuned = model_kind in ("bitfit", "last-block")
    x, y, groups = _data(sizes, (192, 1, 1) if tuned else (4,), 2, seed)
    if tuned:
        x = x + cut_activations[(1, 1)][np.arange(len(x)) % 12]
    cap = max(sizes)
    bags = training.PatientBags(x, y, groups, max_records_per_patient=cap)
    xb, yb = bags.draw(torch.arange(bags.num_patients), torch.Generator().manual_seed(seed))
    rng = torch.Generator().manual_seed(seed + 1)
    pad = torch.randn((xb.shape[0], extra, *xb.shape[2:]), generator=rng) * 100
    noisy = xb.clone()
    noisy[yb == training.PAD_LABEL] = torch.randn(noisy[yb == training.PAD_LABEL].shape,
                                                  generator=rng) * 100
    x_more = torch.cat([noisy, pad], dim=1)
    y_more = torch.cat([yb, torch.full((len(yb), extra), training.PAD_LABEL)], dim=1)

    def model():
        if model_kind in ("linear", "mlp"):
            return make_head(model_kind, in_dim=4, num_classes=2, hidden_dim=3, seed=seed)
        return copy.deepcopy(tuned_models[model_kind])

    torch.testing.assert_close(_grad_samples(model(), x_more, y_more, mode),
                               _grad_samples(model(), xb, yb, mode), rtol=1e-4, atol=1e-6)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8), cap=st.integers(1, 6),
       seed=st.integers(0, 2**20))
def test_a_bag_holds_min_of_size_and_cap_distinct_records_of_its_patient(sizes, cap, seed):
    x, y, groups = _data(sizes, (2,), 2, seed)
    bags = training.PatientBags(x, y, groups, max_records_per_patient=cap)
    order = list(dict.fromkeys(groups.tolist()))  # factorize: order of first appearance
    gen = torch.Generator().manual_seed(seed)
    patients = torch.randperm(len(order), generator=gen)[: max(1, len(order) // 2)]
    idx = bags.draw_indices(patients, gen)
    assert idx.shape == (len(patients), cap)
    for p, row in zip(patients.tolist(), idx, strict=True):
        rec = row[row >= 0].tolist()
        mine = np.flatnonzero(groups == order[p]).tolist()
        assert len(rec) == min(len(mine), cap)  # exactly the cap for a larger patient
        assert len(set(rec)) == len(rec) and set(rec) <= set(mine)
        assert (row[len(rec):] == -1).all()  # real records first, then padding
    xb, yb = bags.gather(idx)
    assert ((yb == training.PAD_LABEL) == (idx < 0)).all()
    assert (xb[idx < 0] == 0).all()


def test_a_larger_patients_subset_is_drawn_afresh_and_uniformly():
    sizes, cap = [9, 2], 3
    x, y, groups = _data(sizes, (2,), 2, 0)
    bags = training.PatientBags(x, y, groups, max_records_per_patient=cap)
    gen = torch.Generator().manual_seed(0)
    draws = 3000
    counts = np.zeros(len(y))
    subsets = set()
    for _ in range(draws):
        row = bags.draw_indices(torch.tensor([0]), gen)[0]
        counts[row.numpy()] += 1
        subsets.add(tuple(sorted(row.tolist())))
    big = np.flatnonzero(groups == "p0")
    # each of the 9 records is in a bag with probability 3/9; binomial sd ≈ 26 of 1000
    assert np.all(np.abs(counts[big] - draws * cap / 9) < 6 * math.sqrt(draws * 3 / 9 * 6 / 9))
    assert len(subsets) > 60  # of C(9, 3) = 84 possible subsets


def test_training_feeds_each_sampled_patient_at_most_the_cap_every_step():
    """End to end: a forward pre-hook sees every step's bags; features are
    nonzero, so a bag's real rows are its nonzero rows."""
    sizes, cap = [1, 2, 5, 8, 3, 12], 4
    x, y, groups = _data(sizes, (3,), 2, 1)
    x = np.abs(x) + 1.0
    head = nn.Linear(3, 2)
    seen = []
    head.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    training.train_dp_patients(head, x, y, groups=groups, max_records_per_patient=cap, epochs=3,
                               batch_size=3, lr=0.1, noise_multiplier=1.0, clip_norm=1.0, seed=0)
    rows = [int(r) for bags in seen for r in (bags.abs().sum(-1) > 0).sum(-1)]
    assert rows and all(r >= 1 for r in rows)
    assert max(rows) == cap and set(rows) <= {1, 2, 3, 4}
    assert all(b.shape[1] == cap for b in seen)  # padded to the public cap, whatever the batch


@pytest.mark.parametrize("batch_size, epochs", [(4, 3), (25, 1), (1, 2)])
def test_the_released_mechanism_is_over_patients(batch_size, epochs):
    sizes = [1, 3, 2, 5, 4, 1, 1, 2, 6, 3, 2, 1, 1, 4, 2, 7, 1, 2, 3, 1, 2, 2, 1, 5, 1]
    x, y, groups = _data(sizes, (4,), 2, 2)
    res = training.train_dp_patients(nn.Linear(4, 2), x, y, groups=groups,
                                     max_records_per_patient=3, epochs=epochs,
                                     batch_size=batch_size, lr=0.1, noise_multiplier=1.3,
                                     clip_norm=1.0, seed=0)
    q, steps = dp_plan(len(sizes), batch_size=batch_size, epochs=epochs)  # P patients, not N
    assert res.mechanisms == [Mechanism(noise_multiplier=1.3, sample_rate=q, steps=steps)]
    assert res.steps == steps and res.units == len(sizes) and res.max_records_per_patient == 3
    records_q, _ = dp_plan(len(y), batch_size=batch_size, epochs=epochs)
    assert q != records_q


@pytest.mark.parametrize("head_kind, mode", [("linear", "hooks"), ("linear", "ghost"),
                                             ("mlp", "ghost")])
def test_one_record_per_patient_is_record_level_training(head_kind, mode):
    """Groups of size 1: the same mechanism, and (same seed) the same batches, noise
    and trained weights as train_dp."""
    rng = np.random.default_rng(0)
    n = 120
    x, y = rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 2, n)
    a = make_head(head_kind, in_dim=6, num_classes=2, hidden_dim=4, seed=1)
    b = copy.deepcopy(a)
    kw = dict(epochs=2, batch_size=16, lr=0.5, noise_multiplier=0.9, clip_norm=0.5, seed=5,
              grad_sample_mode=mode)
    rec = training.train_dp(a, x, y, **kw)
    pat = training.train_dp_patients(b, x, y, groups=np.arange(n), max_records_per_patient=4, **kw)
    assert rec.mechanisms == pat.mechanisms and rec.steps == pat.steps
    assert (rec.unit, pat.unit) == (RECORD, PATIENT) and rec.units == pat.units == n
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_kind", ["linear", "mlp", "bitfit", "last-block"])
def test_empty_poisson_batches_and_every_mode_train(tuned_models, model_kind):
    """Few patients, one expected per step: many steps draw none; training still
    runs, trains the mode's parameters and stays finite."""
    tuned = model_kind in ("bitfit", "last-block")
    x, y, groups = _data([2, 1, 3, 1, 2], (192, 1, 1) if tuned else (5,), 2, 3)
    model = (copy.deepcopy(tuned_models[model_kind]) if tuned
             else make_head(model_kind, in_dim=5, num_classes=2, hidden_dim=3, seed=0))
    before = finetune.model_state(model)
    res = training.train_dp_patients(model, x, y, groups=groups, max_records_per_patient=2,
                                     epochs=4, batch_size=1, lr=0.5, noise_multiplier=1.0,
                                     clip_norm=1.0, seed=11)
    assert res.steps == 20 and res.grad_sample_mode == ("hooks" if model_kind == "linear"
                                                        else "ghost")
    after = finetune.model_state(model)
    assert all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("kwargs, words", [
    ({"groups": ["a", "b"]}, "one of each per record"),
    ({"groups": ["a", None, "b"]}, "record 1 has no patient id"),
    ({"max_records_per_patient": 0}, "max_records_per_patient must be an integer >= 1"),
    ({"noise_multiplier": 0.0}, "noise_multiplier must be > 0"),
    ({"labels": np.array([0, -100, 1])}, "labels must be class indices >= 0"),
])
def test_bad_input_is_named(kwargs, words):
    x = np.zeros((3, 2), np.float32)
    y = kwargs.pop("labels", np.array([0, 1, 0]))
    args = dict(groups=["a", "b", "a"], max_records_per_patient=2, epochs=1, batch_size=1,
                lr=0.1, noise_multiplier=1.0, clip_norm=1.0, seed=0)
    with pytest.raises(ValueError, match=words):
        training.train_dp_patients(nn.Linear(2, 2), x, y, **{**args, **kwargs})
