"""Input sources for the prepare step: ImageFolder trees and Fashion-MNIST idx files, plus image sanitising.

Every input image either becomes clean bytes (JPEG kept as it is when it is valid RGB or grey; anything
else converted to 8-bit RGB or grey and stored as PNG) or is skipped with a reason. Nothing is dropped
silently and nothing crashes the caller.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif"}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Where the project's set-up puts the Debian package (apt-get as root, else unpacked into the project).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "data/debian/usr/share/datasets/fashion-mnist")


class SkipImage(Exception):
    """An input that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Clean:
    """A usable image: encoded bytes, their WebDataset extension, size and what was done to it."""

    data: bytes
    ext: str  # "jpg" or "png"
    width: int
    height: int
    note: str  # "" when stored unchanged


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in (np.uint16, np.int32, np.uint32, np.int64) and arr.max(initial=0) <= 65535:
        return (arr.astype(np.float64) / 257.0).round().clip(0, 255).astype(np.uint8)  # 16-bit -> 8-bit
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
    return ((arr.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)


def _convert(im: Image.Image) -> tuple[Image.Image, str]:
    """Any PIL mode -> 8-bit "L" or "RGB"; alpha is composited over black. Returns (image, note)."""
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im)), mode="L"), f"{mode} -> 8-bit grey"
    if mode == "1":
        return im.convert("L"), "1-bit -> grey"
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "RGB":
            return im, "palette -> RGB"
        mode = "P+alpha"
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (0, 0, 0))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out, f"{mode} alpha composited over black"
    if im.mode == "CMYK":
        return im.convert("RGB"), "CMYK -> RGB"
    if im.mode in ("L", "RGB"):
        return im, ""
    return im.convert("RGB"), f"{im.mode} -> RGB"


def sanitize_image(data: bytes) -> Clean:
    """Validate and normalise one encoded image.

    Returns:
        ``Clean``: valid RGB/grey JPEGs unchanged; everything else converted and PNG-encoded.
    Raises:
        SkipImage: empty, not an image, corrupt or truncated, or undecodable by OpenCV.
    """
    if not data:
        raise SkipImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            im.load()  # full decode: truncated files fail here
    except UnidentifiedImageError:
        raise SkipImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SkipImage(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as e:
        raise SkipImage(f"corrupt or truncated image: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise SkipImage(f"image has no pixels ({w}x{h})")
    if fmt == "JPEG" and im.mode in ("RGB", "L"):
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
            raise SkipImage("JPEG that OpenCV cannot decode")
        return Clean(data, "jpg", w, h, "")
    im, note = _convert(im)
    # An 8-bit RGB or grey PNG is re-encoded (deterministically) but not converted: no note.
    return Clean(encode_png(np.asarray(im)), "png", w, h, note or ("" if fmt == "PNG" else f"{fmt} stored as PNG"))


def encode_png(arr: np.ndarray) -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG bytes (deterministic)."""
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {arr.shape}")
    return buf.tobytes()


@dataclass(frozen=True)
class FolderScan:
    """An ImageFolder tree: class names (sorted), (relative path, class index) items, warnings, skips."""

    classes: list[str]
    items: list[tuple[str, int]]
    warnings: list[str]
    skipped: list[dict]


def _list_files(folder: Path, root: Path) -> tuple[list[Path], list[dict]]:
    """Regular files under ``folder`` (sorted), following symlinked folders; what is left out is returned as
    ``{"path" (relative to root), "reason"}``: hidden entries, broken symlinks, symlinks to a folder already
    listed (a loop or a duplicate) and anything that is not a regular file."""
    files, skipped, seen, stack = [], [], {os.path.realpath(folder)}, [folder]
    while stack:
        current = stack.pop()
        for entry in sorted(os.scandir(current), key=lambda e: e.name):
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.name.startswith("."):
                skipped.append({"path": rel, "reason": "hidden file or folder (name starts with '.')"})
            elif entry.is_symlink() and not path.exists():
                skipped.append({"path": rel, "reason": "broken symlink (its target does not exist or loops)"})
            elif entry.is_dir():
                real = os.path.realpath(path)
                if real in seen:
                    reason = f"symlink to a folder already listed ({real}): a loop or a duplicate"
                    skipped.append({"path": rel, "reason": reason})
                else:
                    seen.add(real)
                    stack.append(path)
            elif entry.is_file():
                files.append(path)
            else:
                skipped.append({"path": rel, "reason": "not a regular file"})
    return sorted(files), skipped


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> FolderScan:
    """List ``root/<class>/**/<image>`` files.

    Args:
        root: the split folder (e.g. ImageNet ``train/``).
        classes: the class list to use (e.g. from the train split); a folder not in it is an error.
    Returns:
        ``FolderScan``; files with non-image extensions, hidden entries, broken symlinks and symlink loops are
        listed as skipped with their reason, empty classes as warnings.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    skipped = [
        {"path": p.name, "reason": "hidden folder (name starts with '.')"}
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name.startswith(".")
    ]
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has class folders not in the training classes: {unknown[:10]}")
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ImageFolder layout root/<class>/<image>)")
    items, warns = [], []
    for idx, name in enumerate(classes):
        folder = root / name
        files, odd = _list_files(folder, root) if folder.is_dir() else ([], [])
        skipped += odd
        n = 0
        for p in files:
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                items.append((rel, idx))
                n += 1
            else:
                skipped.append({"path": rel, "reason": f"not an image file (extension {p.suffix or 'none'!r})"})
        if n == 0:
            warns.append(f"class {name!r} in {root} has no image files")
    return FolderScan(list(classes), items, warns, skipped)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise DataError(f"{path} is too short to be an idx file")
    got, n = struct.unpack(">II", raw[:8])
    if got != magic:
        raise DataError(f"{path}: idx magic number {got}, expected {magic}")
    if magic == 2049:
        arr = np.frombuffer(raw, np.uint8, offset=8)
        shape = (n,)
    else:
        rows, cols = struct.unpack(">II", raw[8:16])
        arr = np.frombuffer(raw, np.uint8, offset=16)
        shape = (n, rows, cols)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {arr.size} bytes of data")
    return arr.reshape(shape)


def find_fashion_mnist(directory: str | Path | None, project_root: str | Path = ".") -> Path:
    """The folder holding the four Fashion-MNIST idx files: ``directory`` or the set-up's locations."""
    candidates = [Path(directory)] if directory else [Path(project_root) / d for d in FASHION_MNIST_DIRS]
    for c in candidates:
        if all((c / f).is_file() for pair in FASHION_MNIST_FILES.values() for f in pair):
            return c
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {', '.join(map(str, candidates))}. Run `make setup` (installs "
        "Debian's dataset-fashion-mnist), or `apt-get install dataset-fashion-mnist`, or set "
        "prepare.source.dir to a folder holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
    )


def read_fashion_mnist(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of the "train" or "test" split."""
    img_file, lbl_file = FASHION_MNIST_FILES[split]
    images = _read_idx(directory / img_file, 2051)
    labels = _read_idx(directory / lbl_file, 2049)
    if len(images) != len(labels):
        raise DataError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{directory / lbl_file}: label {labels.max()} out of range")
    return images, labels
