"""vfuserver's benchmarks: ``python -m benchmarks`` (``make bench``).

Four sections, each comparing vfuserver with a reference measured in the same run:

``region``
    A C vfio-user client times one-at-a-time region accesses (legacy IO BAR0 registers of
    the transitional device, modern BAR4 registers, queue notifies) against vfuserver and
    against a C server on the same libvfio-user; a raw AF_UNIX ping-pong is the floor.
``inprocess``
    Microseconds per access through the BAR region objects, called directly (no socket):
    the cost of the legacy translation into admin commands, with a cProfile summary.
``guest``
    A real Linux guest under QEMU pings and sends 64 MiB through vfuserver's device and
    through QEMU's own virtio-net-pci on the same tap.
``scale``
    One process serving 1, 64 and 512 devices: RSS per device, bring-up time, and the
    region-access rate of one device while the others sit idle.

Results go to ``benchmarks/results/latest.json`` and ``latest.md`` (git-ignored); the C
programs are compiled into ``.deps/bench`` (git-ignored) by the runner.
"""
