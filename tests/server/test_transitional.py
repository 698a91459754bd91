"""The transitional presentation served through the real libvfio-user."""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.devices.legacy_driver import MAC, Rig
from vfuserver.client import Client, VfioUserError
from vfuserver.context import VfuContext
from vfuserver.devices.virtio_pci import MODERN_BAR, PCI_CFG_DATA, Layout
from vfuserver.protocol import pci as pcifmt
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio_legacy import QUEUE_MAX, Register
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


async def _serve(tmp_path: Path, rig: Rig, session: Any) -> Any:
    context = VfuContext(str(tmp_path / "t.sock"), rig.fn)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_device, context)
            result = await trio.to_thread.run_sync(session, context.socket_path)
            nursery.cancel_scope.cancel()
    finally:
        context.close()
    return result


async def test_whole_config_read_with_a_bad_pci_cfg_window(tmp_path: Path) -> None:
    """QEMU reads all 256 bytes of config space at once; a PCI_CFG window the guest left
    pointing at a register the BAR refuses (2 bytes of the 1-byte ISR) must not fail it."""
    rig = Rig()
    cap = rig.modern.pci_cfg_cap

    def session(path: str) -> bytes:
        with Client(path) as client:
            client.write(vu.PciRegion.CONFIG, cap + 4, bytes([MODERN_BAR]))
            client.write(vu.PciRegion.CONFIG, cap + 8, struct.pack("<II", Layout.ISR, 2))
            return client.read(vu.PciRegion.CONFIG, 0, pcifmt.CONFIG_SPACE_SIZE)

    whole = await _serve(tmp_path, rig, session)
    assert len(whole) == pcifmt.CONFIG_SPACE_SIZE
    assert whole[cap + PCI_CFG_DATA : cap + PCI_CFG_DATA + 4] == bytes(4)  # left unchanged
    assert whole[2:4] == b"\x00\x10"  # transitional device id 0x1000


async def test_writes_qemu_ignores_complete_and_pfn_0_resets(tmp_path: Path) -> None:
    """Over vfio-user: writes QEMU's virtio_ioport_write ignores complete without an
    error reply and change nothing; QUEUE_PFN 0 resets the whole device."""
    rig = Rig()

    def session(path: str) -> list[bytes]:
        with Client(path) as client:
            bar0 = vu.PciRegion.BAR0
            client.write(vu.PciRegion.CONFIG, pcifmt.Offset.COMMAND, b"\x05\x00")
            client.write(bar0, Register.STATUS, bytes([3]))
            client.write(bar0, Register.QUEUE_SEL, b"\x01\x00")
            client.write(bar0, Register.QUEUE_SEL, (QUEUE_MAX).to_bytes(2, "little"))
            client.write(bar0, Register.HOST_FEATURES, bytes(4))
            client.write(bar0, Register.QUEUE_NUM, b"\x10\x00")
            before = [client.read(bar0, Register.QUEUE_SEL, 2),
                      client.read(bar0, Register.QUEUE_NUM, 2),
                      client.read(bar0, Register.STATUS, 1)]
            client.write(bar0, Register.QUEUE_PFN, bytes(4))
            return [*before, client.read(bar0, Register.QUEUE_SEL, 2),
                    client.read(bar0, Register.STATUS, 1)]

    replies = await _serve(tmp_path, rig, session)
    assert replies == [b"\x01\x00", b"\x00\x01", b"\x03", b"\x00\x00", b"\x00"]
