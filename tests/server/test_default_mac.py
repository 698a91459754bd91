"""The MAC address a `vfuserver run --socket` device presents when no --mac is given.

Read as a guest driver finds it (Linux virtio_pci_modern_probe): the capability list in
PCI config space, the VIRTIO_PCI_CAP_DEVICE_CFG capability, the BAR range it names, whose
first 6 bytes are virtio_net_config.mac (virtio 1.x 5.1.4).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from tests.server.control_helpers import server_process
from vfuserver.client import Client
from vfuserver.protocol import pci
from vfuserver.protocol import vfio_user as vu
from vfuserver.protocol.virtio_pci import CfgType, VirtioPciCap
from vfuserver.spec import default_mac


def presented_mac(socket_path: Path) -> bytes:
    with Client(str(socket_path), timeout=10) as client:
        config = client.read(vu.PciRegion.CONFIG, 0, pci.CONFIG_SPACE_SIZE)
        # pci_enable_device(): memory decoding on before the driver touches a BAR.
        client.write(vu.PciRegion.CONFIG, pci.Offset.COMMAND,
                     int(pci.Command.MEMORY).to_bytes(2, "little"))
        offset = config[pci.Offset.CAPABILITY_LIST]
        while offset:
            if config[offset] == pci.CapabilityId.VENDOR:
                cap = VirtioPciCap.parse(config[offset:])
                if cap.cfg_type == CfgType.DEVICE:
                    return client.read(vu.PciRegion.BAR0 + cap.bar, cap.offset, 6)
            offset = config[offset + 1]
    raise AssertionError("no VIRTIO_PCI_CAP_DEVICE_CFG capability")


def test_run_socket_servers_without_mac_present_different_macs(tmp_path: Path) -> None:
    first, second, named = (tmp_path / f"{n}.sock" for n in ("first", "second", "named"))
    with ExitStack() as stack:
        for socket_path, extra in ((first, []), (second, []), (named, ["--name", "uplink"])):
            stack.enter_context(server_process(
                ["--socket", str(socket_path), *extra], tmp_path / f"{socket_path.stem}.log",
                wait_for=[socket_path]))
        macs = {path: presented_mac(path) for path in (first, second, named)}
    # Two servers on one bridge must not collide: every one is net0, so the default comes
    # from the socket path, which two servers cannot share ...
    assert macs[first] != macs[second]
    assert macs[first] == default_mac(os.path.abspath(first))
    assert macs[second] == default_mac(os.path.abspath(second))
    # ... and with --name, from the name, as a [[device]] table of that name gets.
    assert macs[named] == default_mac("uplink")
    assert all(mac[:3] == bytes.fromhex("525400") for mac in macs.values())
