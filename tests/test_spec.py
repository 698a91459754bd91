"""Device definitions as pure data: vfuserver.spec, and configuration loading nothing else.

STYLE 14: parsing a config file never loads trio or the C extension. Whether a module
pulls them in is only seen in a fresh interpreter (this one has trio loaded already).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from vfuserver.cli import build_parser
from vfuserver.netdev.options import TapSpec
from vfuserver.spec import (
    PROFILES,
    DeviceSpec,
    MacAddressError,
    ProfileError,
    SpecError,
    check_profile,
    default_mac,
    format_mac,
    parse_mac,
)

SERVER_ONLY = ("trio", "cffi", "vfuserver._vfu_cffi", "vfuserver.binding", "vfuserver.context",
               "vfuserver.device", "vfuserver.server")


@pytest.mark.parametrize("module", ["vfuserver.config", "vfuserver.spec",
                                    "vfuserver.netdev.options", "vfuserver.netdev"])
def test_configuration_loads_no_server_module(module: str) -> None:
    check = (f"import sys, {module}; "
             f"print(' '.join(m for m in {SERVER_ONLY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == []


@pytest.mark.parametrize(("text", "mac"), [
    pytest.param("52:54:00:12:34:56", bytes.fromhex("525400123456"), id="lower"),
    pytest.param("52:54:00:AB:CD:EF", bytes.fromhex("525400abcdef"), id="upper"),
    pytest.param("2:0:0:0:0:1", bytes.fromhex("020000000001"), id="one-digit"),
])
def test_parse_mac(text: str, mac: bytes) -> None:
    assert parse_mac(text) == mac
    assert parse_mac(format_mac(mac)) == mac


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("52:54:00:12:34", "is not a MAC address like 52:54:00:12:34:56", id="five"),
    pytest.param("52:54:00:12:34:56:78", "is not a MAC address", id="seven"),
    pytest.param("52-54-00-12-34-56", "is not a MAC address", id="dashes"),
    pytest.param("52:54:00:12:34:5g", "is not a MAC address", id="not-hex"),
    pytest.param("52:54:00:12:34:100", "is not a MAC address", id="three-digits"),
    pytest.param("52:54:00:12:34:+5", "is not a MAC address", id="sign"),
    pytest.param("52:54:00:12:34:", "is not a MAC address", id="empty-byte"),
    pytest.param("01:00:5e:00:00:01", "01:00:5e:00:00:01 is a multicast address; a device "
                 "needs unicast", id="multicast"),
])
def test_parse_mac_errors(text: str, message: str) -> None:
    with pytest.raises(MacAddressError, match=message) as raised:
        parse_mac(text)
    assert isinstance(raised.value, SpecError) and isinstance(raised.value, ValueError)


def test_default_mac_is_qemus_prefix_and_per_name() -> None:
    net0, net1 = default_mac("net0"), default_mac("net1")
    assert net0[:3] == net1[:3] == bytes.fromhex("525400")
    assert net0 != net1
    assert default_mac("net0") == net0  # stable across restarts
    assert not net0[0] & 1  # unicast


def test_device_spec_defaults() -> None:
    spec = DeviceSpec(name="net7", socket="/run/net7.sock")
    assert spec.profile == "modern" and spec.mac == default_mac("net7")
    assert str(spec.netdev) == "none"
    given = DeviceSpec(name="net7", socket="s", profile="transitional",
                       mac=bytes.fromhex("020000000001"), netdev=TapSpec("tap0"))
    assert given.mac == bytes.fromhex("020000000001")


@pytest.mark.parametrize(("keys", "error", "message"), [
    pytest.param({"profile": "legacy"}, ProfileError,
                 "unknown profile 'legacy'; choose one of modern, transitional", id="profile"),
    pytest.param({"mac": bytes(5)}, MacAddressError, "a MAC address is 6 bytes, not 5",
                 id="mac-length"),
    pytest.param({"mac": bytes.fromhex("ffffffffffff")}, MacAddressError,
                 "ff:ff:ff:ff:ff:ff is a multicast address", id="mac-multicast"),
])
def test_device_spec_refuses(keys: dict[str, Any], error: type[SpecError],
                             message: str) -> None:
    with pytest.raises(error, match=message):
        DeviceSpec(name="net0", socket="s", **keys)


def test_check_profile() -> None:
    assert [check_profile(p) for p in PROFILES] == list(PROFILES)
    with pytest.raises(ProfileError):
        check_profile("Modern")


@pytest.mark.parametrize(("option", "message"), [
    pytest.param(["--mac", "52:54:00"], "argument --mac: '52:54:00' is not a MAC address",
                 id="mac"),
    pytest.param(["--mac", "ff:ff:ff:ff:ff:ff"], "argument --mac: ff:ff:ff:ff:ff:ff is a "
                 "multicast address", id="mac-multicast"),
    pytest.param(["--netdev", "user"], "argument --netdev: --netdev 'user': unknown backend",
                 id="netdev"),
    # the name rules of a config file's [[device]] (found trying the server: `run` took
    # 'a b', which the config file and device-add refuse)
    pytest.param(["--name", "a b"], "argument --name: device name 'a b' is not valid",
                 id="name"),
])
def test_cli_turns_spec_errors_into_usage_errors(option: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "--socket", "s", *option])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_the_client_commands_load_no_serving_stack() -> None:
    # `vfuserver status` and friends talk QMP to a running server: they must work where the
    # C extension is not built, and start fast.
    probe = ("import sys, vfuserver.cli; "
             "print(sorted(m for m in ('trio', 'cffi', 'vfuserver._vfu_cffi', "
             "'vfuserver.context', 'vfuserver.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"
