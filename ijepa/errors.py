"""The user-error family: every error caused by what a user gave us (a path, data, a checkpoint, an argument,
a device) derives from ``UserError``. Entry points (``pipeline.stage.main`` and ``ijepa.cli.main``) print such
an error as one line on stderr, naming the file, key or argument, and exit with code 2; anything else keeps its
traceback, because it is a bug in the project.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """Base of the errors caused by the user's input; the message names the file, key or argument."""


class DataError(UserError, ValueError):
    """Input data that cannot be used (no usable image, no class sub-folders, a bad idx file)."""


class UsageError(UserError, ValueError):
    """Invalid arguments, e.g. an output path inside an input folder, or ``--k 0``."""


class DeviceError(UserError, RuntimeError):
    """An explicitly requested device that this machine does not have."""


class ImageReadError(UserError, ValueError):
    """An image that cannot be read: not decodable, or larger than the pixel limit."""


class VideoError(UserError, ValueError):
    """A video that OpenCV cannot open or read, or an output it cannot write."""


# What a stage or a command reports as one line and exit code 2: the user-error family (bad params, paths, data,
# checkpoints, devices, a tracking store that cannot be used, a training run stopped by its own guards) and the
# OS's errors about a path (they name it). Anything else is a bug and keeps its traceback.
USER_FACING = (UserError, OSError)


def report(prog: str, e: BaseException) -> None:
    """Print a user-facing error as one line on stderr: ``<prog>: error: <message>``."""
    message = " ".join(str(e).split()) or type(e).__name__
    filename = getattr(e, "filename", None)
    if isinstance(e, OSError) and filename and str(filename) not in message:
        message = f"{filename}: {message}"
    print(f"{prog}: error: {message}", file=sys.stderr)
