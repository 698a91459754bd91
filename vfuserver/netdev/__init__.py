"""Network backends of the virtio-net device, chosen with QEMU's ``-netdev`` syntax.

One idea per module:

* :mod:`~vfuserver.netdev.options`: :func:`parse_netdev` turns a ``--netdev`` string into a
  frozen spec (pure: configuration is checked with it, without trio or sockets);
* :mod:`~vfuserver.netdev.errors`: :class:`NetdevSyntaxError` (a ValueError) for the text,
  :class:`NetdevHostError` (an OSError with errno) for a host that refuses or loses the
  backend; both are :class:`NetdevError`;
* :mod:`~vfuserver.netdev.backend`: the :class:`~vfuserver.netdev.backend.NetBackend`
  interface every backend follows, its counters, ``none``, and the queued base;
* :mod:`~vfuserver.netdev.tap` and :mod:`~vfuserver.netdev.sockets`: ``tap``, ``stream``
  and ``dgram``;
* :mod:`~vfuserver.netdev.open`: :func:`~vfuserver.netdev.open.open_netdev` (async: it may
  resolve host names) opens the backend a spec names.

Life cycle: ``backend = await open_netdev(parse_netdev(text))``, then ``await
nursery.start(backend.run, deliver)``; cancel that task, then ``backend.close()``.

This package's own namespace holds only the pure names (the grammar and the errors):
importing ``vfuserver.netdev.options`` runs this file first, and configuration must load
neither trio nor the C extension. Backends are imported from their modules.
"""

from vfuserver.netdev.errors import NetdevError, NetdevHostError, NetdevSyntaxError
from vfuserver.netdev.options import (
    NETDEV_HELP,
    DgramSpec,
    InetAddress,
    NetdevSpec,
    NoneSpec,
    SocketAddress,
    StreamSpec,
    TapSpec,
    UnixAddress,
    parse_netdev,
)

__all__ = [
    "NETDEV_HELP",
    "DgramSpec",
    "InetAddress",
    "NetdevError",
    "NetdevHostError",
    "NetdevSpec",
    "NetdevSyntaxError",
    "NoneSpec",
    "SocketAddress",
    "StreamSpec",
    "TapSpec",
    "UnixAddress",
    "parse_netdev",
]
