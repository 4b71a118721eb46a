"""Every user mistake ends in one line on stderr that names the file, key or argument, exit code 2, and no
traceback; huge images are refused before they are decoded; outputs never overwrite inputs. Each case runs the
real command (``python -m ijepa.cli`` or ``python -m stages.<name>``) in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ijepa import create_encoder
from ijepa.errors import ImageReadError
from ijepa.finetune import Classifier, Preprocess, save_classifier
from ijepa.images import MAX_PIXELS, image_size, read_bgr
from ijepa.seg.data import SegClasses, SegDataError, read_image_bgr
from ijepa.seg.model import SegmentationModel, SegPreprocess, save_segmenter
from ijepa.seg.synth import class_config

from .helpers import FOLDER_CLASSES, make_folder, official_checkpoint

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parent.parent
BOMB_SIDE = 30000  # 900 Mpixels: 2.7 GB as BGR, in a file under 1 MB


def write_png_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid 8-bit grey PNG of side x side black pixels, compressed row block by row block (never in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp, rows = zlib.compressobj(9), b"\0" * (side + 1) * 200  # each row: filter byte + pixels
    body = [comp.compress(rows) for _ in range(side // 200)] + [comp.flush()]
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")
    )
    return path


def run(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=300,
        env={**base, "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})},
    )  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess, prefix: str, *names: str) -> str:
    """Exit code 2, no traceback, and a last stderr line starting with ``prefix`` that holds every name."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), last
    for name in names:
        assert str(name) in last, (name, last)
    return last


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return run("-m", "ijepa.cli", *args, **kw)


def run_many(tmp: Path, *cases: dict, path: Path | None = None) -> list[SimpleNamespace]:
    """``cases`` ({"module", "args", "cwd", "env"}) run one after another in one interpreter (tests/commands.py),
    each with its own working directory, environment, exit code and captured stdout and stderr (``path``: one
    more folder to import modules from)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cases.json").write_text(json.dumps([{"cwd": None, "env": {}} | c for c in cases], default=str))
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{path}"} if path else None
    r = run(str(ROOT / "tests/commands.py"), str(tmp / "cases.json"), str(tmp / "results.json"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [SimpleNamespace(**res) for res in json.loads((tmp / "results.json").read_text())]


def cli_case(*args: str) -> dict:
    return {"module": "ijepa.cli", "args": list(args)}


def stage_case(name: str, folder: Path, **env) -> dict:
    return {"module": f"stages.{name}", "args": [], "cwd": str(folder), "env": env}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=4, img_size=16, depth=1)
    save_classifier(root / "classifier.pth", Classifier(enc, 3), ["a", "b", "c"], Preprocess(16, 16))
    classes = SegClasses.from_dict(class_config())
    seg = SegmentationModel(enc, len(classes.names))
    save_segmenter(root / "seg.pth", seg, classes, SegPreprocess(16, 16))
    official_checkpoint(root / "pretrain.pth.tar")
    (root / "notes.txt").write_text("not a checkpoint, not an image, not a video\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.png", "y.jpg"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / name)
    write_png_bomb(root / "bomb.png")
    return root


def test_the_command_runner_keeps_each_command_apart(tmp_path):
    """tests/commands.py: each command's exit code, output and traceback are its own, as in a process of its own."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "crash.py").write_text("import os, sys\nos.write(2, b'from C\\n')\nprint('out')\nraise KeyError('boom')\n")
    (mod / "quits.py").write_text("import os, sys\nprint(os.getcwd(), os.environ['WHO'])\nsys.exit('bye')\n")
    r = run_many(
        tmp_path / "run", {"module": "crash", "args": []},
        {"module": "quits", "args": [], "cwd": str(tmp_path), "env": {"WHO": "me"}},
        {"module": "ijepa.cli", "args": ["--help"]}, path=mod,
    )  # fmt: skip
    assert r[0].returncode == 1 and r[0].stdout == "out\n" and "from C" in r[0].stderr
    assert "Traceback" in r[0].stderr and "KeyError: 'boom'" in r[0].stderr
    assert (r[1].returncode, r[1].stdout, r[1].stderr) == (1, f"{tmp_path} me\n", "bye\n")
    assert r[2].returncode == 0 and "usage: ijepa" in r[2].stdout and r[2].stderr == ""


# -- the ijepa command ---------------------------------------------------------------------------------------


def test_cli_mistakes_are_one_line(files, tmp_path):
    r = run_many(
        tmp_path,
        cli_case("inspect", str(files / "notes.txt")),
        cli_case("search", "--query", str(files / "images/x.png"), "--k", "-1"),
        cli_case("search", "--index", str(files / "pretrain.pth.tar"), "--query", str(files / "images/x.png")),
        cli_case("search", "--index", str(files / "pretrain.pth.tar"), "--query", str(files / "images/missing.png")),
        cli_case("segment-video", "--checkpoint", str(files / "seg.pth"), "--input", str(files / "notes.txt")),
        cli_case("classify", "--checkpoint", str(files / "pretrain.pth.tar"), "--input", str(files / "images")),
        cli_case("classify", "--checkpoint", str(files / "classifier.pth"), "--input", str(files / "nope")),
    )
    one_line_error(r[0], "ijepa inspect: error: ", files / "notes.txt", "not a torch checkpoint")
    assert r[1].returncode == 2 and "Traceback" not in r[1].stderr
    assert "--k: must be at least 1, got -1" in r[1].stderr
    one_line_error(r[2], "ijepa search: error: ", files / "pretrain.pth.tar", "is not a search index")
    one_line_error(r[3], "ijepa search: error: ", "--query", files / "images/missing.png")
    one_line_error(r[4], "ijepa segment-video: error: ", files / "notes.txt", "cannot open it as a video")
    assert not list(files.glob("notes*.mp4"))  # no partial output left behind
    one_line_error(r[5], "ijepa classify: error: ", files / "pretrain.pth.tar", "is not a finetuned classifier")
    one_line_error(r[6], "ijepa classify: error: ", files / "nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(files):
    r = cli("classify", "--checkpoint", str(files / "classifier.pth"), "--input", str(files / "images"),
            "--output", str(files / "p.csv"), "--device", "cuda")  # fmt: skip
    one_line_error(r, "ijepa classify: error: ", "device 'cuda'", "no usable CUDA GPU")


def test_outputs_never_land_on_inputs(files, tmp_path):
    video = files / "clip.mp4"
    video.write_bytes(b"placeholder")  # refused before it is opened
    r = run_many(
        tmp_path,
        cli_case("segment-video", "--checkpoint", str(files / "seg.pth"), "--input", str(video),
                 "--output", str(video)),
        cli_case("classify", "--checkpoint", str(files / "classifier.pth"), "--input", str(files / "images"),
                 "--output", str(files / "p.csv"), "--annotate", str(files / "images/annotated")),
        cli_case("segment", "--checkpoint", str(files / "seg.pth"), "--input", str(files / "images"),
                 "--output", str(files / "images")),
    )  # fmt: skip
    one_line_error(r[0], "ijepa segment-video: error: ", "--output", "is the input video")
    assert video.read_bytes() == b"placeholder"
    one_line_error(r[1], "ijepa classify: error: ", "--annotate", "inside the input folder")
    one_line_error(r[2], "ijepa segment: error: ", "--output", "inside the input folder")
    assert sorted(p.name for p in (files / "images").iterdir()) == ["x.png", "y.jpg"]


# -- images above the pixel limit ------------------------------------------------------------------------------


def test_a_pixel_bomb_is_refused_before_decoding(files, tmp_path):
    bomb = files / "bomb.png"
    assert bomb.stat().st_size < 1_000_000 and BOMB_SIDE**2 > MAX_PIXELS
    assert image_size(bomb) == (BOMB_SIDE, BOMB_SIDE)  # from the header alone
    with pytest.raises(ImageReadError, match=f"{BOMB_SIDE}x{BOMB_SIDE} pixels, above the limit of {MAX_PIXELS}"):
        read_bgr(bomb)
    with pytest.raises(SegDataError, match="above the limit"):  # the segmentation folders' reader too
        read_image_bgr(bomb)
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("x.png", "y.jpg"):
        (folder / name).write_bytes((files / "images" / name).read_bytes())
    (folder / "bomb.png").write_bytes(bomb.read_bytes())
    out = tmp_path / "p.csv"
    # peak memory of the classify process, measured through its parent's rusage
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr)"
    )
    r = run("-c", probe, sys.executable, "-m", "ijepa.cli", "classify", "--checkpoint", str(files / "classifier.pth"),
            "--input", str(folder), "--output", str(out), "--batch-size", "2")  # fmt: skip
    code, peak_kib = map(int, r.stdout.split("\n", 1)[0].split())
    assert code == 0, r.stdout
    assert peak_kib < 1_500_000, f"classify peaked at {peak_kib / 1024:.0f} MiB"  # decoding it: 2.7 GB
    rows = out.read_text().splitlines()
    bomb_row = next(line for line in rows if "bomb.png" in line)
    assert f"{BOMB_SIDE}x{BOMB_SIDE} pixels, above the limit" in bomb_row
    assert sum(",ok," in line for line in rows) == 2 and "bomb.png" in r.stdout  # listed on stderr too
    r = cli("search", "--query", str(bomb))
    one_line_error(r, "ijepa search: error: ", bomb, "above the limit")


# -- the stages ------------------------------------------------------------------------------------------------


def stage_dir(tmp_path: Path, **changes) -> Path:
    """A project folder holding only params.yaml (the project's, with ``changes`` at dotted keys)."""
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    for dotted, value in changes.items():
        *head, last = dotted.split("__")
        d = params
        for k in head:
            d = d[k]
        d[last] = value
    tmp_path.mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def stage(name: str, folder: Path, **env) -> subprocess.CompletedProcess:
    return run("-m", f"stages.{name}", cwd=folder, env=env)


def test_prepare_mistakes_are_one_line(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    src = {"kind": "image_folder", "dir": None, "train_dir": str(flat), "test_dir": None}
    broken = tmp_path / "broken"
    for name in FOLDER_CLASSES:
        (broken / name).mkdir(parents=True)
        for i in range(2):
            (broken / name / f"x{i}.jpg").write_bytes(b"")
    good = make_folder(tmp_path / "good", per_class=2)
    work = [
        stage_dir(tmp_path / "w1", prepare__source=src, tracking__enabled=False),
        stage_dir(
            tmp_path / "w2", prepare__source=src | {"train_dir": str(broken)}, prepare__val_fraction=0.5,
            tracking__enabled=False,
        ),
        stage_dir(
            tmp_path / "w3", prepare__source=src | {"train_dir": str(good), "test_dir": str(tmp_path / "val")},
            tracking__enabled=False,
        ),
        # splits too small for the probes: refused before any shard is written, naming the split, the images per
        # class it would get and the setting
        stage_dir(tmp_path / "w4", prepare__source=src | {"train_dir": str(good)}, tracking__enabled=False),
        stage_dir(tmp_path / "w5", prepare__source=src | {"train_dir": str(good)}, prepare__val_fraction=0.0),
    ]  # fmt: skip
    r = run_many(tmp_path / "run", *(stage_case("prepare", w) for w in work))
    one_line_error(r[0], "prepare: error: ", flat, "no class sub-folders")
    one_line_error(r[1], "prepare: error: ", "no usable image", "empty file")
    one_line_error(r[2], "prepare: error: ", "prepare.source.test_dir", tmp_path / "val")
    assert not (work[2] / "data").exists()
    one_line_error(
        r[3], "prepare: error: prepare.val_fraction: split 'val' would get 0 images per class",
        "for 3 of 3 classes", "val_fraction 0.1667 of 2 images rounds to 0", "raise it to at least 0.5",
    )  # fmt: skip
    assert not (work[3] / "data").exists()
    one_line_error(r[4], "prepare: error: prepare.val_fraction: 0 carves no validation split")


def test_stage_mistakes_are_one_line(tmp_path, files):
    # seg_prepare checking real folders, one mask of which is not an image
    seg = tmp_path / "seg"
    for split in ("train", "val"):
        (seg / split / "images").mkdir(parents=True)
        (seg / split / "masks").mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(seg / split / "images/s0.png")
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(seg / split / "masks/s0.png")
    (seg / "val/masks/s0.png").write_text("not a png")
    (seg / "classes.yaml").write_text(yaml.safe_dump(class_config()))
    cases = [
        stage_case("finetune", stage_dir(tmp_path / "w1", finetune__checkpoint="models/none.pth.tar",
                                         tracking__enabled=False)),
        stage_case("pretrain", stage_dir(tmp_path / "w2", optim__lr=float("inf"))),
        stage_case("seg_prepare", stage_dir(
            tmp_path / "w4", seg_prepare__kind="folders", seg_data__train_dir=str(seg / "train"),
            seg_data__val_dir=str(seg / "val"), seg_data__classes=str(seg / "classes.yaml"), tracking__enabled=False,
        )),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(stage_case("extract", stage_dir(tmp_path / "w3", extract__device="cuda", tracking__enabled=False)))
    r = run_many(tmp_path / "run", *cases)
    one_line_error(r[0], "finetune: error: ", "models/none.pth.tar", "does not exist")
    one_line_error(r[1], "pretrain: error: ", "optim.lr", "finite")
    one_line_error(r[2], "seg_prepare: error: ", seg / "val/masks/s0.png", "cannot read mask")
    if not torch.cuda.is_available():
        one_line_error(r[3], "extract: error: ", "device 'cuda'")


def test_a_read_only_tracking_store_fails_before_work(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").create_experiment("ijepa", artifact_location=(tmp_path / "mlruns").as_uri())
    work = stage_dir(tmp_path / "w")
    uri = f"sqlite:///file:{db}?mode=ro&uri=true"  # the store opened read-only (root ignores file modes)
    last = one_line_error(stage("prepare", work, MLFLOW_TRACKING_URI=uri), "prepare: error: ", uri, "read-only")
    assert "readonly database" in last and not (work / "data").exists()
