"""The compiled libvfio-user binding and the one function that checks its return values."""

from __future__ import annotations

import os
from typing import Any

try:
    from vfuserver._vfu_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "vfuserver's libvfio-user extension is not built: run 'make setup' "
        "(or scripts/get-libvfio-user.sh, then pip install -e .)"
    ) from exc

__all__ = ["check", "ffi", "lib"]


def check(result: Any, what: str) -> Any:
    """Return ``result`` unless it is -1 or NULL, else raise the OSError for ``ffi.errno``.

    ``OSError(errno, ...)`` picks the matching subclass (FileNotFoundError, PermissionError,
    ...), so callers can catch what they expect by type.
    """
    failed = result == ffi.NULL if isinstance(result, ffi.CData) else result == -1
    if failed:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
