"""The QMP protocol core without a socket: bytes in, commands out, replies in, bytes out.

Expected messages are QEMU's (docs/interop/qmp-spec.rst, monitor/qmp.c,
qapi/qmp-dispatch.c), not this module's own output read back.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from vfuserver.control.qmp import (
    CLOSED,
    NEED_DATA,
    Execute,
    ProtocolUsageError,
    QMPError,
    ServerConnection,
    Version,
    command_list,
)

VERSION = Version(0, 1, 2, package="vfuserver 0.1.2")
NEGOTIATE = b'{"execute": "qmp_capabilities"}\n'


def messages(data: bytes) -> list[dict[str, Any]]:
    """Server output: CRLF-terminated ASCII JSON objects, one per line."""
    assert data.endswith(b"\r\n") or not data
    data.decode("ascii")
    return [json.loads(line) for line in data.split(b"\r\n")[:-1]]


def negotiated() -> ServerConnection:
    connection = ServerConnection(VERSION)
    connection.data_to_send()
    connection.receive_data(NEGOTIATE)
    assert connection.next_event() is NEED_DATA
    assert messages(connection.data_to_send()) == [{"return": {}}]
    return connection


def test_greeting_is_the_first_message() -> None:
    connection = ServerConnection(VERSION)
    assert messages(connection.data_to_send()) == [{"QMP": {
        "version": {"qemu": {"micro": 2, "minor": 1, "major": 0},
                    "package": "vfuserver 0.1.2"},
        "capabilities": []}}]
    assert connection.data_to_send() == b""
    assert connection.next_event() is NEED_DATA


def test_commands_before_negotiation_are_not_found() -> None:
    connection = ServerConnection(VERSION)
    connection.data_to_send()
    connection.receive_data(b'{"execute": "query-devices", "id": 7}\n'
                            b'{"execute": "no-such-command"}\n')
    assert connection.next_event() is NEED_DATA  # answered here: nothing to run
    assert messages(connection.data_to_send()) == [
        {"error": {"class": "CommandNotFound",
                   "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
         "id": 7},
        {"error": {"class": "CommandNotFound",
                   "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}},
    ]
    assert not connection.negotiated


def test_negotiation_then_commands() -> None:
    connection = ServerConnection(VERSION)
    connection.data_to_send()
    connection.receive_data(b'{"execute": "qmp_capabilities", "arguments": {}, "id": "n"}\n'
                            b'{"execute": "query-devices", "id": 1}\n')
    event = connection.next_event()
    assert event == Execute("query-devices", {}, 1, True)
    assert connection.negotiated
    connection.send_return([])
    assert messages(connection.data_to_send()) == [{"return": {}, "id": "n"},
                                                   {"return": [], "id": 1}]
    # a second negotiation is refused, as QEMU refuses it
    connection.receive_data(NEGOTIATE)
    assert connection.next_event() is NEED_DATA
    [reply] = messages(connection.data_to_send())
    assert reply["error"]["class"] == "CommandNotFound"
    assert "already complete" in reply["error"]["desc"]


@pytest.mark.parametrize(("arguments", "desc"), [
    pytest.param({"enable": ["oob"]}, "Capability 'oob' not available", id="oob-not-offered"),
    pytest.param({"enable": "oob"}, "Invalid parameter type for 'enable', expected: array",
                 id="enable-not-a-list"),
    pytest.param({"bogus": 1}, "Parameter 'bogus' is unexpected", id="unknown-argument"),
])
def test_negotiation_with_bad_arguments_fails_and_keeps_negotiating(
        arguments: dict[str, Any], desc: str) -> None:
    connection = ServerConnection(VERSION)
    connection.data_to_send()
    request = {"execute": "qmp_capabilities", "arguments": arguments}
    connection.receive_data(json.dumps(request).encode() + b"\n")
    assert connection.next_event() is NEED_DATA
    [reply] = messages(connection.data_to_send())
    assert reply["error"]["class"] == "GenericError"
    assert desc in reply["error"]["desc"]
    assert not connection.negotiated


@pytest.mark.parametrize(("line", "desc"), [
    pytest.param(b"not json", "JSON parse error", id="not-json"),
    pytest.param(b"\xff\xfe{}", "JSON parse error", id="not-utf8"),
    pytest.param(b'{"execute": "query-devices", "id": NaN}', "JSON parse error", id="nan"),
    pytest.param(b"[" * 2000, "JSON nesting depth limit exceeded", id="too-deep"),
    pytest.param(b"[" * 256 + b"]" * 256, "must be a JSON object", id="deep-but-allowed"),
    pytest.param(b'{"execute": }', "JSON parse error", id="no-value"),
    pytest.param(b"}", "JSON parse error", id="closing-bracket"),
    pytest.param(b"[1, 2]", "QMP input must be a JSON object", id="array"),
    pytest.param(b'"query-devices"', "QMP input must be a JSON object", id="string"),
    pytest.param(b"{}", "QMP input lacks member 'execute'", id="no-execute"),
    pytest.param(b'{"execute": 5}', "QMP input member 'execute' must be a string",
                 id="execute-not-a-string"),
    pytest.param(b'{"execute": "query-devices", "bogus": 1}',
                 "QMP input member 'bogus' is unexpected", id="unknown-member"),
    pytest.param(b'{"exec-oob": "query-devices"}', "QMP input member 'exec-oob' is unexpected",
                 id="oob-not-offered"),
    pytest.param(b'{"execute": "query-devices", "arguments": []}',
                 "QMP input member 'arguments' must be an object", id="arguments-not-object"),
])
def test_malformed_input_is_answered_and_the_connection_goes_on(line: bytes,
                                                                 desc: str) -> None:
    connection = negotiated()
    connection.receive_data(line + b"\n" + b'{"execute": "query-devices", "id": 2}\n')
    event = connection.next_event()
    assert event == Execute("query-devices", {}, 2, True)
    [reply] = messages(connection.data_to_send())
    assert reply["error"]["class"] == "GenericError"
    assert desc in reply["error"]["desc"]
    assert "id" not in reply


def test_the_id_of_a_malformed_object_is_echoed() -> None:
    connection = negotiated()
    connection.receive_data(b'{"execute": 5, "id": {"seq": [1, "x"]}}\n')
    assert connection.next_event() is NEED_DATA
    [reply] = messages(connection.data_to_send())
    assert reply["id"] == {"seq": [1, "x"]}


def test_unknown_commands_are_the_application_s_to_refuse() -> None:
    connection = negotiated()
    connection.receive_data(b'{"execute": "format-disk", "arguments": {"x": 1}, "id": 3}\n')
    event = connection.next_event()
    assert event == Execute("format-disk", {"x": 1}, 3, True)
    connection.send_error(QMPError("CommandNotFound", "The command format-disk has not "
                                                      "been found"))
    assert messages(connection.data_to_send()) == [{
        "error": {"class": "CommandNotFound",
                  "desc": "The command format-disk has not been found"}, "id": 3}]


@pytest.mark.parametrize("request_id", [0, "a", None, [1, 2], {"k": False}, 1.5])
def test_any_id_is_echoed_as_sent(request_id: Any) -> None:
    connection = negotiated()
    connection.receive_data(json.dumps({"execute": "x", "id": request_id}).encode() + b"\n")
    event = connection.next_event()
    assert isinstance(event, Execute)
    connection.send_return({"ok": True})
    assert messages(connection.data_to_send()) == [{"return": {"ok": True},
                                                    "id": request_id}]


def test_several_commands_in_one_read_are_answered_in_order() -> None:
    connection = negotiated()
    connection.receive_data(b'{"execute": "a", "id": 1}\r\n\n  \n{"execute": "b", "id": 2}\n'
                            b'{"execute": "c", "id": 3}\n')
    names = []
    while isinstance(event := connection.next_event(), Execute):
        names.append(event.name)
        with pytest.raises(ProtocolUsageError):
            connection.next_event()  # the pending command must be answered first
        connection.send_return(event.name)
    assert event is NEED_DATA
    assert names == ["a", "b", "c"]
    assert messages(connection.data_to_send()) == [
        {"return": "a", "id": 1}, {"return": "b", "id": 2}, {"return": "c", "id": 3}]


def test_objects_need_no_newline_between_them() -> None:
    """qemu.qmp writes each message with no newline after it; QEMU splits by brackets."""
    connection = ServerConnection(VERSION)
    connection.data_to_send()
    connection.receive_data(b'{"execute":"qmp_capabilities","id":"__qmp#00000"}'
                            b'{"execute":"query-devices","arguments":{"x":"}{\\"]"},'
                            b'"id":"__qmp#00001"}{"execute":')
    event = connection.next_event()
    assert event == Execute("query-devices", {"x": '}{"]'}, "__qmp#00001", True)
    connection.send_return([])
    assert connection.next_event() is NEED_DATA
    assert messages(connection.data_to_send()) == [{"return": {}, "id": "__qmp#00000"},
                                                   {"return": [], "id": "__qmp#00001"}]
    connection.receive_data(b' "pretty",\n  "arguments": {\n    "device": "net0"\n  }\n}')
    assert connection.next_event() == Execute("pretty", {"device": "net0"})


def test_a_command_split_across_reads() -> None:
    connection = negotiated()
    whole = b'{"execute": "set-profile", "arguments": {"device": "n\xc3\xa9t0"}, "id": 9}'
    for byte in whole[:-1]:
        connection.receive_data(bytes([byte]))  # even inside a UTF-8 sequence
        assert connection.next_event() is NEED_DATA
    connection.receive_data(whole[-1:])
    assert connection.next_event() == Execute("set-profile", {"device": "n\u00e9t0"}, 9, True)
    connection.send_return({})
    assert messages(connection.data_to_send()) == [{"return": {}, "id": 9}]


def test_a_too_long_line_is_answered_once_and_skipped() -> None:
    connection = ServerConnection(VERSION, max_message=100)
    connection.data_to_send()
    connection.receive_data(NEGOTIATE)
    connection.next_event()
    connection.data_to_send()
    connection.receive_data(b"x" * 150)
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b'{"execute": "hidden"}' * 10)  # the same overlong line
    assert connection.next_event() is NEED_DATA
    connection.receive_data(b'xx\n{"execute": "seen"}\n')
    assert connection.next_event() == Execute("seen")
    [reply] = messages(connection.data_to_send())
    assert reply["error"]["desc"] == ("message longer than 100 bytes "
                                      "(ignored up to its end of line)")


def test_end_of_input_ends_the_last_message_then_closes() -> None:
    connection = negotiated()
    connection.receive_data(b'"a line that is not an object"')
    assert connection.next_event() is NEED_DATA  # its line may go on
    connection.receive_data(b"")
    assert connection.next_event() is CLOSED
    [reply] = messages(connection.data_to_send())
    assert reply["error"]["desc"] == "QMP input must be a JSON object"
    with pytest.raises(ProtocolUsageError):
        connection.receive_data(b"more")

    cut_short = negotiated()
    cut_short.receive_data(b'{"execute": "query-dev')
    assert cut_short.next_event() is NEED_DATA
    cut_short.receive_data(b"")
    assert cut_short.next_event() is CLOSED
    [reply] = messages(cut_short.data_to_send())
    assert reply["error"]["desc"].startswith("JSON parse error")


def test_output_is_ascii() -> None:
    connection = negotiated()
    connection.receive_data(b'{"execute": "x"}\n')
    connection.next_event()
    connection.send_error(QMPError("GenericError", "device n\u00e9t0 \u2014 gone"))
    data = connection.data_to_send()
    assert data.isascii()
    assert messages(data)[0]["error"]["desc"] == "device n\u00e9t0 \u2014 gone"


def test_answering_without_a_command_is_a_usage_error() -> None:
    with pytest.raises(ProtocolUsageError):
        negotiated().send_return({})


def test_query_commands_lists_negotiation_too() -> None:
    assert command_list(["query-devices"]) == [{"name": "qmp_capabilities"},
                                               {"name": "query-devices"}]
