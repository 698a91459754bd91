"""From a parsed --netdev spec to the backend it names."""

from __future__ import annotations

from vfuserver.netdev.backend import TX_QUEUE_LIMIT, NetBackend, NoneBackend
from vfuserver.netdev.options import DgramSpec, NetdevSpec, NoneSpec, StreamSpec, TapSpec
from vfuserver.netdev.sockets import DgramBackend, StreamBackend
from vfuserver.netdev.tap import TapBackend


async def open_netdev(spec: NetdevSpec, *, tx_queue_limit: int = TX_QUEUE_LIMIT
                      ) -> NetBackend:
    """Open the backend ``spec`` names; failures raise NetdevHostError naming the fix.

    Async because host names are resolved and a stream client connects here. The caller
    runs ``backend.run(deliver)`` in a nursery and calls ``backend.close()`` after it ends.
    """
    match spec:
        case NoneSpec():
            return NoneBackend()
        case TapSpec():
            return TapBackend.open(spec.ifname, vnet_hdr=spec.vnet_hdr,
                                   tx_queue_limit=tx_queue_limit)
        case StreamSpec():
            return await StreamBackend.open(spec, tx_queue_limit=tx_queue_limit)
        case DgramSpec():
            return await DgramBackend.open(spec, tx_queue_limit=tx_queue_limit)
