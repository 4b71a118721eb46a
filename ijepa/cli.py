"""``ijepa`` command line for people outside the pipeline: classify, search, segment images and videos, inspect
checkpoints, list presets."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import META_KEY, MODEL_KEYS, build_from_checkpoint
from .errors import USER_FACING, UsageError, report
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


def _classify(args: argparse.Namespace) -> int:
    import csv

    from .images import refuse_inside
    from .inference import annotate, classify_folder

    if args.annotate:
        refuse_inside(args.annotate, args.input, "--annotate")
    rows, _ = classify_folder(args.checkpoint, args.input, batch_size=args.batch_size, device=args.device)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "status", "prediction", "probability", "topk"])
        w.writeheader()
        w.writerows(rows)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"ijepa classify: {ok} images classified, {len(rows) - ok} skipped -> {out}")
    if args.annotate:
        print(f"ijepa classify: {annotate(rows, args.annotate, args.input)} annotated images -> {args.annotate}")
    return 0


def _search(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_encoder
    from .device import pick_device
    from .eval.features import pooled_features
    from .eval.search import SearchIndex
    from .finetune import Preprocess
    from .images import read_bgr
    from .inference import preprocess_batch

    query = Path(args.query)
    if not query.is_file():
        raise FileNotFoundError(f"--query {query} is not a file")
    arr = read_bgr(query)  # checked before the index and the encoder are loaded
    index = SearchIndex.load(args.index)
    meta = index.meta
    device = pick_device(args.device)
    encoder = load_encoder(args.checkpoint or index.encoder_checkpoint(args.index), which=meta["which"]).to(device)
    with torch.no_grad():
        x = preprocess_batch([arr], Preprocess(meta["crop_size"], meta["resize_size"]), device)
        q = pooled_features(encoder, x)[meta["pooling"]]
    scores, idx = index.search(q, args.k)
    classes = meta["classes"]
    for rank, (s, i) in enumerate(zip(scores[0].tolist(), idx[0].tolist(), strict=True), start=1):
        print(
            json.dumps(
                {"rank": rank, "path": index.sources[i], "score": round(s, 5), "class": classes[int(index.labels[i])]}
            )
        )
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .seg.infer import segment_folder

    res = segment_folder(args.checkpoint, args.input, args.output, batch_size=args.batch_size, device=args.device)
    print(f"ijepa segment: {res['images']} images -> {res['output']} (<name>_mask.png, <name>_overlay.png)")
    for reason in res["skipped"]:
        print(f"ijepa segment: skipped {reason}", file=sys.stderr)
    return 0


def _segment_video(args: argparse.Namespace) -> int:
    from .seg.infer import segment_video

    out = args.output or str(Path(args.input).with_name(Path(args.input).stem + "_seg.mp4"))
    res = segment_video(args.checkpoint, args.input, out, batch_size=args.batch_size, device=args.device)
    print(
        f"ijepa segment-video: {res['frames']} frames {res['width']}x{res['height']} at {res['fps']:.2f} fps "
        f"-> {res['output']}; processed at {res['processing_fps']} FPS"
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .checkpoint import load_encoder
    from .interop import export_encoder

    encoder = load_encoder(args.checkpoint, which=args.which, num_heads=args.num_heads)
    out = Path(args.output)
    if out.resolve() == Path(args.checkpoint).resolve():
        raise UsageError(f"--output {out} is the checkpoint itself; choose a new folder")
    export_encoder(encoder, out, args.to)
    load = (
        f'timm.models.VisionTransformer(**config["model_args"]) with config = {out}/config.json, then '
        f"load_state_dict(safetensors.torch.load_file({out}/model.safetensors))"
        if args.to == "timm"
        else f'transformers.IJepaModel.from_pretrained("{out}")'
    )
    print(f"ijepa export: {args.which} of {args.checkpoint} -> {out} ({args.to} layout); load it with {load}")
    return 0


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (``--k``, ``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ijepa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a checkpoint's format, architecture and step")
    p.add_argument("checkpoint", help="a .pth.tar file (ours or an official release)")
    p.add_argument("--num-heads", type=_positive, default=None, help="only for files of a non-preset width")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("models", help="list the encoder presets")
    p.set_defaults(func=_models)
    p = sub.add_parser("classify", help="classify a folder of images with a finetuned checkpoint -> CSV")
    p.add_argument("--checkpoint", required=True, help="models/finetune/classifier.pth (from the finetune stage)")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--annotate", default=None, help="also write annotated copies of the images into this folder")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=_classify)
    p = sub.add_parser("search", help="find the gallery images most similar to a query image")
    p.add_argument("--index", default="models/search/index.pt", help="index written by the search stage")
    p.add_argument("--query", required=True, help="an image file")
    p.add_argument("--k", type=_positive, default=5, help="how many neighbours (>= 1)")
    p.add_argument("--checkpoint", default=None, help="override the encoder checkpoint recorded in the index")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=_search)
    p = sub.add_parser("segment", help="segment a folder of images -> colour masks and overlays")
    p.add_argument("--checkpoint", required=True, help="models/seg/pretrained.pth (from the seg_train stage)")
    p.add_argument("--input", required=True, help="folder of images (searched recursively)")
    p.add_argument("--output", default="segmentations", help="folder to write (default: segmentations)")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=_segment)
    p = sub.add_parser("segment-video", help="segment every frame of a video -> overlay video (headless)")
    p.add_argument("--checkpoint", required=True, help="models/seg/pretrained.pth (from the seg_train stage)")
    p.add_argument("--input", required=True, help="a video file OpenCV can read")
    p.add_argument("--output", default=None, help="output .mp4 (default: <input>_seg.mp4 beside the input)")
    p.add_argument("--batch-size", type=_positive, default=16, help="frames per forward pass")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.set_defaults(func=_segment_video)
    p = sub.add_parser("export", help="write an encoder in timm's or Hugging Face's layout (safetensors + config)")
    p.add_argument("checkpoint", help="ours, an official release, or a timm/Hugging Face file or folder")
    p.add_argument("--to", required=True, choices=["timm", "hf"], help="the layout to write")
    p.add_argument("--output", required=True, help="folder to write model.safetensors and config.json into")
    p.add_argument("--which", default="target_encoder", choices=["target_encoder", "encoder"])
    p.add_argument("--num-heads", type=_positive, default=None, help="only for files of a non-preset width")
    p.set_defaults(func=_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ijepa`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_FACING as e:  # a user error: one line naming the file or argument; anything else is a bug
        report(f"ijepa {args.command}", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
