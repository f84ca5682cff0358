"""``fedtransfer predict`` and ``fedtransfer export``: use the delivered models."""

from __future__ import annotations

import argparse
import json


def cmd_predict(args) -> int:
    from common.predict import predict_file
    from common.training import resolve_device

    report = predict_file(args.model, args.input, args.out, which=args.which,
                          batch_size=args.batch_size, device=resolve_device(args.device),
                          progress=not args.no_progress)
    print(f"{report['records']} predictions ({report['model']}; classes: "
          f"{', '.join(report['classes'])}) -> {report['out']}")
    return 0


def cmd_export(args) -> int:
    from common.modelio import export_onnx, export_torchscript, read_card

    exporter = export_onnx if args.format == "onnx" else export_torchscript
    out = exporter(args.model, args.out)
    card = read_card(args.model)
    spec = card["student"]["spec"]
    kind = "ONNX" if args.format == "onnx" else "TorchScript"
    print(f"{kind} student {card['student']['architecture']} -> {out}\n"
          f"input: float32 (N, {', '.join(str(v) for v in spec['input_shape'])}), pixels in [0, 1]; "
          f"output: logits over {json.dumps(card['classes'])}")
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
    sp.add_argument("--which", choices=("student", "head"), default="student",
                    help="the distilled student (default) or backbone + aggregated head")
    sp.add_argument("--batch-size", type=int, default=256)
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_predict)
    sp = sub.add_parser("export", help="export a delivered student to TorchScript or ONNX")
    sp.add_argument("--model", required=True, help="a delivered card.json or its folder")
    sp.add_argument("--out", required=True, help="output file (.pt for TorchScript, .onnx)")
    sp.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    sp.set_defaults(func=cmd_export)
