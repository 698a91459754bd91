"""The control socket's client: QEMU's own QMP library (qemu.qmp), run synchronously.

:func:`execute` connects, negotiates, runs one command and hangs up, inside
``asyncio.run``: the CLI is synchronous, qemu.qmp's QMPClient is asyncio.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Mapping

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient

from vfuserver.control.qmp import JsonValue

CLIENT_TIMEOUT = 60.0
"""Seconds a client waits for the whole session (device-add opens a backend, which may
take a while)."""


class ControlUnreachable(OSError):
    """No server answers at the control socket (or it hung up / stopped answering)."""


class ServerError(Exception):
    """The server answered the command with an error object."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


def execute(path: str, command: str, arguments: Mapping[str, JsonValue] | None = None, *,
            timeout: float = CLIENT_TIMEOUT) -> JsonValue:
    """Run one command on the server at ``path``; its return value.

    ServerError when the server refuses it, ControlUnreachable when there is no QMP
    server there, it hangs up, or the session takes longer than ``timeout`` seconds.
    """
    return asyncio.run(execute_async(path, command, arguments, timeout=timeout))


async def execute_async(path: str, command: str,
                        arguments: Mapping[str, JsonValue] | None = None, *,
                        timeout: float = CLIENT_TIMEOUT) -> JsonValue:
    """:func:`execute` for asyncio callers."""
    client = QMPClient(f"vfuserver-cli {path}")
    try:
        async with asyncio.timeout(timeout):
            await client.connect(path)  # the greeting, then qmp_capabilities
            try:
                return await client.execute(command, arguments)
            finally:
                await client.disconnect()
    except ConnectError as exc:
        cause = exc.exc
        raise ControlUnreachable(getattr(cause, "errno", None) or errno.EPROTO,
                                 f"cannot reach the server at {path}: "
                                 f"{getattr(cause, 'strerror', None) or exc}") from exc
    except ExecuteError as exc:
        raise ServerError(exc.error_class, str(exc)) from None
    except (ExecInterruptedError, EOFError, ConnectionError) as exc:
        raise ControlUnreachable(errno.ECONNRESET, f"{path}: the server hung up") from exc
    except TimeoutError as exc:
        raise ControlUnreachable(errno.ETIMEDOUT,
                                 f"{path}: no reply in {timeout:g} s") from exc
