"""Segmenters at work: prediction, evaluation, colour overlays, ``ijepa segment`` (a folder of images) and
``ijepa segment-video`` (a video file), headless and batched."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.transforms import Normalize
from ..device import autocast, pick_device
from ..errors import ImageReadError, UsageError, VideoError
from ..images import MAX_PIXELS, list_images, read_bgr, refuse_inside
from .data import SegDataset, seg_loader
from .metrics import ConfusionMatrix
from .model import SegmentationModel, load_segmenter


@torch.no_grad()
def predict_ids(model: SegmentationModel, imgs: torch.Tensor, sizes: Sequence[tuple[int, int]], device, bf16=False):
    """uint8 BGR (B, H, W, 3) at the model size -> list of (h_i, w_i) class-id tensors at each original size."""
    model.eval()
    with autocast(device, bf16):
        logits = model(Normalize()(imgs, device)).float()
    return [
        F.interpolate(logits[i : i + 1], size=tuple(s), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
        for i, s in enumerate(sizes)
    ]


def evaluate_segmentation(
    model: SegmentationModel,
    ds: SegDataset,
    num_classes: int,
    device: torch.device,
    *,
    batch_size: int = 16,
    num_workers: int = 1,
    bf16: bool = False,
    desc: str = "seg_eval",
) -> tuple[dict, ConfusionMatrix]:
    """Dataset-level confusion at each mask's own resolution (logits upsampled to it)."""
    cm = ConfusionMatrix(num_classes)
    for imgs, masks in tqdm(seg_loader(ds, batch_size, num_workers, False, 0), desc=desc, mininterval=5):
        preds = predict_ids(model, imgs, [m.shape for m in masks], device, bf16)
        for p, m in zip(preds, masks, strict=True):
            cm.update(p, m)
    return cm.compute(), cm


def colorize(ids: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) RGB with ``colors[id]`` (ignore / out-of-range ids black)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)
    return lut[np.asarray(ids, np.uint8)]


def overlay(img_bgr: np.ndarray, ids: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask over a BGR image (both at the image's size)."""
    color_bgr = colorize(ids, colors)[..., ::-1]
    return (img_bgr.astype(np.float32) * (1 - alpha) + color_bgr.astype(np.float32) * alpha).round().astype(np.uint8)


def _resize_batch(frames: list[np.ndarray], height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in frames]))


def segment_folder(
    checkpoint: str | Path,
    folder: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    device: str = "auto",
    alpha: float = 0.5,
) -> dict:
    """Write ``<stem>_mask.png`` (colour mask, the class config's VIS_LABEL_MAP) and ``<stem>_overlay.png``
    for every image under ``folder`` (at the image's own size); unreadable files are listed, not fatal.
    """
    dev = pick_device(device)
    model, classes, pre = load_segmenter(checkpoint)
    model.to(dev)
    files, out = list_images(folder), Path(out_dir)
    refuse_inside(out, folder, "--output")
    out.mkdir(parents=True, exist_ok=True)
    skipped, done, pending = [], 0, []

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        imgs = _resize_batch([a for _, a in pending], pre.height, pre.width)
        preds = predict_ids(model, imgs, [a.shape[:2] for _, a in pending], dev)
        for (path, img), ids in zip(pending, preds, strict=True):
            ids = ids.numpy().astype(np.uint8)
            stem = path.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
            cv2.imwrite(str(out / f"{stem}_mask.png"), colorize(ids, classes.vis_colors)[..., ::-1])
            cv2.imwrite(str(out / f"{stem}_overlay.png"), overlay(img, ids, classes.vis_colors, alpha))
            done += 1
        pending.clear()

    for path in tqdm(files, desc="segment", mininterval=2):
        try:
            img = read_bgr(path)
        except ImageReadError as e:  # listed in the result; the other images go on
            skipped.append(str(e))
            continue
        pending.append((path, img))
        # Outputs are written at each image's own size, so the batch keeps the decoded images: it is flushed
        # at batch_size images or at MAX_PIXELS pixels, whichever comes first, to bound memory.
        if len(pending) == batch_size or sum(a.shape[0] * a.shape[1] for _, a in pending) >= MAX_PIXELS:
            flush()
    flush()
    return {"images": done, "skipped": skipped, "output": str(out), "classes": list(classes.names)}


def segment_video(
    checkpoint: str | Path,
    video: str | Path,
    output: str | Path,
    *,
    batch_size: int = 16,
    device: str = "auto",
    alpha: float = 0.5,
    bf16: bool = True,
) -> dict:
    """Read ``video`` frame by frame, predict in batches, write an overlay video of the same size and fps.

    Returns:
        {"frames", "width", "height", "fps" (of the input), "processing_fps", "output"}.
    """
    video, output = Path(video), Path(output)
    if not video.is_file():
        raise FileNotFoundError(f"input video {video} does not exist")
    if output.resolve() == video.resolve():
        raise UsageError(f"--output {output} is the input video; choose another file")
    dev = pick_device(device)
    model, classes, pre = load_segmenter(checkpoint)
    model.to(dev)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise VideoError(f"{video}: OpenCV cannot open it as a video")
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.stem + ".partial" + output.suffix)
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))  # (W, H)
    if not writer.isOpened():
        cap.release()
        raise VideoError(f"{output}: OpenCV cannot write this video (use .mp4 or .avi)")
    frames, batch, t0 = 0, [], time.perf_counter()
    bar = tqdm(total=count, desc="segment-video", unit="frame", mininterval=2)

    def flush() -> None:
        nonlocal frames
        if not batch:
            return
        preds = predict_ids(
            model, _resize_batch(batch, pre.height, pre.width), [(height, width)] * len(batch), dev, bf16
        )
        for frame, ids in zip(batch, preds, strict=True):
            writer.write(overlay(frame, ids.numpy().astype(np.uint8), classes.vis_colors, alpha))
        frames += len(batch)
        bar.update(len(batch))
        batch.clear()

    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame.shape[:2] != (height, width):
                raise VideoError(
                    f"{video}: frame {frames + len(batch)} is {frame.shape[1]}x{frame.shape[0]}, "
                    f"the stream says {width}x{height}"
                )
            batch.append(frame)
            if len(batch) == batch_size:
                flush()
        flush()
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)  # no partial video is left behind; the output (if any) is untouched
        raise
    finally:
        bar.close()
        cap.release()
        writer.release()
    if frames == 0:
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{video}: no frames could be read (not a video OpenCV can decode?)")
    tmp.replace(output)
    seconds = time.perf_counter() - t0
    return {
        "frames": frames,
        "width": width,
        "height": height,
        "fps": fps,
        "processing_fps": round(frames / seconds, 2),
        "output": str(output),
    }
