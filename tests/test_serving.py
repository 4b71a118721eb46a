"""The served models' input contract: RGB values 0-255 as uint8 or as integers in any numeric dtype."""

from __future__ import annotations

import pytest
import torch

from ijepa import create_encoder
from ijepa.finetune import Classifier
from ijepa.serving import served


def test_served_models_take_integers_0_255_in_any_dtype_and_refuse_the_rest():
    torch.manual_seed(0)
    clf = served("classifier", Classifier(create_encoder("vit_tiny", patch_size=4, img_size=16, depth=1), 3))
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    probs = clf(images)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    for dtype in (torch.float32, torch.float64, torch.int64):  # what MLflow hands over from JSON or numpy
        torch.testing.assert_close(clf(images.to(dtype)), probs)
    with pytest.raises(RuntimeError, match=r"expected RGB values as integers 0-255 .*scaled to 0-1 or normalised\?"):
        clf(images.float() / 255)
    one_off = images.float()
    one_off[0, 0, 0, 0] = -1  # one value out of range
    with pytest.raises(RuntimeError, match=r"expected RGB values as integers 0-255"):
        clf(one_off)
    with pytest.raises(ValueError, match=r"expected RGB images \(B, H, W, 3\), got shape \(2, 16, 16\)"):
        clf(images[..., 0])
    enc = served("encoder", create_encoder("vit_tiny", patch_size=4, img_size=16, depth=1))
    assert enc(images.float()).shape == (2, 192)


@pytest.mark.parametrize("kind", ["encoder", "classifier", "segmenter"])
def test_served_models_load_back_from_their_export_and_predict_the_same(kind, tmp_path):
    """MLflow logs each model as a torch.export program and loads it back to serve it (and to check the input
    example): the program saved and loaded predicts what the module predicts. The segmenter's frozen-encoder grad
    switch once put a node in the program that the loader refuses, so the registered segmenter could not serve."""
    from ijepa.seg.model import SegmentationModel

    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=4, img_size=16, depth=1)
    model = {"encoder": enc, "classifier": Classifier(enc, 3), "segmenter": SegmentationModel(enc, 5)}[kind]
    module = served(kind, model)
    images = torch.randint(0, 256, (2, 16, 16, 3)).float()
    torch.export.save(torch.export.export(module, (images,)), tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    torch.testing.assert_close(loaded(images), module(images))
