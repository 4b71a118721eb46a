"""Downstream: pooling, the probe grid's selection, k-NN and retrieval on toy data with known answers,
layer-wise lr decay, gradient accumulation, classify on a folder, and every stage on an official file."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa import create_encoder
from ijepa.eval.features import extract_features, pooled_features
from ijepa.eval.knn import knn_accuracy, knn_classify
from ijepa.eval.linear import train_linear_grid
from ijepa.eval.search import SearchIndex, retrieval_metrics
from ijepa.finetune import (
    Classifier,
    MixTargets,
    Preprocess,
    accumulate_step,
    evaluate,
    fit_head,
    load_classifier,
    param_groups_lrd,
    save_classifier,
    set_lr,
)


def tiny_encoder(depth=4, img=16, patch=4):
    torch.manual_seed(0)
    return create_encoder("vit_tiny", patch_size=patch, img_size=img, depth=depth).eval()


def test_pooled_features_shapes_and_definition():
    enc = tiny_encoder()
    x = torch.randn(3, 3, 16, 16)
    f = pooled_features(enc, x)
    assert f["avg_last"].shape == (3, 192) and f["avg_last4"].shape == (3, 4 * 192)
    with torch.no_grad():
        assert torch.allclose(f["avg_last"], enc(x).mean(1), atol=1e-5)
        layers = enc.get_intermediate_layers(x, n=4)
    assert torch.allclose(f["avg_last4"][:, :192], layers[0].mean(1), atol=1e-5)
    assert torch.allclose(f["avg_last4"][:, -192:], f["avg_last"])
    assert pooled_features(tiny_encoder(depth=1), x)["avg_last4"].shape == (3, 768)  # shallow: repeats


def test_extract_features_sorts_by_key_and_shares_batches():
    enc, other = tiny_encoder(), tiny_encoder(depth=2)
    x = torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8)
    batches = [(x[:2], torch.tensor([1, 0]), ["k3", "k1"]), (x[2:], torch.tensor([2, 1]), ["k0", "k2"])]
    out = extract_features(
        {"a": enc, "b": other},
        batches,
        prepare=lambda b: b.permute(0, 3, 1, 2).float() / 255,
        device=torch.device("cpu"),
        pixel_size=4,
    )
    assert out["a"]["keys"] == ["k0", "k1", "k2", "k3"] and out["a"]["labels"].tolist() == [2, 0, 1, 1]
    assert out["b"]["avg_last"].shape == (4, 192) and out["pixels"]["pixels"].shape == (4, 3 * 4 * 4)
    ref = pooled_features(enc, x[2:3].permute(0, 3, 1, 2).float() / 255)["avg_last"]
    assert torch.allclose(out["a"]["avg_last"][0], ref[0], atol=1e-5)  # k0 is the third image


def test_probe_grid_chooses_on_validation_only():
    g = torch.Generator().manual_seed(0)
    n, d, c = 300, 8, 3

    def split(signal_in: str):
        y = torch.randint(0, c, (n,), generator=g)
        signal = torch.nn.functional.one_hot(y, c).float().repeat(1, 3)[:, :d] * 3 + 0.3 * torch.randn(
            n, d, generator=g
        )
        noise = torch.randn(n, d, generator=g)
        good, bad = (signal, noise) if signal_in == "good" else (noise, signal)
        return {"avg_last": good, "avg_last4": bad}, y

    feats, labels = {}, {}
    for s, where in (("train", "good"), ("val", "good"), ("test", "bad")):  # test swaps the informative pooling
        feats[s], labels[s] = split(where)
    r = train_linear_grid(
        feats, labels, num_classes=c, poolings=["avg_last", "avg_last4"], lrs=[0.01, 0.1], epochs=20, batch_size=64
    )
    best = next(row for row in r["table"] if row["head"] == r["best"])
    assert best["pooling"] == "avg_last" and best["val_top1"] == max(row["val_top1"] for row in r["table"])
    assert r["test_top1"] == best["test_top1"] < 0.6  # reported, not used to choose ...
    assert max(row["test_top1"] for row in r["table"]) > r["test_top1"]  # ... though another head wins on test
    with pytest.raises(ValueError, match="needs 'train' and 'val'"):
        train_linear_grid({"train": feats["train"]}, labels, num_classes=c, poolings=["avg_last"], lrs=[0.1])


def test_knn_known_answer():
    deg = math.radians
    train = torch.tensor([[1.0, 0.0], [math.cos(deg(10)), math.sin(deg(10))], [math.cos(deg(20)), math.sin(deg(20))]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 0.0]])  # same direction as the class-0 point: cosine ignores the norm
    scores = knn_classify(train, labels, q, num_classes=2, ks=(1, 3), temperature=0.07)
    assert scores[1].argmax(1).item() == 0
    # k=3: class 1 gets exp(cos10/T) + exp(cos20/T) > exp(1/T) for class 0
    w = [math.exp(math.cos(deg(a)) / 0.07) for a in (0, 10, 20)]
    assert torch.allclose(scores[3][0], torch.tensor([w[0], w[1] + w[2]]), rtol=1e-4)
    assert scores[3].argmax(1).item() == 1
    acc = knn_accuracy(train, labels, train, labels, num_classes=2, ks=(1,))
    assert acc == {1: 1.0}


def test_retrieval_metrics_on_a_toy_index():
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    index = SearchIndex(gallery, ["a", "b", "c"], torch.tensor([0, 1, 0]), ["a.png", "b.png", "c.png"])
    queries = torch.tensor([[1.0, 0.1], [0.9, 0.5]])
    # query 0 ranks a, b, c -> relevance (label 0) 1, 0, 1: AP = (1/1 + 2/3) / 2
    # query 1 (label 1) ranks b, a, c -> relevance 1, 0, 0: AP = 1
    m = retrieval_metrics(index, queries, torch.tensor([0, 1]), ks=(1, 2))
    assert m["recall@1"] == 1.0 and m["recall@2"] == 1.0
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    m = retrieval_metrics(index, queries[:1], torch.tensor([1]), ks=(1, 2))
    assert m["recall@1"] == 0.0 and m["recall@2"] == 1.0 and m["map"] == pytest.approx(0.5)
    scores, idx = index.search(queries, k=2)
    assert idx.tolist() == [[0, 1], [1, 0]] and scores[0, 0] > scores[0, 1]


def test_layer_wise_decay_gives_each_block_its_lr():
    model = Classifier(tiny_encoder(depth=3), 5)
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr(opt, 2.0)
    lr_of = {name: g["lr"] for g in opt.param_groups for name in g["names"]}
    assert lr_of["encoder.patch_embed.proj.weight"] == pytest.approx(2.0 * 0.5**4)
    for i in range(3):
        assert lr_of[f"encoder.blocks.{i}.attn.qkv.weight"] == pytest.approx(2.0 * 0.5 ** (3 - i))
    assert lr_of["head.weight"] == 2.0 and lr_of["encoder.norm.weight"] == 2.0
    decay = {name: g["weight_decay"] for g in opt.param_groups for name in g["names"]}
    assert decay["encoder.blocks.0.attn.qkv.weight"] == 0.05 and decay["encoder.blocks.0.attn.qkv.bias"] == 0.0
    assert "encoder.pos_embed" not in lr_of  # frozen sin-cos table


def test_accumulation_over_four_steps_equals_one_big_batch():
    model = Classifier(tiny_encoder(depth=2), 4)
    twin = copy.deepcopy(model)
    x = torch.randn(16, 3, 16, 16)
    t = MixTargets(4, mixup=0.0, cutmix=0.0, label_smoothing=0.1)(x, torch.arange(16) % 4)[1]
    cpu = torch.device("cpu")
    # plain SGD: the update is the accumulated gradient itself (Adam's first step is ~lr * sign(g), which
    # would magnify float noise in near-zero gradients)
    opt_a = torch.optim.SGD(model.parameters(), lr=1.0)
    opt_b = torch.optim.SGD(twin.parameters(), lr=1.0)
    loss_a = accumulate_step(model.train(), opt_a, [(x[i : i + 4], t[i : i + 4]) for i in range(0, 16, 4)], device=cpu)
    loss_b = accumulate_step(twin.train(), opt_b, [(x, t)], device=cpu)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for (n, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n
    mixed_x, mixed_t = MixTargets(4, mixup=0.8, cutmix=1.0, label_smoothing=0.1)(x, torch.arange(16) % 4)
    assert mixed_x.shape == x.shape and torch.allclose(mixed_t.sum(1), torch.ones(16))


def test_lp_ft_fits_the_head_alone_and_repeats_exactly():
    """LP-FT's first phase: only the head moves, the frozen features are linearly separable here (one colour per
    class), so the fitted head classifies them, and a second run from the same start gives the same head."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 3
    images = torch.randint(0, 60, (48, 16, 16, 3), dtype=torch.uint8, generator=g)
    images[torch.arange(48), :, :, labels] += 180  # class c: channel c bright
    batches = [(images[i : i + 16], labels[i : i + 16], [str(j) for j in range(i, i + 16)]) for i in range(0, 48, 16)]
    prepare = lambda x: x.permute(0, 3, 1, 2).float() / 255  # noqa: E731
    model = Classifier(tiny_encoder(depth=2), 3)
    start = copy.deepcopy(model.state_dict())
    cpu = torch.device("cpu")
    before = evaluate(model, batches, prepare=prepare, device=cpu)["loss"]  # MAE's near-zero head: ~ln 3
    fit = fit_head(model, batches, prepare=prepare, device=cpu, steps=100, lr=0.05)
    assert fit["train_top1"] == 1.0 and before > 1.0 and fit["train_loss"] < 0.5
    assert evaluate(model, batches, prepare=prepare, device=cpu)["top1"] == 1.0
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert moved == {"head.weight", "head.bias"}
    twin = Classifier(tiny_encoder(depth=2), 3)
    twin.load_state_dict(start)
    assert fit_head(twin, batches, prepare=prepare, device=cpu, steps=100, lr=0.05) == fit
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="no samples"):
        fit_head(twin, [], prepare=prepare, device=cpu, steps=1, lr=0.05)


def test_classify_a_folder_with_class_names_from_the_checkpoint(tmp_path, capsys):
    from ijepa.cli import main

    model = Classifier(tiny_encoder(depth=1), 3)
    ckpt = tmp_path / "classifier.pth"
    save_classifier(ckpt, model, ["apple", "banana", "cherry"], Preprocess(16, 16))
    loaded, names, pre = load_classifier(ckpt)
    assert names == ["apple", "banana", "cherry"] and pre.crop_size == 16
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.jpg", "c.png"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    assert (
        main(
            [
                "classify",
                "--checkpoint",
                str(ckpt),
                "--input",
                str(folder),
                "--output",
                str(out),
                "--annotate",
                str(tmp_path / "annotated"),
            ]
        )
        == 0
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["path"].split("/in/")[1] for r in rows] == ["a.png", "broken.png", "c.png", "sub/b.jpg"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["prediction"] in names for r in ok)
    assert rows[1]["status"] == "not a decodable image" and "skipping" in capsys.readouterr().err
    with torch.no_grad():  # the CLI's preprocessing equals the evaluation loaders'
        from ijepa.inference import preprocess_batch, read_bgr

        x = preprocess_batch([read_bgr(folder / "a.png")], pre, torch.device("cpu"))
        p = loaded(x).softmax(1)[0]
    assert float(ok[0]["probability"]) == pytest.approx(float(p.max()), abs=1e-4)
    assert (tmp_path / "annotated/sub/b.png").is_file()
    assert main(["classify", "--checkpoint", str(ckpt), "--input", str(tmp_path / "nope")]) == 2


# -- attentive probe and low-shot --------------------------------------------------------------------------


def _direct_attentive(probe, tokens):
    """V-JEPA's cross-attention block written the direct way: project every token to keys and values."""
    from torch.nn import functional as F

    b, n, d = tokens.shape
    h = probe.num_heads
    x = probe.norm1(tokens)
    q = probe.q(probe.query).view(1, 1, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)
    k, v = probe.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, d)
    out = probe.query + probe.proj(out)
    return probe.head(out + probe.mlp(probe.norm2(out)))


def test_attentive_probe_matches_the_direct_cross_attention():
    from ijepa.eval.attentive import AttentiveProbe

    torch.manual_seed(0)
    probe = AttentiveProbe(48, 7, num_heads=4)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(0.05 * torch.randn_like(p))  # biases away from zero, so their handling is tested too
    tokens = torch.randn(5, 13, 48, requires_grad=True)
    fast, direct = probe(tokens), _direct_attentive(probe, tokens)
    assert torch.allclose(fast, direct, atol=1e-5)
    g_fast = torch.autograd.grad(fast.square().sum(), [tokens, *probe.parameters()])
    g_direct = torch.autograd.grad(direct.square().sum(), [tokens, *probe.parameters()])
    for a, b in zip(g_fast, g_direct, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(probe(probe.standardise(tokens), standardised=True), direct, atol=1e-5)
    assert probe.attention_weights(tokens).sum(-1).allclose(torch.ones(5, 4))


def _needle_tokens(n: int, seed: int, length: int = 16, dim: int = 12, classes: int = 4):
    """The class lives in one token at a random place (marked in dim 0); the other tokens are noise."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    where = torch.randint(0, length, (n,), generator=g)
    tokens[torch.arange(n), where, 0] = 6.0
    tokens[torch.arange(n), where, 1 : 1 + classes] += 3.0 * torch.nn.functional.one_hot(labels, classes)
    return tokens.half(), labels


def test_attentive_probe_reads_the_token_that_average_pooling_dilutes():
    from ijepa.eval.attentive import train_attentive_probe

    data = {s: _needle_tokens(n, i) for i, (s, n) in enumerate((("train", 800), ("val", 200), ("test", 200)))}
    tokens, labels = {s: t for s, (t, _) in data.items()}, {s: y for s, (_, y) in data.items()}
    res = train_attentive_probe(tokens, labels, num_classes=4, lrs=[1e-3, 1e-2], num_heads=4, epochs=15, batch_size=64)
    assert len(res["table"]) == 2 and res["best"] in {"attentive_lr0.001", "attentive_lr0.01"}
    mean = {s: {"avg": t.float().mean(1)} for s, t in tokens.items()}
    lin = train_linear_grid(mean, labels, num_classes=4, poolings=["avg"], lrs=[0.01, 0.1, 1.0], epochs=50)
    assert res["test_top1"] > 0.85 and res["test_top1"] > lin["test_top1"] + 0.2, (res["test_top1"], lin["test_top1"])


def test_stratified_subsets_are_seeded_and_balanced():
    from ijepa.eval.lowshot import protocols, stratified_subset

    labels = torch.arange(300) % 3
    a = stratified_subset(labels, seed=0, per_class=5)
    assert len(a) == 15 and torch.bincount(labels[a]).tolist() == [5, 5, 5]
    assert torch.equal(a, stratified_subset(labels, seed=0, per_class=5))
    assert not torch.equal(a, stratified_subset(labels, seed=1, per_class=5))
    assert torch.bincount(labels[stratified_subset(labels, seed=0, fraction=0.1)]).tolist() == [10, 10, 10]
    with pytest.raises(ValueError, match="class 0 has 100 training images, fewer than the 101"):
        stratified_subset(labels, seed=0, per_class=101)
    assert protocols([1, 5], [0.01]) == {
        "1pct": {"fraction": 0.01},
        "1shot": {"per_class": 1},
        "5shot": {"per_class": 5},
    }


def test_lowshot_probe_learns_from_a_few_images_per_class():
    from ijepa.eval.lowshot import lowshot_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3

    def split(n):
        y = torch.arange(n) % 4
        return {"avg_last": centres[y] + torch.randn(n, 16, generator=g), "labels": y}

    feats = {"train": split(400), "val": split(100), "test": split(200)}
    r = lowshot_probe(feats, num_classes=4, protocol={"per_class": 2}, subsets=3, poolings=["avg_last"],
                      lrs=[0.1], epochs=30, batch_size=64)  # fmt: skip
    assert r["train_images"] == 8 and len(r["test_top1"]) == 3 and r["mean"] > 0.9
    assert r["sd"] == pytest.approx(float(torch.tensor(r["test_top1"]).std()), abs=1e-9)


def test_the_index_finds_its_encoder_from_a_relative_path(tmp_path, monkeypatch):
    """The stages record the checkpoint relative to the repository: found from the working directory, else from
    the folders holding the index; an absolute path stays as recorded."""
    repo = tmp_path / "clone"
    (repo / "models/pretrain").mkdir(parents=True)
    (repo / "models/pretrain/enc.pth.tar").write_bytes(b"x")
    index = SearchIndex(torch.eye(2), ["a", "b"], torch.tensor([0, 1]), ["a", "b"],
                        {"checkpoint": "models/pretrain/enc.pth.tar"})  # fmt: skip
    index.save(repo / "models/search/index.pt")
    monkeypatch.chdir(tmp_path)
    loaded = SearchIndex.load(repo / "models/search/index.pt")
    assert loaded.encoder_checkpoint(repo / "models/search/index.pt") == repo / "models/pretrain/enc.pth.tar"
    monkeypatch.chdir(repo)
    assert loaded.encoder_checkpoint("models/search/index.pt") == Path("models/pretrain/enc.pth.tar")
    loaded.meta["checkpoint"] = "/elsewhere/enc.pth.tar"
    assert loaded.encoder_checkpoint("models/search/index.pt") == Path("/elsewhere/enc.pth.tar")
