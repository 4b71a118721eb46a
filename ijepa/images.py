"""Reading image files for the commands and the segmentation folders: listing, a pixel limit checked on the
header before decoding, and refusing outputs inside inputs."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from .data.sources import IMAGE_EXTENSIONS
from .errors import ImageReadError, UsageError

# Largest image the commands decode (about 120 MB as BGR). The size is read from the file header first, so a
# small file that claims 30000x30000 pixels (a "decompression bomb") is refused before any memory is spent.
MAX_PIXELS = 40_000_000


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files and folders skipped); an error if the
    folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {folder} does not exist")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {folder}")
    return files


def refuse_inside(output: str | Path, folder: str | Path, option: str) -> None:
    """Refuse an output folder that is the input folder or inside it (outputs would overwrite or be re-read)."""
    out, src = Path(output).resolve(), Path(folder).resolve()
    if out == src or src in out.parents:
        raise UsageError(f"{option} {output} is inside the input folder {folder}; write somewhere else")


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding the pixels; None when PIL does not know the format.

    PIL's own decompression-bomb guard is lifted for this header read only (it would refuse to even report the
    size of a bomb); the callers compare the size with their own limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(path: Path, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse (ImageReadError) a file whose header claims more than ``max_pixels``; nothing is decoded."""
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageReadError(f"{path}: {size[0]}x{size[1]} pixels, above the limit of {max_pixels}")


def read_bgr(path: Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file as (H, W, 3) BGR uint8 (grey replicated).

    Raises:
        ImageReadError: larger than ``max_pixels`` (checked on the header before decoding), or not decodable.
    """
    check_pixels(path, max_pixels)
    data = np.fromfile(path, np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if arr is None:
        raise ImageReadError(f"{path}: not a decodable image")
    if arr.shape[0] * arr.shape[1] > max_pixels:  # a format PIL could not size: refuse after the fact
        raise ImageReadError(f"{path}: {arr.shape[1]}x{arr.shape[0]} pixels, above the limit of {max_pixels}")
    return arr
