"""Server-side distillation: the transfer set is public and structurally
apart from every site's private records."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import parse_config
from common.data.datasets import Splits, load_dataset, site_data
from common.models import distill as kd
from server.distill import transfer_and_val


class _Poisoned:
    """Stands in for the private training split: any use of it fails the test."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("distillation read the private training split")

    __array__ = __getitem__ = __len__ = __iter__ = _fail
    __add__ = __sub__ = __mul__ = __eq__ = _fail

    def __getattr__(self, name):
        self._fail()


def test_the_poisoned_split_really_fails_on_use():
    for use in (lambda p: p[0], lambda p: np.asarray(p), lambda p: p.shape, lambda p: len(p),
                lambda p: kd.check_disjoint(np.zeros((1, 2)), [p])):
        with pytest.raises(AssertionError, match="read the private training split"):
            use(_Poisoned())


def test_transfer_set_never_reads_the_training_split_sites_draw_from():
    s = load_dataset("digits")
    splits = Splits(s.name, s.classes, _Poisoned(), _Poisoned(), s.val_x, s.val_y, s.test_x,
                    s.test_y)
    transfer, val = transfer_and_val(parse_config({}), splits)
    # Disjoint from every site's private records (train and holdout) and from test.
    transfer_rows = kd.row_hashes(transfer.images)
    for site in range(4):
        d = site_data(s, site_id=site, num_sites=4, partitioner="dirichlet", alpha=0.5,
                      holdout=0.2, shift=0.0, seed=0)
        assert not transfer_rows & kd.row_hashes(d.train_x)
        assert not transfer_rows & kd.row_hashes(d.holdout_x)
    assert not transfer_rows & kd.row_hashes(s.test_x)
    assert not transfer_rows & kd.row_hashes(val.images)
    assert len(transfer) + len(val.labels) == len(s.val_y)


def test_a_transfer_file_with_private_records_is_refused(tmp_path):
    s = load_dataset("digits")
    path = tmp_path / "transfer.npz"
    np.savez(path, images=np.concatenate([s.val_x[:10], s.train_x[5:7]]))
    with pytest.raises(ValueError, match="shares 2 records with private site data"):
        transfer_and_val(parse_config({"transfer-data": str(path)}), s)
    np.savez(path, images=s.val_x[:10])
    transfer, val = transfer_and_val(parse_config({"transfer-data": str(path)}), s)
    assert len(transfer) == 10 and len(val.labels) == len(s.val_y)


@pytest.mark.parametrize("objective", ["accuracy", "argmax"])
def test_the_students_decision_rule_follows_decision_objective(tmp_path, objective):
    """issue 24: the student's shipped rule is chosen for the run's `decision-objective`,
    as the head's is, never by a rule of its own."""
    from common.config import RunConfig
    from common.data.datasets import load_dataset
    from common.models.heads import head_state, make_head
    from server.distill import run_distillation

    cfg = RunConfig(backbone="identity", decision_objective=objective, distill_epochs=2,
                    distill_augment=0, student_width=4, student_depth=1,
                    cache_dir=str(tmp_path / "cache"))
    splits = load_dataset("digits", seed=0)
    head = head_state(make_head("linear", in_dim=64, num_classes=10, seed=0))
    out = run_distillation(cfg, splits, splits.test_x.reshape(len(splits.test_x), -1), head, {})
    rule = out.summary["student"]["decision"]
    if objective == "argmax":
        assert rule == {"rule": "argmax", "reason": "decision-objective = argmax"}
    else:
        assert rule.get("objective") == "accuracy"
