"""vfuserver under a real QEMU and a real Linux guest."""

from __future__ import annotations

import pytest

from .rig import Guests, Servers

pytestmark = pytest.mark.e2e

VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_MODERN = 0x1041  # 0x1040 + virtio device type 1 (virtio 1.2 section 4.1.2.1)


def test_guest_enumerates_vfuserver_device(servers: Servers, guests: Guests) -> None:
    server = servers.start()
    run = guests.boot("lspci,virtio", sockets=[server.socket_path])
    report = run.check_complete()

    function = report.pci_function(VIRTIO_VENDOR, VIRTIO_NET_MODERN)
    assert function.revision == 0x01
    assert function.class_code == 0x020000  # network controller, Ethernet
    assert (function.subvendor, function.subdevice) == (VIRTIO_VENDOR, 0x1100)

    assert server.stop() == 0  # SIGTERM: a clean exit
    assert not server.socket_path.exists()


def test_server_reports_private_guest_ram(servers: Servers, guests: Guests) -> None:
    """Without memory-backend-memfd,share=on the DMA maps carry no file descriptor and QEMU
    says nothing: the server must say what is wrong."""
    server = servers.start()
    guests.boot("lspci", sockets=[server.socket_path], no_shared_memory=True, timeout=40)
    server.wait_for_log(r"^.*ERROR.*share=on.*$")
