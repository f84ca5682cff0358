"""A hostile coordinator against a deployed site.

Every test drives the real ClientApp, as ``flwr run`` would start it under a
SuperNode: the module's own ``client.app.app`` (no scenario override), a
deployed node config, and a run config and messages the server chose. The
site is 400 records of scikit-learn digits in a MedMNIST-style ``.npz``, as in
the issue's reproduction.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from common import protocol
from common.data.datasets import load_dataset
from common.data.readers import SiteDataError, own_site_data, scan_imagefolder
from common.data.schema import Schema, image_schema
from common.models.heads import head_state, make_head
from common.privacy.ledger import Ledger
from common.protocol import from_array_record, to_array_record

N = 400
TARGET = 7  # the record whose membership the server tries to learn
pytestmark = pytest.mark.usefixtures("flower_task")


def _digits(n: int = N, *, without: int | None = None):
    s = load_dataset("digits", seed=0)
    x = (s.train_x[:n + 1] * 255).round().astype(np.uint8)
    y = s.train_y[:n + 1]
    keep = [i for i in range(n + 1) if i != (n if without is None else without)]
    return x[keep], y[keep]


def _npz(path, x, y):
    """A MedMNIST-style file; all of its splits are the site's records."""
    a, b = int(len(x) * 0.8), int(len(x) * 0.9)
    y = y.reshape(-1, 1)
    np.savez(path, train_images=x[:a], train_labels=y[:a], val_images=x[a:b],
             val_labels=y[a:b], test_images=x[b:], test_labels=y[b:])
    return path


DIGITS = [str(d) for d in range(10)]
SCHEMA = image_schema(DIGITS, image_size=8, image_channels=1).to_json()


def _site(tmp_path, name="site", *, x=None, y=None, **policy) -> dict:
    """A deployed site: its digits in its own file, and its own declaration of how
    they are read (ten classes, 8x8 grey images, the identity backbone)."""
    if x is None:
        x, y = _digits()
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    return {"site-id": 3, "data-path": f"medmnist:{_npz(root / 'data.npz', x, y)}",
            "ledger-path": str(root / "ledger.sqlite"), "cache-dir": str(root / "cache"),
            "target-epsilon": 2.0, "target-delta": 1e-5, "class-names": ",".join(DIGITS),
            "image-size": 8, "backbone": "identity", **policy}


def _admitted_then_gone(node: dict) -> dict:
    """Admit the site (as `fedtransfer site serve` does when it starts), then remove
    its data file: a request declined before any record is read still answers."""
    from client import admission
    from client.settings import deployed_policy

    assert admission.admit(deployed_policy(node)).admitted
    Path(node["data-path"].removeprefix("medmnist:")).unlink()
    return node


# The server's run config: it tries to take over what only the site decides.
HOSTILE_RUN = {"backbone": "identity", "image-size": 8, "dp": False, "site-holdout": 0.95,
               "seed": 123, "target-epsilon": 1000.0, "target-delta": 0.5,
               "out-dir": "/tmp/server-chosen", "cache-dir": "/tmp/server-cache"}


def _train(node: dict, *, run: dict | None = None, head=None, **request) -> Message:
    req = {"server-round": 1, "num-rounds": 2, "local-epochs": 1, "batch-size": 32,
           "learning-rate": 0.5, "momentum": 0.0, "clip-norm": 1.0, "noise-multiplier": 0.0,
           "dp": True, "schema": SCHEMA, "backbone": "identity", **request}
    head = head if head is not None else head_state(make_head("linear", in_dim=64, num_classes=10))
    msg = Message(content=RecordDict({"arrays": to_array_record(head),
                                      "config": ConfigRecord(req)}),
                  message_type="train", dst_node_id=5)
    ctx = Context(run_id=9, node_id=5, node_config=node, state=RecordDict(),
                  run_config={**HOSTILE_RUN, "dp": True, **(run or {})})
    return client_app.app(msg, ctx)


def _status(reply: Message) -> dict:
    return dict(reply.content.config_records["status"])


def _entries(node: dict) -> int:
    path = Path(node["ledger-path"])
    return Ledger(path).count() if path.exists() else 0


# -- 1. DP cannot be switched off by the server ------------------------------
def test_the_server_cannot_switch_dp_off(tmp_path):
    node = _site(tmp_path)
    reply = _train(node, run={"dp": False}, dp=False)
    status = _status(reply)
    assert status["status"] == protocol.POLICY_DECLINED
    assert "only with DP-SGD" in status["reason"]
    assert not reply.content.array_records  # no head left the site
    assert _entries(node) == 0
    # The same request with DP trains and charges the site's own ledger.
    ok = _train(node)
    assert _status(ok)["status"] == "ok" and _entries(node) == 1
    m = ok.content.metric_records["metrics"]
    assert m["dp"] == 1 and 0 < m["epsilon"] <= 2.0 and m["delta"] == 1e-5


def test_a_site_that_opts_out_of_dp_says_so_in_every_reply(tmp_path):
    node = _site(tmp_path, dp=False)
    assert _status(_train(node))["status"] == protocol.POLICY_DECLINED  # asked for DP: refused
    m = _train(node, dp=False).content.metric_records["metrics"]
    assert m["dp"] == 0 and m["epsilon"] == float("inf")


@pytest.mark.parametrize("request_, words", [
    (dict(**{"noise-multiplier": 0.05}), "below this site's minimum"),
    (dict(**{"num-rounds": 1000}), "exceeds the site's max-rounds"),
    (dict(**{"server-round": 101}), "exceeds the site's max-rounds"),
])
def test_requests_outside_the_policy_are_declined_before_data_is_read(tmp_path, request_, words):
    node = _admitted_then_gone(_site(tmp_path))
    status = _status(_train(node, **request_))
    assert status["status"] == protocol.POLICY_DECLINED and words in status["reason"]
    assert _entries(node) == 0


def test_too_many_steps_in_a_round_are_refused(tmp_path):
    node = _site(tmp_path, **{"max-steps": 50})
    status = _status(_train(node, **{"batch-size": 1}))
    assert status["status"] == protocol.REQUEST_REJECTED and "max-steps 50" in status["reason"]
    assert _entries(node) == 0


TEN = ",".join(["1.0"] * 9)  # nine sound weights; the tenth is the test's


@pytest.mark.parametrize("weights, words", [
    (f"nan,{TEN}", "class-weights must be finite numbers in (0, 100]"),
    (f"inf,{TEN}", "class-weights must be finite numbers in (0, 100]"),
    (f"-1.0,{TEN}", "class-weights must be finite numbers in (0, 100]"),
    (f"0.0,{TEN}", "class-weights must be finite numbers in (0, 100]"),
    (f"1e300,{TEN}", "class-weights must be finite numbers in (0, 100]"),
    ("1.0,2.0", "class-weights has 2 values, this site declares 10 classes"),
    ("heavy,light", "'class-weights' must be comma-separated numbers"),
    ([1.0] * 10, "'class-weights' must be a string"),
])
def test_hostile_class_weights_are_rejected_before_training(tmp_path, weights, words):
    node = _site(tmp_path)
    reply = _train(node, **{"class-weights": weights})
    status = _status(reply)
    assert status["status"] == protocol.REQUEST_REJECTED and words in status["reason"]
    assert not reply.content.array_records  # no head left the site
    assert _entries(node) == 0


def test_class_weights_from_the_server_leave_the_guarantee_unchanged(tmp_path):
    """Weighted or not, the site runs and charges the same mechanism: the weights
    scale a record's gradient before per-sample clipping, which still bounds it."""
    weights = protocol.encode_class_weights([0.5 + 0.1 * k for k in range(10)])
    plain = _metrics_of(_train(_site(tmp_path, "plain")))
    weighted = _metrics_of(_train(_site(tmp_path, "weighted"), **{"class-weights": weights}))
    for key in ("epsilon", "noise-multiplier", "sample-rate", "steps"):
        assert weighted[key] == plain[key]
    assert 0 < weighted["epsilon"] <= 2.0


# -- 2. No unnoised value computed from the records leaves ------------------
def _metrics_of(reply: Message) -> dict:
    assert _status(reply)["status"] == "ok", _status(reply)
    return dict(reply.content.metric_records["metrics"])


def test_the_training_loss_never_leaves_and_public_values_do_not_depend_on_a_record(tmp_path):
    """The issue's membership attack: batch = N and a tiny learning rate used to make
    the reported loss an exact membership oracle. Now the reply holds the DP head and
    values fixed by N and the request; replacing one record changes none of them."""
    x, y = _digits()
    x2, y2 = x.copy(), y.copy()
    other, _ = _digits(N + 1)
    x2[TARGET], y2[TARGET] = other[N], (y[TARGET] + 1) % 10  # replace-one neighbour
    attack = {"batch-size": 320, "learning-rate": 1e-12}
    a = _metrics_of(_train(_site(tmp_path, "with", x=x, y=y), **attack))
    b = _metrics_of(_train(_site(tmp_path, "without", x=x2, y=y2), **attack))
    assert set(a) == set(protocol.TRAIN_METRICS)  # no timings: the site did not opt in
    assert not {"train-loss", "feature-cache-hit"} & set(a)
    assert not any(k.startswith("holdout") for k in a)
    assert a == b


def test_every_field_a_site_can_send_has_a_privacy_class():
    declared = protocol.released_fields()
    assert set(declared) == {"train", "scaling", "decline", "delivery", "declaration"}
    for reply in declared.values():
        for f in reply:
            assert f["class"] in {"dp", "public", "forbidden"} and f["meaning"]
    with pytest.raises(ValueError, match="no privacy class"):
        protocol.train_metrics({k: 0 for k in protocol.TRAIN_METRICS} | {"new-field": 1})
    with pytest.raises(ValueError, match="may not leave the site"):
        protocol.train_metrics({k: 0 for k in protocol.TRAIN_METRICS} | {"train-loss": 0.1})


# -- 3. The site sizes its holdout; delivery is no oracle --------------------
def test_the_site_sizes_its_own_holdout(tmp_path):
    m = _metrics_of(_train(_site(tmp_path)))  # the run config asks for site-holdout = 0.95
    assert m["num-examples"] == N - round(0.2 * N)
    m = _metrics_of(_train(_site(tmp_path, "own", holdout=0.1)))
    assert m["num-examples"] == N - round(0.1 * N)


def _deliver(node: dict, head: dict) -> Message:
    card = {"run_id": "9", "classes": [str(i) for i in range(10)]}
    msg = Message(content=RecordDict({"head": to_array_record(head),
                                      "card": ConfigRecord({"json": json.dumps(card)})}),
                  message_type="query.deliver", dst_node_id=5)
    ctx = Context(run_id=9, node_id=5, node_config=node, state=RecordDict(),
                  run_config=dict(HOSTILE_RUN, dp=True))
    return client_app.app(msg, ctx)


def test_repeated_delivery_queries_learn_nothing_about_the_holdout(tmp_path):
    """The issue's attack: ~30 deliver queries with crafted heads used to read the
    holdout's label counts from the returned metrics, with no budget check."""
    x, y = _digits()
    y_flip = y.copy()
    y_flip[:40] = (y_flip[:40] + 1) % 10  # another holdout content, same record count
    sites = {"a": _site(tmp_path, "a", x=x, y=y), "b": _site(tmp_path, "b", x=x, y=y_flip)}
    rng = np.random.default_rng(0)
    for _ in range(30):
        head = {"weight": rng.normal(size=(10, 64)).astype(np.float32),
                "bias": rng.normal(size=10).astype(np.float32)}
        replies = {k: _deliver(node, head) for k, node in sites.items()}
        for reply in replies.values():
            assert set(reply.content.config_records) == {"delivery"}
            assert not reply.content.metric_records and not reply.content.array_records
            assert set(reply.content.config_records["delivery"]) == {
                f["field"] for f in protocol.released_fields()["delivery"]}
        a, b = (dict(r.content.config_records["delivery"]) for r in replies.values())
        assert a == b  # identical whatever the holdout holds
    assert all(_entries(node) == 0 for node in sites.values())


# -- 4. One record cannot change how the others are read ---------------------
def test_mean_imputation_is_refused(tmp_path):
    path = tmp_path / "labs.csv"
    path.write_text("bp,chol,label\n120,200,0\n,210,1\n100000,190,0\n130,,1\n")
    with pytest.raises(SiteDataError, match="'mean' is not offered"):
        own_site_data(f"csv:{path}?missing=mean", site_id=0, holdout=0.25, seed=0)
    node = {**_site(tmp_path), "data-path": f"csv:{path}?missing=mean"}
    status = _status(_train(node))
    assert status == {"status": protocol.SITE_UNAVAILABLE, "site-id": 3,
                      "reason": protocol.FIXED_REASONS[protocol.SITE_UNAVAILABLE]}
    assert not Path(node["ledger-path"]).exists()


def test_label_names_map_by_the_declared_classes_not_by_the_names_present(tmp_path):
    rows = "a,b,label\n" + "".join(f"{i},{i % 3},{'pneumonia' if i % 2 else 'normal'}\n"
                                   for i in range(20))
    one_more = rows + "5,5,covid\n"
    (tmp_path / "site.csv").write_text(rows)
    (tmp_path / "plus.csv").write_text(one_more)
    # Without declared names, sorting the names present would let one record re-index
    # every other: a deployed site refuses.
    with pytest.raises(SiteDataError, match="set class-names"):
        own_site_data(f"csv:{tmp_path / 'site.csv'}", site_id=0, holdout=0.2, seed=0)
    classes = ("normal", "pneumonia")
    base = own_site_data(f"csv:{tmp_path / 'site.csv'}", site_id=0, holdout=0.2, seed=0,
                         classes=classes)
    assert set(base.train_y) | set(base.holdout_y) == {0, 1}
    # One record with a label the federation does not have is named, never re-indexed.
    with pytest.raises(SiteDataError, match="unknown label 'covid'"):
        own_site_data(f"csv:{tmp_path / 'plus.csv'}", site_id=0, holdout=0.2, seed=0,
                      classes=classes)


def test_one_image_does_not_change_how_the_others_are_read(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("0", "1"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(
                tmp_path / "imgs" / c / f"{i}.png")
    before = scan_imagefolder(tmp_path / "imgs", size=(8, 8), channels=1)
    # A large RGB image: under "most common size, RGB if any image is" it changed the
    # size or the channels of every other record.
    for k in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / "1" / f"z{k}.png")
    after = scan_imagefolder(tmp_path / "imgs", size=(8, 8), channels=1)
    others = list(range(8))  # files are read in sorted order: the new z*.png come last
    np.testing.assert_array_equal(before.x, after.x[others])
    assert after.x.shape[1:] == (8, 8)


# -- 5. No fallback to the server's settings ---------------------------------
def test_a_node_without_data_path_never_takes_the_servers_settings(tmp_path):
    ledger = tmp_path / "server-chosen"
    status = _status(_train({"partition-id": 0, "num-partitions": 1},
                            run={"out-dir": str(ledger), "target-epsilon": 1000.0}))
    assert status["status"] == protocol.SITE_CONFIG_ERROR and "data-path" in status["reason"]
    assert not ledger.exists()


def test_unknown_node_config_keys_are_named(tmp_path):
    status = _status(_train({**_site(tmp_path), "target-epsilom": 9.0}))
    assert status["status"] == protocol.SITE_CONFIG_ERROR
    assert "target-epsilom" in status["reason"]


def test_a_policy_file_holds_the_site_policy(tmp_path):
    node = _site(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text(f'ledger-path = "{node["ledger-path"]}"\ntarget-epsilon = 1.5\n'
                      f'target-delta = 1e-6\nholdout = 0.25\nclass-names = "{",".join(DIGITS)}"\n'
                      f'image-size = 8\nbackbone = "identity"\n')
    m = _metrics_of(_train({"data-path": node["data-path"], "policy-file": str(policy),
                            "cache-dir": node["cache-dir"]}))
    assert m["delta"] == 1e-6 and m["epsilon"] <= 1.5 and m["num-examples"] == N - 100


def test_the_head_that_leaves_is_the_dp_head(tmp_path):
    """The head in the reply moved from the server's head (it trained) and the
    ledger charged the round before the reply existed."""
    node = _site(tmp_path)
    start = head_state(make_head("linear", in_dim=64, num_classes=10, seed=1))
    reply = _train(node, head=start)
    out = from_array_record(reply.content.array_records["arrays"])
    assert any(not np.array_equal(out[k], start[k]) for k in start)
    entry = Ledger(node["ledger-path"]).entries()[-1]
    assert entry.noise_multiplier >= 0.3 and entry.sampler == "poisson"
    assert reply.content.metric_records["metrics"]["ledger-entries"] == 1


def test_a_missing_policy_file_is_named_without_the_sites_paths(tmp_path):
    missing = tmp_path / "secret-dir" / "policy.toml"
    status = _status(_train({"data-path": "medmnist:/nowhere.npz", "policy-file": str(missing)}))
    assert status["status"] == protocol.SITE_CONFIG_ERROR
    assert "policy-file cannot be read" in status["reason"] and "secret-dir" not in status["reason"]


def test_a_site_that_accepts_only_the_head_declines_backbone_tuning(tmp_path):
    """What leaves the site is the site's call: a site whose policy is
    ``trainable = "head"`` declines a run that would send backbone tensors, before
    any record is read, and charges nothing."""
    node = _admitted_then_gone(_site(tmp_path, trainable="head"))
    status = _status(_train(node, trainable="last-block", backbone="efficientnet-lite0"))
    assert status["status"] == protocol.POLICY_DECLINED
    assert "trainable 'last-block' is not among the modes this site accepts (head)" in \
        status["reason"]
    assert _entries(node) == 0


def test_an_unknown_trainable_mode_in_the_site_policy_is_named(tmp_path):
    node = _site(tmp_path, trainable="head, everything")
    status = _status(_train(node))
    assert "node config 'trainable' must be comma-separated modes of head, bitfit, " \
           "last-block, got 'head, everything'" in status["reason"]
    assert _entries(node) == 0


# -- 6. Every answer is a function of what the site declared (issue 23) -------
def _pair(tmp_path, **policy) -> tuple[dict, dict]:
    """Replace-one neighbours: the same site with and without one record of class 9."""
    x, y = _digits()
    x2, y2 = x.copy(), y.copy()
    nines, others = np.flatnonzero(y == 9), np.flatnonzero(y != 9)
    x2[nines], y2[nines] = x[others[:len(nines)]], y[others[:len(nines)]]  # no 9 at all
    return (_site(tmp_path, "with", x=x, y=y, **policy),
            _site(tmp_path, "without", x=x2, y=y2, **policy))


def _same_answer(a: dict, b: dict, **request) -> dict:
    replies = [_train(node, **request) for node in (a, b)]
    status = [_status(r) for r in replies]
    assert status[0] == status[1], status
    assert [_entries(a), _entries(b)] == [0, 0]
    return status[0]


def test_a_head_of_nine_classes_is_declined_by_declaration_not_by_the_records(tmp_path):
    """On eb87760 the site read its records with the head's class count: a record of
    class 9 answered `site-data-error`, its neighbour `ok`."""
    a, b = _pair(tmp_path)
    nine = head_state(make_head("linear", in_dim=64, num_classes=9))
    status = _same_answer(a, b, head=nine)
    assert status["status"] == protocol.REQUEST_REJECTED
    assert "array 'weight' has shape (9, 64), expected (10, 64)" in status["reason"]


def test_the_coordinator_cannot_choose_how_a_site_reads_its_table(tmp_path):
    """Levels and the missing-value policy are the site's declaration: a request with
    others is declined by comparing declarations, whatever the records hold."""
    from tests import sites

    schema = Schema.from_dict({"classes": ["well", "sick"], "label": "target", "missing": "drop",
                               "scaling": "none", "features": [
                                   {"name": "age"},
                                   {"name": "sex", "kind": "categorical",
                                    "levels": ["female", "male", "other"]}]})
    rng = np.random.default_rng(0)
    nodes = []
    for name, last in (("with", "other"), ("without", "female")):
        root = tmp_path / name
        root.mkdir()
        rows = [f"{rng.uniform(20, 80):.0f},{'female' if i % 2 else 'male'},"
                f"{'sick' if i % 3 else 'well'}" for i in range(39)]
        rows.append(f",{last},sick")  # one record: a missing age, and the only 'other'
        (root / "t.csv").write_text("age,sex,target\n" + "\n".join(rows) + "\n")
        (root / "schema.json").write_text(schema.to_json())
        nodes.append({**_site(tmp_path, name), "data-path": f"csv:{root / 't.csv'}",
                      "schema": str(root / "schema.json"), "class-names": "well,sick"})
    declared = sites.request(nodes[0]).schema
    head = head_state(make_head("linear", in_dim=4, num_classes=2))
    for change in ({"missing": "error"}, {"missing": "zero"},
                   {"features": [{"name": "age"}, {"name": "sex", "kind": "categorical",
                                                   "levels": ["female", "male", "x"]}]}):
        hostile = Schema.from_dict({**json.loads(declared), **change, "scaling": "none"})
        status = _same_answer(*nodes, head=head, schema=hostile.to_json())
        assert status["status"] == protocol.POLICY_DECLINED
        assert "differs from this site's declared" in status["reason"] or \
            "differ from this site's declaration" in status["reason"]
    # The count each site releases is the one fixed when its data was checked: 39
    # usable rows at the site that dropped its incomplete record, and the same at the other.
    ok = [_metrics_of(_train(n, head=head, schema=declared, **{"batch-size": 8}))
          for n in nodes]
    assert ok[0]["num-examples"] == ok[1]["num-examples"] == 31


def test_an_oversized_batch_is_answered_from_the_public_count_however_often_asked(tmp_path):
    """On eb87760 `batch-size=100000` plus a crafted head read the records first:
    `site-data-error` against `request-rejected`, free and repeatable. Now the head is
    declined by its declared shape, identically, and the batch is planned from the
    public count (common/batches.py): both neighbours train at the same batch."""
    a, b = _pair(tmp_path)
    nine = head_state(make_head("linear", in_dim=64, num_classes=9))
    for _ in range(5):
        status = _same_answer(a, b, head=nine, **{"batch-size": 100000})
        assert status["status"] == protocol.REQUEST_REJECTED
    ok = [_metrics_of(_train(node, **{"batch-size": 100000})) for node in (a, b)]
    assert ok[0] == ok[1] and ok[0]["sample-rate"] == pytest.approx(1 / 4)  # 320 // 4 = 80


def test_no_timing_leaves_a_site_unless_its_policy_releases_it(tmp_path):
    """On eb87760 `feature-seconds` read 17-27 s on a cache miss and 0.0 on a hit."""
    node = _site(tmp_path)
    for r in (1, 2):
        m = _metrics_of(_train(node, **{"server-round": r}))
        assert not set(protocol.TIMING_KEYS) & set(m)
    opted = _site(tmp_path, "opted", **{"release-timings": True})
    m = _metrics_of(_train(opted))
    assert set(protocol.TIMING_KEYS) <= set(m)


def test_a_backbone_path_in_the_request_is_never_opened(tmp_path):
    """On eb87760 `backbone=file:<path>` made the site open the path, and Flower
    forwarded the error text: whether the file existed, and what kind it was."""
    node = _admitted_then_gone(_site(tmp_path))
    secret = tmp_path / "secret.pt"
    secret.write_bytes(b"not a model")
    replies = []
    for path in (secret, tmp_path / "absent.pt", tmp_path):
        status = _status(_train(node, backbone=f"file:{path}"))
        assert status["status"] == protocol.POLICY_DECLINED
        replies.append(status["reason"].replace(str(path), "<path>"))
    assert len(set(replies)) == 1
    assert "is not this site's declared backbone 'identity'" in replies[0]


def test_an_unexpected_failure_is_a_fixed_code_and_its_text_stays_at_the_site(tmp_path,
                                                                              monkeypatch):
    import client.round as round_

    def boom(*a, **k):
        raise RuntimeError(f"secret detail {tmp_path}")

    node = _site(tmp_path)
    real = round_.training.train_dp
    monkeypatch.setattr(round_.training, "train_dp", boom)
    status = _status(_train(node))
    assert status == {"status": protocol.SITE_UNAVAILABLE, "site-id": 3,
                      "reason": protocol.FIXED_REASONS[protocol.SITE_UNAVAILABLE]}
    # A fault while the records were in use takes the site out until its operator acts:
    # the same fixed answer to every request, and nothing more is charged.
    monkeypatch.setattr(round_.training, "train_dp", real)
    assert _status(_train(node, **{"batch-size": 8})) == status
