"""Torch files on disk, below every format: atomic writes, safe weights-only reads with one-line errors, and
state-dict key cleaning. ``ijepa.checkpoint`` (our and the official checkpoints) and ``ijepa.interop`` (timm and
Hugging Face layouts) both build on it, and neither imports the other's internals: ``checkpoint`` imports
``interop``, never the reverse.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model; the message names file and keys."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | Path, *, what: str = "checkpoint", keys: tuple[str, ...] = ()) -> dict:
    """Load a torch file (checkpoint, features, search index) on the CPU with ``weights_only=True``.

    Every loader of the project goes through here. It tells apart a file that is not a torch file (or is
    corrupt or truncated) from one that needs arbitrary unpickling (it names the Python globals the file
    asks for); it never suggests ``weights_only=False``, which would let a file run code.

    Args:
        what: what the file should be, for messages ("search index", "features file").
        keys: entries the file must hold; a file without them is refused with the keys it does hold.
    Raises:
        CheckpointError: missing, unreadable, corrupt, unsafe, not a dict, or lacking ``keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    corrupt = f"{path} is not a torch {what}, or it is corrupt or truncated"
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # a zip archive, or a legacy pickle (PROTO)
        raise CheckpointError(f"{corrupt} (it starts with {magic!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        if not found:  # e.g. "Unsupported operand": bytes that are no pickle torch wrote
            raise CheckpointError(f"{corrupt} (unpickling failed)") from None
        raise CheckpointError(
            f"{path} is refused: loading it needs arbitrary unpickling (it asks for {', '.join(found)}), which can "
            "run code. Only files of tensors and plain Python values are read; re-save the state dicts as tensors "
            "(for instance with safetensors) from code you trust."
        ) from None
    # What torch's readers raise on bytes that are not a torch file (a text file reaches the legacy unpickler,
    # whose memo lookups fail with KeyError/IndexError), or on a truncated archive.
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise CheckpointError(f"{corrupt} ({type(e).__name__})") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a {what} (a dict)")
    missing = [k for k in keys if k not in obj]
    if missing:
        have = ", ".join(sorted(map(str, obj))[:8]) or "nothing"
        raise CheckpointError(f"{path} is not a {what}: it lacks {', '.join(missing)} (it holds {have})")
    return dict(obj)


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile/wrapper prefixes (``module.``, ``_orig_mod.``, ``backbone.``) from every key."""
    out = {}
    for k, v in state.items():
        while k.startswith(_PREFIXES):
            for p in _PREFIXES:
                k = k.removeprefix(p)
        out[k] = v
    return out
