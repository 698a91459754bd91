"""The virtio core constants against the spec and Linux's uapi headers (one table each).

The ids are the macro names of include/uapi/linux/virtio_config.h (VIRTIO_CONFIG_S_*,
VIRTIO_F_*) and virtio_ids.h (VIRTIO_ID_*), so a wrong value names the macro it disagrees
with; the values are the spec's (§2.1, §6, §5).
"""

from __future__ import annotations

import enum

import pytest

from vfuserver.protocol.virtio import DeviceStatus, DeviceType, Feature, feature_mask

LINUX_CONFIG_H = [
    pytest.param(DeviceStatus.ACKNOWLEDGE, 1, id="VIRTIO_CONFIG_S_ACKNOWLEDGE"),
    pytest.param(DeviceStatus.DRIVER, 2, id="VIRTIO_CONFIG_S_DRIVER"),
    pytest.param(DeviceStatus.DRIVER_OK, 4, id="VIRTIO_CONFIG_S_DRIVER_OK"),
    pytest.param(DeviceStatus.FEATURES_OK, 8, id="VIRTIO_CONFIG_S_FEATURES_OK"),
    pytest.param(DeviceStatus.NEEDS_RESET, 0x40, id="VIRTIO_CONFIG_S_NEEDS_RESET"),
    pytest.param(DeviceStatus.FAILED, 0x80, id="VIRTIO_CONFIG_S_FAILED"),
    pytest.param(Feature.NOTIFY_ON_EMPTY, 24, id="VIRTIO_F_NOTIFY_ON_EMPTY"),
    pytest.param(Feature.ANY_LAYOUT, 27, id="VIRTIO_F_ANY_LAYOUT"),
    pytest.param(Feature.RING_INDIRECT_DESC, 28, id="VIRTIO_RING_F_INDIRECT_DESC"),
    pytest.param(Feature.RING_EVENT_IDX, 29, id="VIRTIO_RING_F_EVENT_IDX"),
    pytest.param(Feature.VERSION_1, 32, id="VIRTIO_F_VERSION_1"),
    pytest.param(Feature.ACCESS_PLATFORM, 33, id="VIRTIO_F_ACCESS_PLATFORM"),
    pytest.param(Feature.RING_PACKED, 34, id="VIRTIO_F_RING_PACKED"),
    pytest.param(Feature.IN_ORDER, 35, id="VIRTIO_F_IN_ORDER"),
    pytest.param(Feature.ORDER_PLATFORM, 36, id="VIRTIO_F_ORDER_PLATFORM"),
    pytest.param(Feature.SR_IOV, 37, id="VIRTIO_F_SR_IOV"),
    pytest.param(Feature.NOTIFICATION_DATA, 38, id="VIRTIO_F_NOTIFICATION_DATA"),
    pytest.param(Feature.NOTIF_CONFIG_DATA, 39, id="VIRTIO_F_NOTIF_CONFIG_DATA"),
    pytest.param(Feature.RING_RESET, 40, id="VIRTIO_F_RING_RESET"),
    pytest.param(Feature.ADMIN_VQ, 41, id="VIRTIO_F_ADMIN_VQ"),
]
LINUX_IDS_H = [
    pytest.param(DeviceType.NET, 1, id="VIRTIO_ID_NET"),
    pytest.param(DeviceType.BLOCK, 2, id="VIRTIO_ID_BLOCK"),
    pytest.param(DeviceType.CONSOLE, 3, id="VIRTIO_ID_CONSOLE"),
    pytest.param(DeviceType.ENTROPY, 4, id="VIRTIO_ID_RNG"),
    pytest.param(DeviceType.BALLOON, 5, id="VIRTIO_ID_BALLOON"),
    pytest.param(DeviceType.SCSI, 8, id="VIRTIO_ID_SCSI"),
    pytest.param(DeviceType.NINEP, 9, id="VIRTIO_ID_9P"),
    pytest.param(DeviceType.GPU, 16, id="VIRTIO_ID_GPU"),
    pytest.param(DeviceType.INPUT, 18, id="VIRTIO_ID_INPUT"),
    pytest.param(DeviceType.VSOCK, 19, id="VIRTIO_ID_VSOCK"),
    pytest.param(DeviceType.CRYPTO, 20, id="VIRTIO_ID_CRYPTO"),
    pytest.param(DeviceType.FS, 26, id="VIRTIO_ID_FS"),
]


@pytest.mark.parametrize(("member", "value"), LINUX_CONFIG_H + LINUX_IDS_H)
def test_constants_match_the_spec(member: int, value: int) -> None:
    assert member == value


@pytest.mark.parametrize("enum_type", [DeviceStatus, Feature, DeviceType])
def test_every_member_is_in_a_table(enum_type: type[enum.Enum]) -> None:
    """A member added without its spec value fails here."""
    tabled = {p.values[0] for p in LINUX_CONFIG_H + LINUX_IDS_H}
    assert set(enum_type) <= tabled


@pytest.mark.parametrize(("bits", "mask"), [
    pytest.param((), 0, id="none"),
    pytest.param((Feature.VERSION_1, Feature.ADMIN_VQ), (1 << 32) | (1 << 41), id="high-word"),
    pytest.param((Feature.ANY_LAYOUT,), 0x0800_0000, id="low-word"),
    pytest.param((0, 63), 1 | 1 << 63, id="the-ends"),
])
def test_feature_mask(bits: tuple[int, ...], mask: int) -> None:
    assert feature_mask(*bits) == mask


@pytest.mark.parametrize("bit", [-1, 64])
def test_feature_mask_refuses_bits_outside_the_word(bit: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        feature_mask(bit)


@pytest.mark.parametrize("feature", list(Feature), ids=lambda f: f.name)
def test_feature_mask_property_is_the_bit(feature: Feature) -> None:
    assert feature.mask == feature_mask(feature) == 1 << feature
