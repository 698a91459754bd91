"""QMP, the QEMU Machine Protocol, server side, without I/O (as h11 is for HTTP).

Bytes in (:meth:`ServerConnection.receive_data`), commands out
(:meth:`ServerConnection.next_event`), replies in (:meth:`ServerConnection.send_return`,
:meth:`ServerConnection.send_error`), bytes out (:meth:`ServerConnection.data_to_send`).
The protocol is QEMU's docs/interop/qmp-spec.rst; where the spec leaves a choice, QEMU's
monitor/qmp.c and qapi/qmp-dispatch.c decide (their error messages are copied):

* on connect the server sends the greeting
  ``{"QMP": {"version": {"qemu": {"major", "minor", "micro"}, "package"}, "capabilities": []}}``
  (no out-of-band capability is offered);
* the connection starts in capabilities negotiation mode: ``{"execute": "qmp_capabilities"}``
  switches it to command mode; any other command first gets
  ``CommandNotFound: Expecting capabilities negotiation with 'qmp_capabilities'``, and a
  second ``qmp_capabilities`` gets ``CommandNotFound`` too;
* a command is ``{"execute": NAME, "arguments": {...}, "id": ANY}`` ("arguments" and "id"
  are optional), answered in order by ``{"return": VALUE}`` or
  ``{"error": {"class": CLASS, "desc": TEXT}}``, with the request's "id" when it had one;
* input is UTF-8 JSON objects one after the other, newlines optional (qemu.qmp sends none):
  as QEMU's json-streamer.c does, a message ends where the brackets that opened it close;
  input that does not start with ``{`` or ``[`` is one message up to its end of line;
* a message is at most ``max_message`` bytes and :data:`MAX_NESTING` levels deep; one that
  is not JSON, not an object, too long, too deep or malformed is answered with a
  GenericError (too long or too deep: the rest of its line is dropped) and the connection
  goes on;
* output is ASCII JSON, one object per line ending in CRLF.

The application runs the commands :meth:`next_event` returns; everything else (framing,
JSON, the request's members, negotiation) is answered here.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonValue = Any
"""What json.loads returns and json.dumps takes."""

MAX_MESSAGE = 64 * 1024
"""Longest message, in bytes; a longer one is answered with an error and dropped."""

MAX_NESTING = 256
"""Deepest nesting of objects and arrays in a message. QEMU's json-streamer.c allows 1024;
Python's json decoder recurses once per level and stops at the recursion limit (1000)."""

CAPABILITIES_COMMAND = "qmp_capabilities"
"""The command that ends capabilities negotiation (qapi/control.json)."""

# QMP's error classes (qapi/error.json, ErrorClass).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_FOUND = "DeviceNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"


class QMPError(Exception):
    """A command or a message that fails: becomes the reply's error object."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def reply(self) -> dict[str, JsonValue]:
        return {"error": {"class": self.error_class, "desc": self.desc}}


class ProtocolUsageError(RuntimeError):
    """The application used :class:`ServerConnection` out of order (a bug, like h11's
    LocalProtocolError)."""


@dataclass(frozen=True)
class Version:
    """What the greeting and query-version report (qapi/control.json, VersionInfo)."""

    major: int
    minor: int
    micro: int
    package: str

    def to_json(self) -> dict[str, JsonValue]:
        return {"qemu": {"micro": self.micro, "minor": self.minor, "major": self.major},
                "package": self.package}


@dataclass(frozen=True)
class Execute:
    """A command to run; answer it with ``send_return`` or ``send_error``."""

    name: str
    arguments: dict[str, JsonValue] = field(default_factory=dict)
    id: JsonValue = None
    """The request's "id", any JSON value; echoed in the reply when ``has_id``."""
    has_id: bool = False


class Status(enum.Enum):
    """What :meth:`ServerConnection.next_event` returns when there is no command to run."""

    NEED_DATA = "need data"
    """Nothing to do until :meth:`ServerConnection.receive_data` gets more bytes."""
    CLOSED = "closed"
    """The client closed its side and every request was handled."""


NEED_DATA = Status.NEED_DATA
CLOSED = Status.CLOSED


def encode(message: Mapping[str, JsonValue]) -> bytes:
    """One server message on the wire: ASCII JSON and CRLF (qmp-spec "General Definitions")."""
    return json.dumps(message, separators=(", ", ": ")).encode("ascii") + b"\r\n"


class ServerConnection:
    """One QMP connection, server side: the greeting, negotiation, then commands.

    ``data_to_send()`` holds the greeting from the start. Commands are handed out one at a
    time: the one :meth:`next_event` returned must be answered before it returns the next,
    so replies keep the order of the requests.
    """

    def __init__(self, version: Version, *, max_message: int = MAX_MESSAGE) -> None:
        self.version = version
        self.max_message = max_message
        self.negotiated = False
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        # after a message that could not be framed (too long, too deep): drop the input up
        # to the next newline, where the client's next message most likely starts
        self._skipping = False
        # the scan of the message at the start of _in (json-streamer.c's bracket counting)
        self._scanned = 0
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._pending: Execute | None = None
        self._queue({"QMP": {"version": version.to_json(), "capabilities": []}})

    # -- bytes ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means it closed its side."""
        if self._eof and data:
            raise ProtocolUsageError("data received after the end of input")
        if not data:
            self._eof = True
        elif self._skipping:
            end = data.find(b"\n")
            if end >= 0:
                self._skipping = False
                self._in += data[end + 1:]
        else:
            self._in += data

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call (maybe ``b""``)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- events --------------------------------------------------------------------------------

    def next_event(self) -> Execute | Status:
        """The next command to run, or NEED_DATA, or CLOSED.

        Messages this class answers itself (bad input, negotiation) are answered on the way:
        their replies are in :meth:`data_to_send`.
        """
        if self._pending is not None:
            raise ProtocolUsageError(f"command {self._pending.name} is not answered yet")
        while True:
            message = self._next_message()
            if message is None:
                return CLOSED if self._eof else NEED_DATA
            event = self._handle(message)
            if event is not None:
                self._pending = event
                return event

    def send_return(self, value: JsonValue) -> None:
        """Answer the pending command with its return value."""
        self._answer({"return": value})

    def send_error(self, error: QMPError) -> None:
        """Answer the pending command with an error."""
        self._answer(error.reply())

    # -- inside --------------------------------------------------------------------------------

    def _answer(self, reply: dict[str, JsonValue]) -> None:
        command = self._pending
        if command is None:
            raise ProtocolUsageError("no command to answer")
        self._pending = None
        if command.has_id:
            reply["id"] = command.id
        self._queue(reply)

    def _queue(self, message: Mapping[str, JsonValue]) -> None:
        self._out += encode(message)

    def _next_message(self) -> bytes | None:
        """The next message's bytes; too long or too deep ones are answered and dropped."""
        while not self._skipping:
            if self._scanned == 0:
                del self._in[:len(self._in) - len(self._in.lstrip())]
                if not self._in:
                    return None
            try:
                end = self._message_end()
            except QMPError as error:
                self._queue(error.reply())
                self._drop_line()
                continue
            if end < 0:
                if len(self._in) > self.max_message:
                    self._too_long()
                    self._drop_line()
                    continue
                if not self._eof:
                    return None
                end = len(self._in)  # the end of input ends the last message, whole or not
            message = bytes(self._in[:end])
            del self._in[:end]
            self._reset_scan()
            if len(message) > self.max_message:
                self._too_long()
            else:
                return message
        return None

    def _message_end(self) -> int:
        """Where the message at the start of the input ends (exclusive), or -1: not yet.

        Scans on from where the last call stopped. A message that starts with a bracket
        ends where its brackets close (strings skipped); any other ends with its line.
        """
        data = self._in
        if data[0] not in b"{[":
            end = data.find(b"\n", self._scanned)
            self._scanned = len(data) if end < 0 else end
            return end
        for index in range(self._scanned, len(data)):
            byte = data[index]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # double quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
                if self._depth > MAX_NESTING:
                    raise QMPError(GENERIC_ERROR, "JSON nesting depth limit exceeded "
                                                  "(ignored up to its end of line)")
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 0:
                    return index + 1
        self._scanned = len(data)
        return -1

    def _drop_line(self) -> None:
        """Drop the input up to the end of the current line (and the rest of it, as it
        arrives): after a message that cannot be framed, the next line starts afresh."""
        end = self._in.find(b"\n")
        if end < 0:
            self._in.clear()
            self._skipping = not self._eof
        else:
            del self._in[:end + 1]
        self._reset_scan()

    def _reset_scan(self) -> None:
        self._scanned = self._depth = 0
        self._in_string = self._escaped = False

    def _too_long(self) -> None:
        self._queue(QMPError(GENERIC_ERROR, f"message longer than {self.max_message} bytes "
                                            "(ignored up to its end of line)").reply())

    def _handle(self, message: bytes) -> Execute | None:
        """One message: the command to run, or None when answered here."""
        try:
            request = json.loads(message.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            # No id in the reply: QEMU could not read one either (qmp-spec "Error").
            self._queue(QMPError(GENERIC_ERROR, f"JSON parse error, {exc}").reply())
            return None
        # qmp_dispatch() echoes the id of any object, whatever else is wrong with it
        echo = {"id": request["id"]} if isinstance(request, dict) and "id" in request else {}
        try:
            name, arguments = check_request(request)
            if name == CAPABILITIES_COMMAND:
                self._negotiate(arguments)
                self._queue({"return": {}, **echo})
                return None
            if not self.negotiated:
                # monitor_qmp_dispatch(): CommandNotFound while negotiating, with this text
                raise QMPError(COMMAND_NOT_FOUND,
                               f"Expecting capabilities negotiation with '{CAPABILITIES_COMMAND}'")
        except QMPError as error:
            self._queue({**error.reply(), **echo})
            return None
        return Execute(name, arguments, echo.get("id"), bool(echo))

    def _negotiate(self, arguments: Mapping[str, JsonValue]) -> None:
        """qmp_qmp_capabilities() and qmp_caps_accept() (monitor/qmp-cmds-control.c)."""
        if self.negotiated:
            raise QMPError(COMMAND_NOT_FOUND,
                           "Capabilities negotiation is already complete, command ignored")
        for key in arguments:
            if key != "enable":
                raise QMPError(GENERIC_ERROR, f"Parameter '{key}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
            raise QMPError(GENERIC_ERROR,
                           "Invalid parameter type for 'enable', expected: array of strings")
        for capability in enable:  # none is offered
            raise QMPError(GENERIC_ERROR, f"Capability '{capability}' not available")
        self.negotiated = True


def check_request(request: JsonValue) -> tuple[str, dict[str, JsonValue]]:
    """A request's command name and arguments; QMPError as qmp_dispatch_check_obj() words it.

    "exec-oob" is refused as unexpected: the greeting offers no out-of-band execution.
    """
    if not isinstance(request, dict):
        raise QMPError(GENERIC_ERROR, "QMP input must be a JSON object")
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QMPError(GENERIC_ERROR, "QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError(GENERIC_ERROR, "QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(GENERIC_ERROR, f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QMPError(GENERIC_ERROR, "QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


def command_list(names: Sequence[str]) -> list[dict[str, str]]:
    """query-commands' return value (qapi/control.json, CommandInfo), negotiation included."""
    return [{"name": name} for name in [CAPABILITIES_COMMAND, *names]]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
