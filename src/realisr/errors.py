"""User-facing errors.

Every error a user can cause (bad input file, missing weights, malformed checkpoint, refused overwrite)
is a :class:`RealisrError`. Its message is one line that names the problem and what to do; the CLI prints
it without a traceback.
"""

from __future__ import annotations

__all__ = [
    "RealisrError",
    "InputImageError",
    "ImageTooLargeError",
    "OutputExistsError",
    "WeightsNotFoundError",
    "CheckpointError",
    "MissingExtraError",
    "UnknownModelError",
    "UnsupportedFormatError",
    "OutputWriteError",
]


class RealisrError(Exception):
    """Base class of all errors meant to be shown to a user as one line."""


class InputImageError(RealisrError, ValueError):
    """An input image cannot be read (missing, empty, corrupt, truncated, not an image)."""


class ImageTooLargeError(InputImageError):
    """An input image exceeds the configured pixel limit (decompression-bomb guard)."""


class OutputExistsError(RealisrError, FileExistsError):
    """The output file exists and overwriting was not requested."""


class UnsupportedFormatError(RealisrError, ValueError):
    """The requested output format (extension or ``fmt``) cannot be written."""


class OutputWriteError(RealisrError, OSError):
    """The output file could not be written (disk full, no permission, ...)."""


class WeightsNotFoundError(RealisrError, FileNotFoundError):
    """Model weights are not available locally (and could not be fetched)."""


class CheckpointError(RealisrError, ValueError):
    """A checkpoint file is malformed: missing keys, wrong shapes or an unsupported format."""


class UnknownModelError(RealisrError, KeyError):
    """A model id is neither registered nor an existing file path."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class MissingExtraError(RealisrError, ImportError):
    """An optional dependency group is not installed."""

    def __init__(self, extra: str, package: str):
        super().__init__(f"this feature needs the optional package '{package}': pip install 'realisr[{extra}]'")
        self.extra = extra
        self.package = package


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtraError(extra, module.split(".")[0]) from e
