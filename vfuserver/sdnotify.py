"""systemd's readiness protocol (sd_notify(3)) without a systemd library.

The service manager passes ``$NOTIFY_SOCKET``: a path of an AF_UNIX datagram socket, or,
starting with '@', a name in the abstract namespace. A notification is one datagram of
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once the service serves,
``STATUS=...`` a line for ``systemctl status``, ``STOPPING=1`` when it shuts down
(systemd's src/libsystemd/sd-daemon/sd-daemon.c is the reference).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("vfuserver.sdnotify")

SEND_TIMEOUT = 1.0
"""Seconds a notification may wait for room in the manager's receive queue."""


class Notifier:
    """Sends notifications to one address; does nothing when there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def from_environment(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, **fields: str | int) -> bool:
        """notify(READY=1, STATUS="...") -> True once sent; failures are logged, not raised:
        a service is no less ready because its manager cannot be told."""
        if self.address is None:
            return False
        # one assignment per line: a value cannot span lines
        message = "\n".join(f"{key}={' '.join(str(value).splitlines())}"
                            for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.connect(socket_address(self.address))
                sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True


def socket_address(address: str) -> bytes:
    """$NOTIFY_SOCKET as a sockaddr_un path: '@name' is the abstract name '\\0name'."""
    if address.startswith("@"):
        return b"\0" + os.fsencode(address[1:])
    if not address.startswith("/"):
        raise OSError(f"NOTIFY_SOCKET={address!r} is neither an absolute path nor @abstract")
    return os.fsencode(address)
