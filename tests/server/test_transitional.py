"""The transitional presentation served through the real libvfio-user."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.devices.legacy_driver import MAC, Rig
from vfuserver.client import Client, VfioUserError
from vfuserver.context import VfuContext
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio_legacy import Register
from vfuserver.server import serve_device


async def test_over_vfio_user(tmp_path: Path) -> None:
    rig = Rig()
    context = VfuContext(str(tmp_path / "t.sock"), rig.fn)

    def session() -> tuple[Any, bytes, int]:
        with Client(context.socket_path) as client:
            info = client.region_info(vu.PciRegion.BAR0)
            with pytest.raises(VfioUserError) as raised:
                client.read(vu.PciRegion.BAR0, Register.STATUS, 1)
            assert raised.value.errno == errno.EIO
            client.write(vu.PciRegion.CONFIG, pcifmt.Offset.COMMAND, b"\x01\x00")
            client.write(vu.PciRegion.BAR0, Register.STATUS, b"\x01")
            with pytest.raises(VfioUserError) as raised:
                client.read(vu.PciRegion.BAR0, 30, 4)  # beyond the 32-byte BAR
            assert raised.value.errno == errno.EINVAL
            return info, client.read(vu.PciRegion.BAR0, 20, 6), client.read(
                vu.PciRegion.CONFIG, 2, 1)[0]

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_device, context)
            info, mac, device_id_low = await trio.to_thread.run_sync(session)
            nursery.cancel_scope.cancel()
    finally:
        context.close()
    assert info.size == 32  # Linux virtio-vfio-pci: 24 + offsetofend(virtio_net_config, status)
    assert info.flags == vu.RegionFlags.READ | vu.RegionFlags.WRITE  # IO region: no MMAP
    assert mac == MAC and device_id_low == 0x00
