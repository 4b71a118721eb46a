"""``ijepa`` command line for people outside the pipeline: inspect checkpoints, list presets."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .checkpoint import META_KEY, MODEL_KEYS, CheckpointError, build_from_checkpoint
from .models.registry import list_models, preset


def _inspect(args: argparse.Namespace) -> int:
    ckpt, enc, pred = build_from_checkpoint(args.checkpoint, num_heads=args.num_heads)
    meta = ckpt.get(META_KEY) or {}
    info = {
        "file": str(args.checkpoint),
        "format": f"ijepa v{meta['format_version']}" if meta else "official I-JEPA (no metadata; inferred)",
        "entries": sorted(k for k in ckpt if k in MODEL_KEYS),
        "epoch": ckpt.get("epoch"),
        "step": meta.get("step"),
        "encoder": enc,
        "predictor": pred,
    }
    print(json.dumps(info, indent=2, default=str))
    return 0


def _models(_: argparse.Namespace) -> int:
    for name in list_models():
        p = preset(name)
        print(
            f"{name:<10} dim {p['embed_dim']:>5}  depth {p['depth']:>3}  heads {p['num_heads']:>3}  "
            f"mlp ratio {p['mlp_ratio']:.3g}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ijepa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a checkpoint's format, architecture and step")
    p.add_argument("checkpoint", help="a .pth.tar file (ours or an official release)")
    p.add_argument("--num-heads", type=int, default=None, help="only for files of a non-preset width")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("models", help="list the encoder presets")
    p.set_defaults(func=_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ijepa`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"ijepa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
