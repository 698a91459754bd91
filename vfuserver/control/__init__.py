"""The control plane: many devices in one server, driven over a QMP control socket.

* :mod:`vfuserver.control.qmp`: the QMP protocol, server side, without I/O;
* :mod:`vfuserver.control.controller`: the definitions, the running devices and the
  commands on them (``--persist`` writes changes back);
* :mod:`vfuserver.control.server`: the control socket, on ``trio.serve_listeners``;
* :mod:`vfuserver.control.client`: the CLI's client, QEMU's qemu.qmp library.

Nothing is imported here: the protocol module loads without trio.
"""
