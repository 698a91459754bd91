"""The virtio core, whatever the transport: device status, feature bits, device types.

Sources: virtio spec §2.1 "Device Status Field", §6 "Reserved Feature Bits" and §5
"Device Types" (content.tex); Linux include/uapi/linux/virtio_config.h and virtio_ids.h.
Transport formats build on these: :mod:`vfuserver.protocol.virtio_pci` (modern PCI),
:mod:`vfuserver.protocol.virtio_legacy` (the legacy IO BAR); device types add their own
feature bits (:class:`vfuserver.protocol.virtio_net.NetFeature`).
"""

from __future__ import annotations

import enum

FEATURE_BITS = 64
"""Feature words are 64 bits wide (two 32-bit words in the PCI common configuration)."""


class DeviceStatus(enum.IntFlag):
    """Device status bits (§2.1, virtio_config.h VIRTIO_CONFIG_S_*)."""

    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    """Not used by legacy drivers."""
    NEEDS_RESET = 0x40
    FAILED = 0x80


class FeatureBit(enum.IntEnum):
    """A feature bit number; device types name theirs in a subclass (``NetFeature``)."""

    @property
    def mask(self) -> int:
        """``1 << bit``."""
        return 1 << self.value


class Feature(FeatureBit):
    """Device-independent feature bit numbers (§6 Reserved Feature Bits, virtio_config.h).

    Bits 0..23 are device-type specific. Bit 30 is QEMU's VIRTIO_F_BAD_FEATURE, which a
    legacy driver should not negotiate; it is deliberately not named here.
    """

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    ADMIN_VQ = 41


def feature_mask(*bits: int) -> int:
    """The 64-bit feature word with ``bits`` set; ValueError for a bit outside 0..63."""
    mask = 0
    for bit in bits:
        if not 0 <= bit < FEATURE_BITS:
            raise ValueError(f"feature bit {bit} out of range")
        mask |= 1 << bit
    return mask


class DeviceType(enum.IntEnum):
    """Virtio device ids (§5, virtio_ids.h VIRTIO_ID_*); the subset this project names.

    0 is reserved (invalid). A transport derives its identity from these: the modern PCI
    device id is 0x1040 + the type, a legacy one uses the type as its subsystem id.
    """

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    """Traditional memory balloon."""
    SCSI = 8
    NINEP = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    FS = 26
