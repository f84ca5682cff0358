"""``fedtransfer predict`` and ``fedtransfer export``: use the delivered models."""

from __future__ import annotations

import argparse
import json


def cmd_predict(args) -> int:
    """Write predictions; an unreadable input without ``--skip-bad`` is a
    ``ValueError`` (exit status 2, naming every one) and writes nothing."""
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.models.predict import predict_file

    # lazy, as above
    from common.models.training import resolve_device

    report = predict_file(args.model, args.input, args.out, which=args.which,
                          batch_size=args.batch_size, device=resolve_device(args.device),
                          progress=not args.no_progress, skip_bad=args.skip_bad)
    print(f"{report['rows']} rows written: {report['records']} predicted, {report['skipped']} "
          f"skipped as unreadable ({report['which']}: {report['model']}; classes: "
          f"{', '.join(report['classes'])}) -> {report['out']}\n"
          f"decision: {report['decision']}")
    return 0


def _export_io(card: dict, which: str) -> str:
    """What an exported model takes and returns, in words."""
    if which == "head":
        h = card["head"]
        schema = card.get("schema") or {}
        if schema.get("input") == "tabular":
            columns = [c for f in schema.get("features", []) for c in (
                [f["name"]] if f.get("kind", "numeric") == "numeric"
                else [f"{f['name']}={v}" for v in f["levels"]])]
            return (f"input 'records': float32 (N, {h['in_dim']}), the raw columns as recorded, "
                    f"in this order: {json.dumps(columns)} (categorical ones one-hot as "
                    "name=level; NaN for a missing value); the run's clipping and scaling are "
                    "inside the model, so do not scale them; "
                    f"output: logits over {json.dumps(card['classes'])}")
        what = ("the records' feature columns, already scaled (this card has no schema to "
                "scale them)" if h["backbone"] == "identity" else
                f"features from the {h['backbone']} backbone (not images)")
        return (f"input 'features': float32 (N, {h['in_dim']}), {what}; "
                f"output: logits over {json.dumps(card['classes'])}")
    spec = card["student"]["spec"]
    return (f"input 'images': float32 (N, {', '.join(str(v) for v in spec['input_shape'])}), "
            f"pixels in [0, 1]; output: logits over {json.dumps(card['classes'])}")


def cmd_export(args) -> int:
    # lazy: a command imports only what it runs (torch, Flower and Ray cost seconds)
    from common.models.modelio import (
        check_bundle,
        default_model,
        export_onnx,
        export_torchscript,
    )

    card = check_bundle(args.model)
    which = args.which or default_model(card)
    exporter = export_onnx if args.format == "onnx" else export_torchscript
    out = exporter(args.model, args.out, which=which)
    kind = "ONNX" if args.format == "onnx" else "TorchScript"
    what = f"student {card['student']['architecture']}" if which == "student" else (
        f"{card['head']['name']} head of {card['head']['backbone']} features")
    print(f"{kind} {what} -> {out}\n{_export_io(card, which)}")
    return 0


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("predict", help="run a delivered student or head on images, .npz or CSV; "
                        "write class probabilities to CSV")
    sp.add_argument("--model", required=True,
                    help="a delivered card.json, or the folder holding it (e.g. <site>/models)")
    sp.add_argument("--input", required=True,
                    help="a folder of PNG/JPEG images, an .npz (array 'images'/'x' or one array), "
                         "or a CSV of numeric features (optional 'id' and 'label' columns)")
    sp.add_argument("--out", required=True, help="output CSV")
    sp.add_argument("--which", choices=("student", "head"), default=None,
                    help="the distilled student, or backbone + aggregated head (default: the "
                         "student, or the head when the bundle has none)")
    sp.add_argument("--skip-bad", action="store_true",
                    help="write unreadable inputs (corrupt images, CSV rows with missing or "
                         "non-numeric values) as rows with empty probabilities and a 'status' "
                         "column, instead of stopping with an error that names them")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_predict)
    sp = sub.add_parser("export", help="export a delivered student or head to TorchScript or ONNX")
    sp.add_argument("--model", required=True, help="a delivered card.json or its folder")
    sp.add_argument("--out", required=True, help="output file (.pt for TorchScript, .onnx)")
    sp.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    sp.add_argument("--which", choices=("student", "head"), default=None,
                    help="the student (input: images) or the head alone (input: backbone "
                         "features; for a tabular run, the feature columns); default: the "
                         "student, or the head when the bundle has none")
    sp.set_defaults(func=cmd_export)
