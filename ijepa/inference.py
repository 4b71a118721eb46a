"""Inference on folders of image files with the exact preprocessing of training/evaluation."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from .data.transforms import EvalTransform, Normalize, build_batch
from .device import pick_device
from .errors import ImageReadError
from .finetune import Preprocess, load_classifier
from .images import list_images, read_bgr


def preprocess_batch(arrays: Sequence[np.ndarray], pre: Preprocess, device: torch.device) -> torch.Tensor:
    """Decoded images -> normalised (B, 3, S, S) model input, exactly as the evaluation loaders do it."""
    batch = build_batch(arrays, EvalTransform(pre.crop_size, pre.resize_size))
    return Normalize(pre.mean, pre.std)(batch, device)


@torch.no_grad()
def classify_folder(
    checkpoint: str | Path, folder: str | Path, *, batch_size: int = 64, device: str = "auto", topk: int = 5
) -> tuple[list[dict], list[str]]:
    """Predict every image under ``folder`` with a finetuned classifier.

    Returns:
        (rows, class_names); a row: path, status ("ok" or the reason it was skipped), prediction,
        probability and the top-k classes with probabilities.
    """
    dev = pick_device(device)
    model, classes, pre = load_classifier(checkpoint)
    model.to(dev)
    rows, pending = [], []

    def flush():
        if not pending:
            return
        logits = model(Normalize(pre.mean, pre.std)(torch.stack([a for _, a in pending]), dev)).float()
        probs = logits.softmax(dim=1).cpu()
        top_p, top_i = probs.topk(min(topk, probs.shape[1]), dim=1)
        for (path, _), ps, ids in zip(pending, top_p, top_i, strict=True):
            rows.append(
                {
                    "path": str(path),
                    "status": "ok",
                    "prediction": classes[int(ids[0])],
                    "probability": round(float(ps[0]), 5),
                    "topk": ";".join(f"{classes[int(i)]}:{float(q):.4f}" for q, i in zip(ps, ids, strict=True)),
                }
            )
        pending.clear()

    transform = EvalTransform(pre.crop_size, pre.resize_size)
    for path in list_images(folder):
        try:
            arr = read_bgr(path)
        except ImageReadError as e:  # listed in the CSV and on stderr; the other images go on
            print(f"ijepa classify: skipping {e}", file=sys.stderr)
            reason = str(e).removeprefix(f"{path}: ")
            rows.append({"path": str(path), "status": reason, "prediction": "", "probability": "", "topk": ""})
            continue
        # Cropped at once: memory holds batch_size model inputs, never batch_size full-size images.
        pending.append((path, build_batch([arr], transform)[0]))
        del arr
        if len(pending) == batch_size:
            flush()
    flush()
    rows.sort(key=lambda r: r["path"])
    return rows, classes


def annotate(rows: list[dict], out_dir: str | Path, root: str | Path) -> int:
    """Write a copy of each classified image with its prediction drawn on it; returns how many."""
    out_dir, root, n = Path(out_dir), Path(root), 0
    for r in rows:
        if r["status"] != "ok":
            continue
        img = read_bgr(Path(r["path"]))
        scale = max(1, 256 // max(img.shape[:2]))
        img = cv2.resize(img, (img.shape[1] * scale, img.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
        label = f"{r['prediction']} {100 * r['probability']:.0f}%"
        cv2.rectangle(img, (0, 0), (img.shape[1], 18), (0, 0, 0), -1)
        cv2.putText(img, label, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        dest = out_dir / Path(r["path"]).relative_to(root).with_suffix(".png")
        dest.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(dest), img)
        n += 1
    return n
