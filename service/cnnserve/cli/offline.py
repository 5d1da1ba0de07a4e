"""Offline commands: ``train``, ``export``, ``shapes``."""

from __future__ import annotations

import argparse
from typing import Any

from cnnserve.cli._output import EXIT_OK, emit
from cnnserve.cli.remote import add_target_arguments, connect
from cnnserve.errors import InvalidInputError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    _add_train(subparsers)
    _add_export(subparsers)
    _add_shapes(subparsers)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _add_train(subparsers: Any) -> None:
    from cnnserve.architectures import ARCHITECTURES
    from cnnserve_export.config import TrainConfig

    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train LeNet or AlexNet on real data and write a checkpoint",
        description="Train with SGD + momentum and cross-entropy; writes weights.safetensors, "
        "model_card.json, metrics.jsonl and curves.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", choices=ARCHITECTURES, default=defaults.model, help="architecture")
    parser.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="digits | fashion-mnist | mnist | cifar10 | folder:PATH",
    )
    parser.add_argument("--data-dir", help="where the dataset lives (fashion-mnist: the IDX files)")
    parser.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar10")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="passes over the data")
    budget.add_argument("--max-steps", type=_positive_int, help="stop after this many SGD steps")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="images per step"
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="L2 penalty")
    parser.add_argument(
        "--lr-schedule",
        choices=["cosine", "constant"],
        default=defaults.lr_schedule,
        help="decay to 0, or not",
    )
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="no random shifts/flips")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seeds init, split and shuffling")
    parser.add_argument("--num-classes", type=_positive_int, help="default: the dataset's class count")
    parser.add_argument("--train-subset", type=_positive_int, help="train on a seeded subset of N images")
    parser.add_argument("--eval-subset", type=_positive_int, help="evaluate on a seeded subset of N images")
    parser.add_argument("--name", help="serving name written to the model card (default: the model)")
    parser.add_argument("--version", default=defaults.version, help="model version (the .mar version)")
    parser.add_argument("--dry-run", action="store_true", help="one batch only: a smoke test")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--json", action="store_true", help="print the model card as JSON")
    parser.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from cnnserve_export.train import TrainConfig, train

    if not args.dataset:
        raise InvalidInputError.for_field("dataset", "is required")
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        name=args.name,
        data_dir=args.data_dir,
        download=args.download,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        augment=args.augment,
        device=args.device,
        seed=args.seed,
        num_classes=args.num_classes,
        train_subset=args.train_subset,
        eval_subset=args.eval_subset,
        dry_run=args.dry_run,
        version=args.version,
    )
    result = train(config)
    training = result.card.training
    emit(
        args,
        result.card.to_dict(),
        f"wrote {result.out}: test accuracy {training['test_accuracy']:.2%} after {training['steps']} steps "
        f"({training['wall_seconds']:.1f} s on {training['device']})",
    )
    return EXIT_OK


def _add_export(subparsers: Any) -> None:
    # The defaults only (cnnserve_export.config imports nothing heavy): no torch while the CLI starts.
    from cnnserve_export.config import (
        DEFAULT_CALIBRATION_SIZE,
        DEFAULT_MAX_ACCURACY_DROP,
        DEFAULT_MIN_AGREEMENT,
    )

    parser = subparsers.add_parser(
        "export",
        help="export a checkpoint to TorchScript and ONNX and check parity",
        description="Writes model.pt / model.onnx, the weights, parity.json and the model card to --out. "
        "Exits non-zero when an export's logits differ from the eager model's by more than "
        "--max-abs-diff, or when its top-1 differs on a sample whose eager top-1 margin is clear (more than "
        "twice --max-abs-diff); near ties are reported, not compared.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    parser.add_argument("--formats", default="torchscript,onnx", help="comma-separated: torchscript,onnx")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--parity-samples", type=_positive_int, default=64, help="real test images compared")
    parser.add_argument("--max-abs-diff", type=float, default=1e-4)
    parser.add_argument(
        "--precision",
        default="fp32",
        help="comma-separated fp32,int8: each is measured on the held-out split (accuracy, top-1 agreement "
        "with eager fp32) and refused past the gate below; int8 is static QDQ quantization calibrated on "
        "training images (docs/precision.md)",
    )
    parser.add_argument(
        "--calibration-size",
        type=_positive_int,
        default=DEFAULT_CALIBRATION_SIZE,
        help="training images int8 is calibrated on (a seeded sample, saved as indices with the export)",
    )
    parser.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one int8 scale per weight tensor instead of one per output channel",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=DEFAULT_MAX_ACCURACY_DROP,
        help="refuse a precision whose test accuracy is more than this many points below eager fp32's",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=DEFAULT_MIN_AGREEMENT,
        help="refuse a precision whose top-1 agreement with eager fp32 (clear held-out samples) is lower",
    )
    parser.add_argument("--json", action="store_true", help="print the parity report as JSON")
    parser.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from cnnserve_export.export import export_checkpoint
    from cnnserve_export.quantize import PrecisionGate

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    result = export_checkpoint(
        args.checkpoint,
        args.out,
        formats=formats,
        parity_samples=args.parity_samples,
        max_abs_diff=args.max_abs_diff,
        precisions=precisions if "onnx" in formats else (),
        calibration_size=args.calibration_size,
        per_channel=args.per_channel,
        gate=PrecisionGate(args.max_accuracy_drop, args.min_agreement),
    )

    def text() -> str:
        lines = [
            f"wrote {result.out} ({', '.join(formats)})",
            f"parity on {result.parity['samples']} test images:",
        ]
        for fmt, row in result.parity["formats"].items():
            diff, agreement = row["max_abs_diff"], row["top1_agreement"]
            lines.append(
                f"  {fmt:<12} max abs diff {diff:.2e}  top-1 agreement {agreement:.2%} "
                f"on {row['clear_samples']} clear samples ({row['near_ties']} near ties not compared)"
            )
        report = result.parity.get("precisions")
        if report:
            held_out = report["held_out"]
            lines.append(
                f"precisions on the {held_out['samples']} held-out {held_out['split']} images "
                f"(eager fp32 accuracy {report['eager_accuracy']:.2%}):"
            )
            for precision, row in report["precisions"].items():
                lines.append(
                    f"  {precision:<12} accuracy {row['accuracy']:.2%}  top-1 agreement "
                    f"{row['top1_agreement']:.2%} on {row['clear_samples']} clear samples "
                    f"({row['near_ties']} near ties)  {row['seconds']:.2f} s"
                )
        return "\n".join(lines)

    emit(args, result.parity, text)
    return EXIT_OK


def _add_shapes(subparsers: Any) -> None:
    from cnnserve.architectures import ARCHITECTURES

    parser = subparsers.add_parser(
        "shapes",
        help="per-layer shapes and parameter counts for an input size",
        description="A torchsummary-like table. Describe an architecture (--model, --num-classes) or a "
        "trained checkpoint/export directory.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", nargs="?", help="a trained model to describe")
    parser.add_argument("--model", choices=ARCHITECTURES, default="lenet")
    parser.add_argument("--num-classes", type=_positive_int, help="default: the architecture's default")
    parser.add_argument("--input", help="C,H,W (default: the model's input shape)")
    parser.add_argument(
        "--remote",
        action="store_true",
        help="ask the gateway about the served model --model (GetLayerShapes)",
    )
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_shapes)


def _remote_shapes(args: argparse.Namespace) -> int:
    from cnnserve.layer_table import parse_shape

    shape = parse_shape(args.input) if args.input else ()
    with connect(args) as client:
        reply = client.layer_shapes(args.model, shape)
    emit(args, reply.to_json(), lambda: f"{reply.model} v{reply.version} (served)\n{reply.table.format()}")
    return EXIT_OK


def _run_shapes(args: argparse.Namespace) -> int:
    from cnnserve.card import load_card
    from cnnserve.models import build_model, get_spec
    from cnnserve.shapes import layer_shapes, parse_shape

    if args.remote:
        return _remote_shapes(args)
    if args.checkpoint:
        card = load_card(args.checkpoint)
        model = card.build_model()
        default_shape: tuple[int, ...] = card.input_shape
    else:
        overrides = {"num_classes": args.num_classes} if args.num_classes else {}
        model = build_model(args.model, **overrides)
        default_shape = get_spec(args.model).input_shape
    shape = parse_shape(args.input) if args.input else default_shape
    table = layer_shapes(model, shape)
    emit(args, table.to_dict(), table.format)
    return EXIT_OK
