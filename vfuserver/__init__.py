"""vfuserver: a vfio-user device server presenting virtio devices to QEMU."""

__version__ = "0.1.0"
