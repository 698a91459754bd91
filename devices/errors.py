"""Error hierarchy for device models (STYLE 10: errors have a direction).

* :class:`GuestError`: the guest (or the vfio-user client acting for it) asked for something
  invalid. It carries the errno to answer with; the server reports it and goes on serving.
* :class:`HostError`: something on the host side failed (a backend, a socket, a resource).
* Anything else raised from a model is a bug in vfuserver and is logged as one.
"""

from __future__ import annotations

import errno as _errno


class DeviceError(Exception):
    """Base of everything a device model raises on purpose."""


class GuestError(DeviceError):
    """The guest or its client did something invalid; answered with ``errno``."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class GuestMemoryError(GuestError):
    """A guest-physical range is not (or not entirely) inside a DMA map, or is read-only."""

    errno = _errno.EFAULT

    def __init__(self, addr: int, length: int, reason: str = "not mapped") -> None:
        super().__init__(f"guest memory [{addr:#x}, +{length:#x}) {reason}")
        self.addr = addr
        self.length = length


class HostError(DeviceError):
    """A host-side resource failed; not the guest's fault."""
