"""Synchronous device models: virtio devices, their PCI transport and config space.

Models see guest memory and interrupts only through small interfaces handed to them by
the server; they never block and never import trio or cffi.
"""
