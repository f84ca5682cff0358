"""Real deployed sites for tests: files on disk, a node config, and requests that match.

A site here is what an operator sets up: its records in a file of its own (a
CSV with a schema file, or a MedMNIST-style ``.npz`` of images), and a node
config declaring how they are read. Requests are built the way the server
builds them (:func:`common.protocol.train_request` fields), so a test changes
only what it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from client.settings import SiteSettings, deployed_policy
from common import protocol
from common.data.schema import Schema, image_schema
from common.models.heads import head_state, make_head


def tabular_schema(num_features: int, classes=("0", "1"), **kw) -> Schema:
    """Numeric features f0..f{k-1}, unscaled (no constants to fit)."""
    return Schema.from_dict({"classes": list(classes), "scaling": "none",
                             "features": [{"name": f"f{i}"} for i in range(num_features)], **kw})


def csv_site(root: Path, x: np.ndarray, y: np.ndarray, *, schema: Schema | None = None,
             classes=("0", "1"), **policy) -> dict:
    """A deployed site holding ``x`` (N, k) and labels ``y`` (class indices) in a CSV,
    with the federation's schema in a file beside it. Returns its node config."""
    root.mkdir(parents=True, exist_ok=True)
    schema = schema or tabular_schema(x.shape[1], classes)
    names = [f.name for f in schema.features]
    lines = [",".join([*names, schema.label])]
    lines += [",".join([*(repr(float(v)) for v in row), schema.classes[int(c)]])
              for row, c in zip(x, y, strict=True)]
    (root / "records.csv").write_text("\n".join(lines) + "\n")
    (root / "schema.json").write_text(schema.to_json())
    return _node(root, {"data-path": f"csv:{root / 'records.csv'}",
                        "schema": str(root / "schema.json")}, policy)


def npz_site(root: Path, images: np.ndarray, labels: np.ndarray, *, classes, image_size: int,
             **policy) -> dict:
    """A deployed site holding uint8 ``images`` (N, H, W) in a MedMNIST-style ``.npz``
    (all of its splits are the site's records). Returns its node config."""
    root.mkdir(parents=True, exist_ok=True)
    a, b = int(len(images) * 0.8), int(len(images) * 0.9)
    lab = np.asarray(labels).reshape(-1, 1)
    np.savez(root / "data.npz", train_images=images[:a], train_labels=lab[:a],
             val_images=images[a:b], val_labels=lab[a:b], test_images=images[b:],
             test_labels=lab[b:])
    return _node(root, {"data-path": f"medmnist:{root / 'data.npz'}",
                        "class-names": ",".join(classes), "image-size": image_size,
                        "image-channels": 1}, policy)


def _node(root: Path, data: dict, policy: dict) -> dict:
    return {"site-id": 0, "ledger-path": str(root / "ledger.sqlite"),
            "cache-dir": str(root / "cache"), "target-epsilon": 2.0, "target-delta": 1e-5,
            "backbone": "identity", **data, **policy}


def settings(node: dict) -> SiteSettings:
    return deployed_policy(node)


def declared_schema(node: dict) -> Schema:
    return deployed_policy(node).declaration.schema


def request(node: dict, **overrides) -> protocol.RoundRequest:
    """A round request matching the site's declaration; ``overrides`` by field name."""
    decl = deployed_policy(node).declaration
    base = dict(run_id="run-a", server_round=1, num_rounds=3, local_epochs=1, batch_size=16,
                learning_rate=0.5, momentum=0.0, clip_norm=1.0, noise_multiplier=0.0,
                schema=decl.schema.to_json(), backbone=decl.backbone)
    return protocol.RoundRequest(**{**base, **overrides})


def config(node: dict, **overrides) -> dict:
    """The same request as a message's config record (kebab-case keys)."""
    req = request(node)
    out = {"server-round": req.server_round, "num-rounds": req.num_rounds,
           "local-epochs": req.local_epochs, "batch-size": req.batch_size,
           "learning-rate": req.learning_rate, "momentum": req.momentum,
           "clip-norm": req.clip_norm, "noise-multiplier": req.noise_multiplier, "dp": True,
           "schema": req.schema, "backbone": req.backbone, "trainable": "head", "head": "linear",
           "hidden-dim": 128}
    return {**out, **overrides}


def head(node: dict, in_dim: int, *, seed: int = 0):
    return head_state(make_head("linear", in_dim=in_dim,
                                num_classes=len(declared_schema(node).classes), seed=seed))


def image_site_schema(classes, size: int, channels: int = 1) -> str:
    return image_schema(classes, image_size=size, image_channels=channels).to_json()


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
