"""Delivered models on disk: the aggregated head, the distilled student and
their JSON card, plus TorchScript and ONNX export of either.

A bundle is a folder::

    head.safetensors      the final global head (numpy arrays)
    student.safetensors   the student's state dict (optional)
    card.json             run id, round, architectures, parameter counts,
                          teacher/student metrics, ε/δ and unit of privacy,
                          and the hashes below

Hashes: ``files`` (a sha256 per weights file), ``card_sha256`` (the card's
own content: canonical JSON of every field except the hashes and the
receiving site's ``site`` block), ``sha256`` (one over the file hashes and
``card_sha256``: what the server delivered, the same at every site) and, once
a site has added its ``site`` block, ``site_sha256`` over that block. So an
edited class list, decision rule or ε is caught like an edited weights file.

The card is written last (atomically), so a card on disk means the files it
hashes are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from torch import nn

from common.data.schema import Schema
from common.digest import file_sha256
from common.models.finetune import image_model, is_tuned, load_model_state, make_model
from common.models.students import StudentSpec, make_student

CARD_NAME = "card.json"
HEAD_FILE = "head.safetensors"
STUDENT_FILE = "student.safetensors"
MODELS = ("student", "head")
# 2: the card's own content is hashed (card_sha256); version 1 hashed the weights files only.
CARD_VERSION = 2
HASH_FIELDS = ("files", "sha256", "card_sha256", "site_sha256")
# Added by the receiving site (its id and its own ε); hashed on its own so that
# the bundle hash a site sends back equals the one the server delivered.
SITE_FIELD = "site"


def bundle_sha256(files: dict[str, str], card_digest: str | None = None) -> str:
    """One hash over the per-file hashes and the card's (``card_sha256``), in name order."""
    entries = {**files, CARD_NAME: card_digest} if card_digest is not None else files
    text = "\n".join(f"{name}:{digest}" for name, digest in sorted(entries.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical_sha256(value) -> str:
    # Through JSON and back first, so a card hashes the same before it is written
    # (numpy scalars, tuples, int keys) as when it is read back.
    plain = json.loads(json.dumps(value, default=_json_default))
    return hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def card_sha256(card: dict) -> str:
    """sha256 of a card's delivered content: canonical JSON (sorted keys) of every
    field except the hashes (:data:`HASH_FIELDS`) and the site's own ``site`` block."""
    return _canonical_sha256({k: v for k, v in card.items()
                              if k not in HASH_FIELDS and k != SITE_FIELD})


def _write_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    # One metadata key only: safetensors writes several in hash-map order, which
    # differs between processes and would make the same weights hash differently.
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp),
               metadata={"fedtransfer": json.dumps(metadata, sort_keys=True)})
    os.replace(tmp, path)


def save_bundle(model_dir: str | Path, *, card: dict, head: dict[str, np.ndarray],
                student: dict[str, np.ndarray] | None = None) -> Path:
    """Write head, student and card under ``model_dir``; returns the card path.

    ``card`` is the descriptive part (any hash fields in it are replaced); this
    adds ``card_version`` and the hashes (see the module docstring).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    run_id = str(card.get("run_id", ""))
    _write_arrays(model_dir / HEAD_FILE, head, {"run_id": run_id, "kind": "head"})
    files = {HEAD_FILE: file_sha256(model_dir / HEAD_FILE)}
    if student is not None:
        spec = card.get("student", {}).get("spec")
        if spec is None:
            raise ValueError("a student needs card['student']['spec'] (its architecture)")
        _write_arrays(model_dir / STUDENT_FILE, student,
                      {"run_id": run_id, "kind": "student", "spec": spec})
        files[STUDENT_FILE] = file_sha256(model_dir / STUDENT_FILE)
    elif (model_dir / STUDENT_FILE).exists():
        (model_dir / STUDENT_FILE).unlink()  # a stale student must not sit next to a new card
    full = {**{k: v for k, v in card.items() if k not in HASH_FIELDS}, "card_version": CARD_VERSION}
    own = card_sha256(full)
    full.update(files=files, card_sha256=own, sha256=bundle_sha256(files, own))
    if SITE_FIELD in full:
        full["site_sha256"] = _canonical_sha256(full[SITE_FIELD])
    tmp = model_dir / (CARD_NAME + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=_json_default))
    os.replace(tmp, model_dir / CARD_NAME)
    return model_dir / CARD_NAME


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def card_path(path: str | Path) -> Path:
    """``card.json`` itself, or the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"model card not found: {path} (give a card.json or the folder "
                                "that holds one)")
    return path


def read_card(path: str | Path) -> dict:
    path = card_path(path)
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON model card ({exc})") from exc
    if not isinstance(card, dict) or "files" not in card:
        raise ValueError(f"{path}: not a fedtransfer model card (no 'files' entry)")
    return card


def verify_bundle(path: str | Path) -> list[str]:
    """Problems with a bundle's integrity (empty list: every hash matches)."""
    path = card_path(path)
    card = read_card(path)
    problems = []
    files = card.get("files") or {}
    for name, digest in files.items():
        f = path.parent / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif file_sha256(f) != digest:
            problems.append(f"{name}: sha256 does not match the card")
    problems += _card_problems(card)
    if "card_sha256" in card and card.get("sha256") != bundle_sha256(files, card["card_sha256"]):
        problems.append(f"{CARD_NAME}: sha256 does not match its file and card hashes")
    return problems


def _card_problems(card: dict) -> list[str]:
    """The card's own content against ``card_sha256`` (and its ``site`` block
    against ``site_sha256``)."""
    if "card_sha256" not in card:
        return [(f"{CARD_NAME}: no card hash: the bundle predates card hashing (card_version "
                 f"{card.get('card_version', 1)}), so an edited class list could not be "
                 f"detected; re-deliver it from a run that writes card_version {CARD_VERSION}")]
    problems = []
    if card["card_sha256"] != card_sha256(card):
        problems.append(f"{CARD_NAME}: content does not match its hash (card_sha256): the card "
                        "was edited after it was saved")
    has_site, site_digest = SITE_FIELD in card, card.get("site_sha256")
    if has_site != (site_digest is not None) or (
            has_site and site_digest != _canonical_sha256(card[SITE_FIELD])):
        problems.append(f"{CARD_NAME}: its '{SITE_FIELD}' block does not match site_sha256")
    return problems


def check_bundle(path: str | Path) -> dict:
    """The card, after checking every hash; ``ValueError`` on any mismatch."""
    problems = verify_bundle(path)
    if problems:
        raise ValueError(f"model bundle {card_path(path).parent} failed its integrity check: "
                         + "; ".join(problems))
    return read_card(path)


def load_student(path: str | Path) -> tuple[nn.Module, StudentSpec, dict]:
    """The student of a bundle (hash-checked), in eval mode, with its card."""
    card = check_bundle(path)
    if STUDENT_FILE not in card["files"]:
        raise ValueError(f"{card_path(path)}: this bundle has no student (distillation was off "
                         "or failed); use the head instead")
    spec = StudentSpec.from_dict(card["student"]["spec"])
    student = make_student(spec)
    state = load_numpy(str(card_path(path).parent / STUDENT_FILE))
    own = student.state_dict()
    # Scalars (BatchNorm's num_batches_tracked) may come back shaped (1,): compare sizes there.
    if set(state) != set(own) or any(
            tuple(state[k].shape) != tuple(own[k].shape)
            and not (own[k].ndim == 0 and state[k].size == 1) for k in own):
        raise ValueError(f"{card_path(path)}: student weights do not fit architecture "
                         f"{spec.architecture}")
    student.load_state_dict(OrderedDict(
        (k, torch.from_numpy(np.array(v)).reshape(own[k].shape)) for k, v in state.items()))
    return student.eval(), spec, card


def load_head_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    card = check_bundle(path)
    return load_numpy(str(card_path(path).parent / HEAD_FILE)), card


def load_head(path: str | Path) -> tuple[nn.Module, dict]:
    """The head of a bundle (hash-checked), in eval mode, with its card. It takes
    backbone features ``(N, in_dim)``; with the ``identity`` backbone (tabular
    data) those are the records' feature columns."""
    arrays, card = load_head_arrays(path)
    h = card["head"]
    # A tuned bundle (``trainable`` bitfit / last-block): the tuned suffix + head, taking
    # the backbone's activations at the cut point (common/models/finetune.py).
    head = make_model(h.get("trainable", "head"), head=h["name"], backbone=h["backbone"],
                      image_size=int(h["image_size"]), in_dim=int(h["in_dim"]),
                      num_classes=int(h["num_classes"]), hidden_dim=int(h.get("hidden_dim", 128)))
    return load_model_state(head, arrays).eval(), card


def default_model(card: dict) -> str:
    """Which model a bundle is used through by default: its student, or its
    head when it has none (distillation off or failed, e.g. a tabular run)."""
    return "student" if STUDENT_FILE in (card.get("files") or {}) else "head"


class RawColumnsHead(nn.Module):
    """A tabular head that takes the raw design columns: the schema's clip, centre and
    scale (:meth:`common.data.schema.Schema.transform`) run inside the graph, and a
    missing value (NaN) becomes the feature's centre, as at the sites and in predict."""

    def __init__(self, head: nn.Module, lower, upper, center, scale) -> None:
        super().__init__()
        self.head = head
        for name, v in (("lower", lower), ("upper", upper), ("center", center),
                        ("scale", scale)):
            self.register_buffer(name, torch.as_tensor(np.asarray(v, dtype=np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x)
        x = torch.where(missing, torch.zeros_like(x), x)
        x = torch.minimum(torch.maximum(x, self.lower), self.upper)
        x = (x - self.center) / self.scale
        return self.head(torch.where(missing, torch.zeros_like(x), x))


def tabular_schema(card: dict) -> Schema | None:
    """The card's tabular schema, or None (an image run, or a card without one)."""
    block = card.get("schema") or {}
    return Schema.from_dict(block) if block.get("input") == "tabular" else None


def _export_module(path: str | Path, which: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """The module to export, its input shape per record and the input's name."""
    if which not in MODELS:
        raise ValueError(f"unknown model {which!r}. Valid: {', '.join(MODELS)}")
    if which == "head":
        head, card = load_head(path)
        h = card["head"]
        if is_tuned(h.get("trainable", "head")):  # images in: the frozen prefix, then the tuned part
            size = int(h["image_size"])
            return image_model(head, h["backbone"], size), (3, size, size), "images"
        schema = tabular_schema(card)
        if schema is not None:  # raw columns in: the run's scaling travels inside the graph
            if len(schema.columns) != int(h["in_dim"]):
                raise ValueError(f"the card's schema has {len(schema.columns)} design columns, "
                                 f"the head takes {h['in_dim']}: cannot export its scaling")
            return RawColumnsHead(head, *schema.affine()), (int(h["in_dim"]),), "records"
        return head, (int(h["in_dim"]),), "features"
    student, spec, _ = load_student(path)
    return student, tuple(spec.input_shape), "images"


def export_torchscript(path: str | Path, out: str | Path, *, which: str = "student") -> Path:
    """Trace the bundle's student (inputs: ``(N, *input_shape)`` float32, pixels
    in [0, 1]) or head (inputs: ``(N, in_dim)`` features, see :func:`load_head`)
    to TorchScript; outputs: logits."""
    module, shape, _ = _export_module(path, which)
    example = torch.rand(2, *shape)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(out))
    return out


def export_onnx(path: str | Path, out: str | Path, *, which: str = "student") -> Path:
    """Export the bundle's student (input ``images``, ``(N, *input_shape)``
    float32 in [0, 1]) or head (input ``features``, ``(N, in_dim)``) to ONNX
    (opset 17, dynamic batch; output ``logits``)."""
    module, shape, input_name = _export_module(path, which)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *shape)
    with torch.no_grad():
        # The TorchScript-based exporter: the dynamo one needs onnxscript and
        # gains nothing for a small static CNN / MLP.
        torch.onnx.export(module, (example,), str(out), input_names=[input_name],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}})
    return out
