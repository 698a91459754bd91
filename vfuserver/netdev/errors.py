"""What can go wrong with a --netdev backend, by direction.

:class:`NetdevSyntaxError` (a ValueError) for the --netdev text, :class:`NetdevHostError`
(an OSError with errno) for a host that refuses or loses the backend; both are
:class:`NetdevError`. Frames the guest sends that cannot be delivered are counted in
:class:`~vfuserver.netdev.backend.NetStats`, never raised.
"""

from __future__ import annotations


class NetdevError(Exception):
    """Base of everything wrong with a --netdev backend."""


class NetdevSyntaxError(NetdevError, ValueError):
    """A --netdev string that does not parse; the message names the item and the syntax."""


class NetdevHostError(NetdevError, OSError):
    """The host refused or lost the backend (``errno`` set); the message names the fix."""
