"""Delivered bundles: hashes (files and card), TorchScript/ONNX parity of the
student and the head, and ``predict`` on images, .npz and CSV, including the
bad-input cases (refused by name, or skipped row by row) and the card's
decision rule."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from cli.main import main as cli_main
from common.models import students
from common.models.heads import head_state, make_head
from common.models.modelio import (
    bundle_sha256,
    card_sha256,
    check_bundle,
    export_torchscript,
    file_sha256,
    load_student,
    save_bundle,
    verify_bundle,
)
from common.models.predict import (
    load_predictor,
    predict_file,
    read_inputs,
    records_from_csv,
)
from tests.conftest import REPO

CLASSES = ["a", "b", "c"]


def _bundle(path, *, name="cnn", shape=(1, 8, 8), classes=CLASSES):
    spec = students.StudentSpec(name, shape, 3, width=8, depth=2)
    student = students.make_student(spec, seed=1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    head = make_head("linear", in_dim=64, num_classes=3, seed=2)
    card = {"run_id": "r1", "round": 3, "classes": classes,
            "head": {"name": "linear", "backbone": "identity", "image_size": 0, "in_dim": 64,
                     "num_classes": 3, "hidden_dim": 128},
            "student": {"architecture": spec.architecture, "spec": spec.to_dict()}}
    state = {k: v.numpy().copy() for k, v in student.state_dict().items()}
    return save_bundle(path, card=card, head=head_state(head), student=state), student, head


def _probs_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_bundle_hashes_match_and_tampering_is_caught(tmp_path):
    card_path, _, _ = _bundle(tmp_path / "m")
    card = json.loads(card_path.read_text())
    assert card["files"]["student.safetensors"] == file_sha256(tmp_path / "m" / "student.safetensors")
    assert card["card_sha256"] == card_sha256(card)
    assert card["sha256"] == bundle_sha256(card["files"], card["card_sha256"])
    assert verify_bundle(tmp_path / "m") == []
    with (tmp_path / "m" / "head.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    assert verify_bundle(card_path) == ["head.safetensors: sha256 does not match the card"]
    with pytest.raises(ValueError, match="failed its integrity check"):
        load_predictor(card_path, which="head")


def test_same_weights_give_the_same_hash_in_another_process(tmp_path):
    # safetensors writes several metadata keys in hash-map order; the bundle must not.
    code = ("import sys; sys.path.insert(0, {repo!r}); from tests.common.test_predict import _bundle;"
            "import json; from pathlib import Path; p, _, _ = _bundle(Path(sys.argv[1]));"
            "print(json.loads(p.read_text())['sha256'])").format(repo=str(REPO))
    digests = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"m{i}")], check=True,
                              capture_output=True, text=True, cwd=REPO).stdout.strip()
               for i in range(2)}
    assert len(digests) == 1 and len(digests.pop()) == 64


def test_torchscript_export_matches_pytorch(tmp_path):
    card_path, student, _ = _bundle(tmp_path / "m")
    out = export_torchscript(card_path, tmp_path / "student.pt")
    scripted = torch.jit.load(str(out))
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = student.eval()(x)
        loaded, _, _ = load_student(card_path)
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--out",
                     str(tmp_path / "cli.pt")]) == 0
    assert torch.allclose(torch.jit.load(str(tmp_path / "cli.pt"))(x), expected, atol=1e-5)


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime as ort

    card_path, student, _ = _bundle(tmp_path / "m")
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", "onnx", "--out",
                     str(tmp_path / "student.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "student.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.rand(7, 1, 8, 8)  # a batch size the export never saw: the batch axis is dynamic
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        expected = student.eval()(x).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_predict_on_a_folder_of_pngs(tmp_path):
    _, student, _ = _bundle(tmp_path / "m")
    rng = np.random.default_rng(0)
    imgs = (rng.random((4, 8, 8)) * 255).astype(np.uint8)
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(imgs):
        Image.fromarray(img, mode="L").save(folder / ("sub" if i == 3 else ".") / f"x{i}.png")
    assert cli_main(["predict", "--model", str(tmp_path / "m" / "card.json"), "--input",
                     str(folder), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 0
    header, rows = _probs_csv(tmp_path / "p.csv")
    assert header == ["input", "predicted", "prob_a", "prob_b", "prob_c"]
    assert [r[0] for r in rows] == ["sub/x3.png", "x0.png", "x1.png", "x2.png"]
    with torch.no_grad():
        expected = torch.softmax(student.eval()(torch.from_numpy(imgs / 255.0).float()[:, None]
                                                ).double(), 1).numpy()
    got = np.array([[float(v) for v in r[2:]] for r in rows])
    assert np.allclose(got, expected[[3, 0, 1, 2]], atol=1e-5)
    assert [r[1] for r in rows] == [CLASSES[int(i)] for i in expected[[3, 0, 1, 2]].argmax(1)]


def test_predict_on_npz_and_csv_agree(tmp_path):
    _bundle(tmp_path / "m")
    x = np.random.default_rng(1).random((5, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", images=x, labels=np.arange(5))  # labels are never read
    with open(tmp_path / "x.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *[f"px{i}" for i in range(64)]])
        for i, row in enumerate(x.reshape(5, -1)):
            w.writerow([f"r{i}", *[repr(float(v)) for v in row]])
    a = predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "a.csv", progress=False)
    b = predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "b.csv", progress=False)
    assert a["records"] == b["records"] == 5
    (_, ra), (_, rb) = _probs_csv(tmp_path / "a.csv"), _probs_csv(tmp_path / "b.csv")
    assert [r[0] for r in rb] == [f"r{i}" for i in range(5)]
    assert [r[1:] for r in ra] == [r[1:] for r in rb]


def test_predict_with_the_head_and_an_mlp_student_on_csv(tmp_path):
    _, _, head = _bundle(tmp_path / "m", name="mlp", shape=(64,))
    x = np.random.default_rng(2).random((3, 64)).astype(np.float32)
    np.savetxt(tmp_path / "t.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(64)),
               comments="")
    probs = load_predictor(tmp_path / "m", which="head").predict_proba(read_inputs(tmp_path / "t.csv").records)
    with torch.no_grad():
        assert np.allclose(probs, torch.softmax(head(torch.from_numpy(x)).double(), 1).numpy())
    assert load_predictor(tmp_path / "m").predict_proba(x).shape == (3, 3)


@pytest.mark.parametrize("make, words", [
    (lambda d: np.savez(d / "bad.npz", images=np.zeros((2, 9, 9), np.float32)),
     "expects 8x8 images, got 9x9"),
    (lambda d: np.savez(d / "bad.npz", images=np.zeros((2, 8, 8, 3), np.float32)),
     "expects 1-channel images, got 3 channels"),
    (lambda d: np.savez(d / "bad.npz", a=np.zeros((2, 8, 8)), b=np.zeros(2)),
     "cannot tell which array holds the inputs"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,0.2\n"),
     "64 pixel columns per row, got 2"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,\n0.2,0.3\n"),
     "file bad.csv, row 2, column 'f2': missing value"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,x\n"),
     "file bad.csv, row 2, column 'f2': 'x' is not a number"),
    (lambda d: (d / "bad.csv").write_text("f1,f2\n0.1,\n"),
     "file bad.csv, row 2, column 'f2': missing value"),
    (lambda d: (d / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\njunk"), "file odd.png: "),
    (lambda d: (d / "notes.txt").write_text("hi"), "no images"),
    (lambda d: (d / "bad.json").write_text("{}"), "unsupported input"),
])
def test_predict_rejects_bad_inputs_clearly(tmp_path, make, words):
    _bundle(tmp_path / "m")
    inputs = tmp_path / "in"
    inputs.mkdir()
    make(inputs)
    files = list(inputs.iterdir())
    target = inputs if files[0].suffix in (".png", ".txt") else files[0]
    with pytest.raises(ValueError) as err:
        predict_file(tmp_path / "m", target, tmp_path / "p.csv", progress=False)
    assert words in str(err.value)
    assert not (tmp_path / "p.csv").exists()


def test_predict_rejects_a_class_count_mismatch(tmp_path):
    _bundle(tmp_path / "m", classes=["a", "b"])  # the weights output 3 classes
    with pytest.raises(ValueError, match="class-count mismatch: the student outputs 3 classes but "
                                         "its card lists 2"):
        load_predictor(tmp_path / "m")
    with pytest.raises(ValueError, match="class-count mismatch: the head outputs 3"):
        load_predictor(tmp_path / "m", which="head")


def test_predict_cli_reports_errors_with_exit_status_2(tmp_path, capsys):
    _bundle(tmp_path / "m")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 9, 9), np.float32))
    rc = cli_main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "bad.npz"),
                   "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and "expects 8x8 images" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(tmp_path / "nowhere"), "--input",
                     str(tmp_path / "bad.npz"), "--out", str(tmp_path / "p.csv")]) == 2
    assert "model card not found" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Unreadable inputs: named all at once, or skipped row by row
# --------------------------------------------------------------------------


def _image_folder(folder, n=3):
    """``n`` readable 8x8 grayscale PNGs, a corrupt one and a truncated one (in a sub-folder)."""
    rng = np.random.default_rng(3)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(
            folder / f"ok{i}.png")
    (folder / "corrupt.png").write_bytes(b"this is not a png at all")
    png = io.BytesIO()
    Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(png, format="PNG")
    (folder / "sub" / "cut.png").write_bytes(png.getvalue()[:-30])  # loses its image data
    return folder


def test_predict_names_every_unreadable_image_and_writes_nothing(tmp_path, capsys):
    _bundle(tmp_path / "m")
    folder = _image_folder(tmp_path / "imgs")
    with pytest.raises(ValueError) as err:
        predict_file(tmp_path / "m", folder, tmp_path / "p.csv", progress=False)
    msg = str(err.value)
    assert "2 of 5 inputs cannot be read" in msg
    assert "corrupt.png: not an image Pillow can read" in msg
    assert "sub/cut.png: cannot be decoded" in msg and "--skip-bad" in msg
    assert not (tmp_path / "p.csv").exists()
    rc = cli_main(["predict", "--model", str(tmp_path / "m"), "--input", str(folder), "--out",
                   str(tmp_path / "p.csv"), "--no-progress"])
    err_text = capsys.readouterr().err
    assert rc == 2 and "corrupt.png" in err_text and "sub/cut.png" in err_text
    assert not (tmp_path / "p.csv").exists()


def test_predict_skip_bad_writes_every_readable_image_and_a_row_per_bad_one(tmp_path, capsys):
    _bundle(tmp_path / "m")
    folder = _image_folder(tmp_path / "imgs")
    report = predict_file(tmp_path / "m", folder, tmp_path / "p.csv", progress=False,
                          skip_bad=True)
    assert (report["rows"], report["records"], report["skipped"]) == (5, 3, 2)
    header, rows = _probs_csv(tmp_path / "p.csv")
    assert header == ["input", "predicted", "prob_a", "prob_b", "prob_c", "status"]
    by_id = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == ["corrupt.png", "ok0.png", "ok1.png", "ok2.png", "sub/cut.png"]
    for bad in ("corrupt.png", "sub/cut.png"):
        assert by_id[bad][1:5] == ["", "", "", ""]
        assert by_id[bad][5].startswith("unreadable: ")
    # The readable rows are exactly what a clean folder gives.
    for bad in ("corrupt.png", "sub/cut.png"):
        (folder / bad).unlink()
    predict_file(tmp_path / "m", folder, tmp_path / "clean.csv", progress=False)
    _, clean = _probs_csv(tmp_path / "clean.csv")
    assert [[*r, "ok"] for r in clean] == [by_id[r[0]] for r in clean]
    # The CLI says how many rows were written and skipped.
    _image_folder(tmp_path / "imgs2")
    assert cli_main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "imgs2"),
                     "--out", str(tmp_path / "q.csv"), "--skip-bad", "--no-progress"]) == 0
    assert "5 rows written: 3 predicted, 2 skipped as unreadable" in capsys.readouterr().out


def _tabular_bundle(path, *, name="mlp", decision=None, bias=None):
    """A tabular run's bundle: identity backbone, 4 features, 2 classes, no student."""
    head = make_head(name, in_dim=4, num_classes=2, hidden_dim=8, seed=3)
    if bias is not None:  # constant probabilities softmax(bias) whatever the features
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor(bias))
    card = {"run_id": "t1", "round": 2, "dataset": "csv:site.csv", "classes": ["neg", "pos"],
            "head": {"name": name, "backbone": "identity", "image_size": 0, "in_dim": 4,
                     "num_classes": 2, "hidden_dim": 8}}
    if decision is not None:
        card["decision"] = decision
    save_bundle(path, card=card, head=head_state(head))
    return head.eval()


BAD_CSV = ("id,f1,f2,f3,f4,label\n"
           "p1,0.1,0.2,0.3,0.4,1\n"
           "p2,,0.2,0.3,0.4,0\n"
           "\n"
           "p3,0.5,abc,0.1,NA,1\n"
           "p4,0.9,0.8,0.7\n"
           "p5,1.0,2.0,3.0,4.0,0\n")


def test_csv_rows_that_cannot_be_read_are_named_by_line(tmp_path):
    _tabular_bundle(tmp_path / "m")
    (tmp_path / "x.csv").write_text(BAD_CSV)
    with pytest.raises(ValueError) as err:
        predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "p.csv", progress=False)
    msg = str(err.value)
    assert "3 of 5 inputs cannot be read" in msg
    assert "file x.csv, row 3, column 'f1': missing value" in msg
    assert "file x.csv, row 5, column 'f2': 'abc' is not a number; file x.csv, row 5, column " \
           "'f4': missing value" in msg
    assert "file x.csv, row 6: 4 fields, the header has 6" in msg
    assert not (tmp_path / "p.csv").exists()
    ids, x, statuses = records_from_csv(tmp_path / "x.csv", card=None)
    assert ids == ["p1", "p2", "p3", "p4", "p5"]
    assert statuses[0] == statuses[4] == "ok" and statuses[1].startswith(
        "unreadable: file x.csv, row 3")
    np.testing.assert_array_equal(x, np.float32([[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]]))


def test_csv_skip_bad_predicts_the_good_rows_only(tmp_path, capsys):
    head = _tabular_bundle(tmp_path / "m")
    (tmp_path / "x.csv").write_text(BAD_CSV)
    assert cli_main(["predict", "--model", str(tmp_path / "m"), "--input", str(tmp_path / "x.csv"),
                     "--out", str(tmp_path / "p.csv"), "--skip-bad", "--no-progress"]) == 0
    assert "5 rows written: 2 predicted, 3 skipped as unreadable" in capsys.readouterr().out
    header, rows = _probs_csv(tmp_path / "p.csv")
    assert header == ["input", "predicted", "prob_neg", "prob_pos", "status"]
    missing = "missing value (schema missing = 'error'; allowed: drop, zero)"
    assert [r[-1] for r in rows] == [
        "ok", f"unreadable: file x.csv, row 3, column 'f1': {missing}",
        (f"unreadable: file x.csv, row 5, column 'f2': 'abc' is not a number; file x.csv, row 5, "
         f"column 'f4': {missing}"),
        "unreadable: file x.csv, row 6: 4 fields, the header has 6", "ok"]
    assert b"\r\n" not in (tmp_path / "p.csv").read_bytes()  # "\n" line ends, never CRLF
    assert all(r[1:4] == ["", "", ""] for r in rows[1:4])
    with torch.no_grad():
        expected = torch.softmax(head(torch.tensor([[0.1, 0.2, 0.3, 0.4], [1., 2., 3., 4.]])
                                      ).double(), 1).numpy()
    got = np.array([[float(v) for v in r[2:4]] for r in (rows[0], rows[4])])
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_npz_records_with_nan_are_named_or_skipped(tmp_path):
    _bundle(tmp_path / "m")
    x = np.random.default_rng(4).random((3, 8, 8)).astype(np.float32)
    x[1, 2, 2] = np.nan
    np.savez(tmp_path / "x.npz", images=x)
    with pytest.raises(ValueError, match="record 1: contains NaN or Inf"):
        predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "p.csv", progress=False)
    predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "p.csv", progress=False,
                 skip_bad=True)
    _, rows = _probs_csv(tmp_path / "p.csv")
    assert [r[-1] for r in rows] == ["ok", "unreadable: contains NaN or Inf", "ok"]


# --------------------------------------------------------------------------
# The card is covered by the bundle's hashes
# --------------------------------------------------------------------------


def _edit_card(card_path, **changes):
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card, indent=2))


def test_an_edited_class_list_is_refused_never_a_flipped_label(tmp_path, capsys):
    card_path, _, _ = _bundle(tmp_path / "m")
    np.savez(tmp_path / "x.npz", images=np.random.default_rng(5).random((4, 8, 8)))
    _edit_card(card_path, classes=["c", "b", "a"])
    assert verify_bundle(card_path) == [("card.json: content does not match its hash "
                                         "(card_sha256): the card was edited after it was saved")]
    for which in ("student", "head"):
        with pytest.raises(ValueError, match="card.json: content does not match its hash"):
            predict_file(tmp_path / "m", tmp_path / "x.npz", tmp_path / "p.csv", which=which,
                         progress=False)
    assert not (tmp_path / "p.csv").exists()
    for fmt in ("torchscript", "onnx"):
        assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", fmt, "--out",
                         str(tmp_path / "model.out")]) == 2
        assert "card.json: content does not match its hash" in capsys.readouterr().err
    assert not (tmp_path / "model.out").exists()


def test_a_card_without_its_hash_is_refused_as_predating_card_hashing(tmp_path):
    card_path, _, _ = _bundle(tmp_path / "m")
    card = json.loads(card_path.read_text())
    del card["card_sha256"]  # what a version-1 card looks like: hashes over the files only
    card.update(card_version=1, sha256=bundle_sha256(card["files"]))
    card_path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="predates card hashing"):
        check_bundle(tmp_path / "m")


def test_the_site_block_keeps_the_delivered_hash_and_is_covered_on_its_own(tmp_path):
    server_card, _, _ = _bundle(tmp_path / "server")
    card = json.loads(server_card.read_text())
    arrays = {name: load_file(str(tmp_path / "server" / f"{name}.safetensors"))
              for name in ("head", "student")}
    site_card = save_bundle(tmp_path / "site", card={**card, "site": {"site_id": 0,
                                                                       "epsilon_own_ledger": 0.8}},
                            **arrays)
    site = json.loads(site_card.read_text())
    assert site["sha256"] == card["sha256"]  # what the site sends back is what the server sent
    assert verify_bundle(site_card) == []
    _edit_card(site_card, site={"site_id": 0, "epsilon_own_ledger": 0.1})
    assert verify_bundle(site_card) == ["card.json: its 'site' block does not match site_sha256"]


# --------------------------------------------------------------------------
# The card's decision rule
# --------------------------------------------------------------------------


THRESHOLD = {"rule": "threshold", "positive_class": 1, "threshold": 0.25,
             "chosen_on": "public validation split"}


def test_predict_applies_the_cards_threshold_rule(tmp_path, capsys):
    bias = [math.log(0.7), math.log(0.3)]  # p(pos) = 0.3 for every record
    (tmp_path / "x.csv").write_text("f1,f2,f3,f4\n0.1,0.2,0.3,0.4\n1,2,3,4\n")
    _tabular_bundle(tmp_path / "argmax", name="linear", bias=bias)
    _tabular_bundle(tmp_path / "rule", name="linear", bias=bias, decision=THRESHOLD)
    for model, expected in (("argmax", "neg"), ("rule", "pos")):
        assert cli_main(["predict", "--model", str(tmp_path / model), "--input",
                         str(tmp_path / "x.csv"), "--out", str(tmp_path / f"{model}.csv")]) == 0
        _, rows = _probs_csv(tmp_path / f"{model}.csv")
        assert [r[1] for r in rows] == [expected, expected]
        assert [r[2:] for r in rows] == [["0.700000", "0.300000"]] * 2
    out = capsys.readouterr().out
    assert "decision: argmax (the card has no decision rule)" in out
    assert ("decision: threshold: pos when p(pos) >= 0.25, else neg (chosen on public validation "
            "split)") in out


def test_an_invalid_decision_rule_is_refused_before_anything_runs(tmp_path):
    _tabular_bundle(tmp_path / "m", decision={"rule": "threshold", "threshold": 2.0})
    (tmp_path / "x.csv").write_text("f1,f2,f3,f4\n0.1,0.2,0.3,0.4\n")
    with pytest.raises(ValueError, match=r"decision threshold must be a number in \[0, 1\]"):
        predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists()


# --------------------------------------------------------------------------
# Tabular bundles: the head is the model (predict and export)
# --------------------------------------------------------------------------


def test_a_bundle_without_a_student_predicts_with_its_head_by_default(tmp_path):
    head = _tabular_bundle(tmp_path / "m")
    x = np.random.default_rng(6).random((5, 4)).astype(np.float32)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b,c,d", comments="")
    report = predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "p.csv", progress=False)
    assert report["which"] == "head" and report["model"] == "identity + mlp head"
    _, rows = _probs_csv(tmp_path / "p.csv")
    with torch.no_grad():
        expected = torch.softmax(head(torch.from_numpy(x)).double(), 1).numpy()
    np.testing.assert_allclose([[float(v) for v in r[2:]] for r in rows], expected, atol=1e-6)
    with pytest.raises(ValueError, match="this bundle has no student"):
        load_predictor(tmp_path / "m", which="student")  # asked for by name: still an error


def _predicted_probs(path):
    _, rows = _probs_csv(path)
    return np.array([[float(v) for v in r[2:]] for r in rows])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_exported_head_gives_the_probabilities_predict_writes(tmp_path, capsys, fmt):
    _tabular_bundle(tmp_path / "m")
    x = np.random.default_rng(7).random((6, 4)).astype(np.float32)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header="a,b,c,d", comments="")
    predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "p.csv", which="head",
                 progress=False)
    out = tmp_path / f"head.{fmt}"
    # No --which: a bundle without a student exports its head.
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", fmt, "--out",
                     str(out)]) == 0
    assert "input 'features': float32 (N, 4), the records' feature columns, already scaled" in (
        capsys.readouterr().out)
    if fmt == "torchscript":
        with torch.no_grad():
            logits = torch.jit.load(str(out))(torch.from_numpy(x)).numpy()
    else:
        ort = pytest.importorskip("onnxruntime",
                                  reason="onnxruntime is not installed: the ONNX file was written "
                                         "but cannot be run here")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"features": x})
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    np.testing.assert_allclose(probs, _predicted_probs(tmp_path / "p.csv"), atol=1e-6)


def test_an_image_bundles_head_exports_alone_and_takes_backbone_features(tmp_path, capsys):
    _, _, head = _bundle(tmp_path / "m")  # identity backbone over 8x8 images: 64 features
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--which", "head", "--out",
                     str(tmp_path / "head.pt")]) == 0
    assert "input 'features': float32 (N, 64)" in capsys.readouterr().out
    feats = torch.rand(5, 64)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(tmp_path / "head.pt"))(feats).numpy(),
                                   head(feats).numpy(), atol=1e-6)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_tabular_head_takes_raw_columns_with_the_scaling_inside(tmp_path, capsys,
                                                                             fmt):
    """issue 24: the exported model takes the raw columns predict reads (the schema's
    clip, centre and scale inside the graph; a missing value is the feature's centre)."""
    schema = {"classes": ["neg", "pos"], "input": "tabular", "label": "label", "missing": "zero",
              "features": [{"name": "age", "scaling": "declared", "center": 50.0, "scale": 10.0,
                            "lower": 20.0, "upper": 90.0},
                           {"name": "bp", "scaling": "declared", "center": 120.0, "scale": 15.0},
                           {"name": "sex", "kind": "categorical", "levels": ["f", "m"]}]}
    head = make_head("linear", in_dim=4, num_classes=2, seed=3)
    card = {"run_id": "t1", "round": 2, "classes": ["neg", "pos"], "schema": schema,
            "head": {"name": "linear", "backbone": "identity", "image_size": 0, "in_dim": 4,
                     "num_classes": 2, "hidden_dim": 8}}
    save_bundle(tmp_path / "m", card=card, head=head_state(head))
    (tmp_path / "x.csv").write_text("age,bp,sex\n51,130,m\n95,118,f\n40,,f\n10,140,m\n")
    predict_file(tmp_path / "m", tmp_path / "x.csv", tmp_path / "p.csv", progress=False)
    out = tmp_path / f"head.{fmt}"
    assert cli_main(["export", "--model", str(tmp_path / "m"), "--format", fmt, "--out",
                     str(out)]) == 0
    text = capsys.readouterr().out
    assert "input 'records': float32 (N, 4), the raw columns as recorded" in text
    assert '["age", "bp", "sex=f", "sex=m"]' in text and "do not scale them" in text
    raw = np.float32([[51, 130, 0, 1], [95, 118, 1, 0], [40, np.nan, 1, 0], [10, 140, 0, 1]])
    if fmt == "torchscript":
        with torch.no_grad():
            logits = torch.jit.load(str(out))(torch.from_numpy(raw)).numpy()
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"records": raw})
    probs = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    np.testing.assert_allclose(probs, _predicted_probs(tmp_path / "p.csv"), atol=1e-5)
