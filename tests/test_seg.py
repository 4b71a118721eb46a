"""Segmentation: mIoU definition, mask decoding, pairing, model geometry, image and video inference."""

from __future__ import annotations

import math
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import yaml

from ijepa import create_encoder
from ijepa.cli import main as cli
from ijepa.seg.data import (
    IGNORE,
    SegDataError,
    SegDataset,
    decode_color_mask,
    joint_augment,
    load_class_config,
    pair_files,
    read_mask,
)
from ijepa.seg.infer import colorize, evaluate_segmentation
from ijepa.seg.metrics import ConfusionMatrix, miou_from_counts
from ijepa.seg.model import SegmentationModel, SegPreprocess, save_segmenter
from ijepa.seg.train import SegTrainSpec, train_segmentation

from .helpers import SEG_CLASSES, seg_scenes, write_seg_pair

# -- metrics --------------------------------------------------------------------------------------------------


def test_miou_on_hand_made_confusion_matrices():
    # rows = ground truth, columns = prediction
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class 2 absent from truth and prediction
    iou0, iou1 = 8 / (8 + 2 + 1), 3 / (3 + 1 + 2)
    assert miou_from_counts(cm) == pytest.approx((iou0 + iou1) / 2)  # absent class left out, not scored 0
    cm = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert miou_from_counts(cm) == 1.0
    cm = np.array([[5, 0, 2], [0, 5, 0], [0, 0, 0]])  # class 2 predicted but never true: IoU 0, counted
    assert miou_from_counts(cm) == pytest.approx((5 / 7 + 1 + 0) / 3)


def test_confusion_ignores_255_and_is_dataset_level():
    m = ConfusionMatrix(3)
    target = torch.tensor([[0, 1, IGNORE], [2, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 2], [2, 0, 1]])  # the predictions on ignore pixels do not count
    m.update(pred, target)
    m.update(torch.tensor([1]), torch.tensor([1]))  # a second "batch" with only class 1
    out = m.compute()
    assert m.counts.sum() == 5 and out["pixel_acc"] == pytest.approx(4 / 5)
    assert out["iou"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert out["miou"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.tensor([0]), torch.tensor([7]))
    assert math.isnan(ConfusionMatrix(2).compute()["miou"])


# -- data -----------------------------------------------------------------------------------------------------


def test_colour_decoding_counts_unknown_colours_instead_of_calling_them_background():
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (128, 0, 0)
    rgb[0, 2] = (0, 128, 0)
    rgb[1, 0] = (224, 224, 192)  # declared ignore colour
    rgb[1, 1] = (1, 2, 3)  # not in the config
    rgb[1, 2] = (1, 2, 3)
    ids, unknown = decode_color_mask(rgb, SEG_CLASSES)
    assert ids.tolist() == [[0, 1, 2], [IGNORE, IGNORE, IGNORE]]
    assert unknown == Counter({(1, 2, 3): 2})


def test_class_config_validation(tmp_path):
    path = tmp_path / "voc.yaml"
    path.write_text(yaml.safe_dump(SEG_CLASSES.to_dict()))
    assert load_class_config(path) == SEG_CLASSES
    bad = SEG_CLASSES.to_dict() | {"LABEL_COLORS_LIST": [[0, 0, 0], [128, 0, 0]]}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SegDataError, match=r"voc.yaml: LABEL_COLORS_LIST has 2 colours for 3 classes"):
        load_class_config(path)
    path.write_text(yaml.safe_dump(SEG_CLASSES.to_dict() | {"VIS_LABEL_MAP": [[0, 0, 300]] * 3}))
    with pytest.raises(SegDataError, match="VIS_LABEL_MAP must be"):
        load_class_config(path)
    fork = {k: v for k, v in SEG_CLASSES.to_dict().items() if k != "IGNORE_COLORS"}  # the fork's three keys
    path.write_text(yaml.safe_dump(fork))
    assert load_class_config(path).ignore_colors == ()


def test_pairing_by_stem_and_its_errors(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)
    for stem in ("b", "a"):
        write_seg_pair(tmp_path / "ok", stem, img, img)
    assert [(i.name, m.name) for i, m in pair_files(tmp_path / "ok")] == [("a.png", "a.png"), ("b.png", "b.png")]
    write_seg_pair(tmp_path / "bad", "a", img, img)
    cv2.imwrite(str(tmp_path / "bad/images/lonely.png"), img)
    cv2.imwrite(str(tmp_path / "bad/masks/orphan.png"), img)
    with pytest.raises(SegDataError, match=r"2 unpaired.*images/lonely\.png.*masks/orphan\.png"):
        pair_files(tmp_path / "bad")
    cv2.imwrite(str(tmp_path / "ok/images/a.jpg"), img)
    with pytest.raises(SegDataError, match="share the stem"):
        pair_files(tmp_path / "ok")
    with pytest.raises(SegDataError, match="missing/masks: folder not found"):
        (tmp_path / "missing/images").mkdir(parents=True)
        pair_files(tmp_path / "missing")


def test_index_masks_keep_255_and_flag_out_of_range_ids(tmp_path):
    arr = np.array([[0, 1, 2], [255, 9, 1]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), arr)
    ids, bad = read_mask(tmp_path / "m.png", "index", SEG_CLASSES)
    assert ids.tolist() == [[0, 1, 2], [IGNORE, IGNORE, 1]] and bad == Counter({"id 9": 1})
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(SegDataError, match="single-channel") as e:
        read_mask(tmp_path / "rgb.png", "index", SEG_CLASSES)
    assert "cannot read mask" not in str(e.value)  # its own message, not re-wrapped as a read failure


def test_joint_augmentation_keeps_image_and_mask_aligned():
    import random

    img = np.zeros((40, 60, 3), np.uint8)
    img[10:30, 5:25] = 200  # a square the mask marks as class 1
    mask = (img[..., 0] > 0).astype(np.uint8)
    for seed in range(10):
        a, m = joint_augment(img, mask, (32, 48), random.Random(seed), (0.5, 2.0), True)
        assert a.shape == (32, 48, 3) and m.shape == (32, 48)
        kernel = np.ones((3, 3), np.uint8)  # away from edges, where bilinear resizing blends the two
        inside = cv2.erode((m == 1).astype(np.uint8), kernel).astype(bool)
        outside = cv2.erode((m == 0).astype(np.uint8), kernel).astype(bool)
        assert inside.any() or outside.any()
        assert (a[..., 0][inside] > 150).all() and (a[..., 0][outside] < 50).all()
        assert (a[m == IGNORE] == 0).all()  # padding: black image, ignored mask


# -- model ----------------------------------------------------------------------------------------------------


def tiny_encoder():
    torch.manual_seed(0)
    return create_encoder("vit_tiny", patch_size=4, img_size=28, depth=2)


@pytest.mark.parametrize("head", ["linear", "decoder"])
def test_non_square_inputs_give_full_resolution_logits(head):
    model = SegmentationModel(tiny_encoder(), 3, head=head, layers=2)
    x = torch.randn(2, 3, 24, 40)
    assert model(x).shape == (2, 3, 24, 40)
    feats = model.features(x)
    assert feats.shape == (2, 2 * 192, 6, 10)
    tokens = model.encoder(x)  # row-major grid: token r * 10 + c is cell (r, c)
    torch.testing.assert_close(feats[:, 192:, 2, 7], tokens[:, 2 * 10 + 7])
    with pytest.raises(ValueError, match="not divisible|multiple"):
        model(torch.randn(1, 3, 25, 40))


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode():
    model = SegmentationModel(tiny_encoder(), 3).train()
    assert not model.encoder.training and model.head.training
    model(torch.randn(2, 3, 16, 20)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    tuned = SegmentationModel(tiny_encoder(), 3, freeze_encoder=False).train()
    tuned(torch.randn(2, 3, 16, 20)).sum().backward()
    assert tuned.encoder.training and tuned.encoder.patch_embed.proj.weight.grad is not None


# -- training, evaluation and inference on a real folder ------------------------------------------------------


def test_train_eval_segment_and_video(tmp_path, capsys):
    seg_scenes(tmp_path / "train", 32, 0)
    seg_scenes(tmp_path / "val", 8, 1)
    train = SegDataset(tmp_path / "train", SEG_CLASSES, "color", (24, 40), train=True, scale=(0.75, 1.25))
    val = SegDataset(tmp_path / "val", SEG_CLASSES, "color", (24, 40), train=False)
    model = SegmentationModel(tiny_encoder(), 3, head="decoder", freeze_encoder=False)
    spec = SegTrainSpec(epochs=6, batch_size=8, lr=3e-3, warmup_epochs=0.5, num_workers=0)
    history = train_segmentation(model, train, spec, torch.device("cpu"))
    assert history[-1]["loss"] < history[0]["loss"]
    res, cm = evaluate_segmentation(model, val, 3, torch.device("cpu"), num_workers=0)
    assert cm.counts.sum() == 8 * 24 * 40 and res["miou"] > 0.4

    ckpt = tmp_path / "seg.pth"
    save_segmenter(ckpt, model, SEG_CLASSES, SegPreprocess(24, 40))
    assert cli(["segment", "--checkpoint", str(ckpt), "--input", str(tmp_path / "val/images"),
                "--output", str(tmp_path / "out")]) == 0  # fmt: skip
    mask = cv2.imread(str(tmp_path / "out/s000_mask.png"))
    assert mask.shape == (24, 40, 3) and (tmp_path / "out/s007_overlay.png").is_file()
    vis = {tuple(c[::-1]) for c in SEG_CLASSES.vis_colors}  # drawn with VIS_LABEL_MAP, BGR on disk
    assert {tuple(p) for p in mask.reshape(-1, 3)} <= vis

    # a 3-frame synthetic video whose size differs from the model input (and is not square)
    video = tmp_path / "clip.mp4"
    w, h = 64, 36
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (w, h))
    for i in range(3):
        writer.write(np.full((h, w, 3), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "clip_seg.mp4"
    assert cli(["segment-video", "--checkpoint", str(ckpt), "--input", str(video), "--output", str(out),
                "--batch-size", "2"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "3 frames 64x36" in printed and "FPS" in printed
    cap = cv2.VideoCapture(str(out))
    assert (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (w, h)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
    assert cli(["segment-video", "--checkpoint", str(ckpt), "--input", str(tmp_path / "none.mp4")]) == 2


def test_class_colour_plots_carry_a_legend(tmp_path):
    from pipeline.outputs import new_figure, save_figure

    fig, axes = new_figure(1, 2, (4, 2))
    for ax in axes.flat:
        ax.imshow(colorize(np.arange(3, dtype=np.uint8).reshape(1, 3), SEG_CLASSES.vis_colors))
    key = [*zip(SEG_CLASSES.names, SEG_CLASSES.vis_colors, strict=True), ("ignore (ground truth)", (255, 255, 255))]
    path = save_figure(fig, tmp_path / "overlays.png", "overlays", legend=key)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*SEG_CLASSES.names, "ignore (ground truth)"]
    colours = [tuple(round(255 * v) for v in h.get_facecolor()[:3]) for h in legend.legend_handles]
    assert colours == [*map(tuple, SEG_CLASSES.vis_colors), (255, 255, 255)]
    assert path.stat().st_size > 1000


def test_an_unknown_lr_schedule_is_refused_before_any_training():
    """The one schedule function knows cosine and poly decay; any other name is one line, before a step runs."""
    with pytest.raises(ValueError, match=r"schedule must be 'poly' or 'cosine', got 'step'"):
        train_segmentation(None, None, SegTrainSpec(schedule="step"), torch.device("cpu"))
