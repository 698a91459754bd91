"""--persist edits the operator's TOML file: comments, order and style stay.

The expected files are written out by hand: what an operator should find after each change.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from vfuserver.config import ConfigError, ServerConfig, device_from_mapping, load_config
from vfuserver.persist import render_config, save_config

OPERATOR_FILE = """\
# The devices of host A (edited by hand; vfuserver --persist keeps these lines).

[server]
control = "ctl.sock"   # relative: next to this file
poll-max-ns = 0x4000   # 16 µs, written as the operator likes it

# net0: the uplink, on the bridge
[[device]]
name = "net0"            # its name in logs
socket = "net0.sock"
profile = "modern"       # switched at runtime

# net1: the spare
# (two lines about it)
[[device]]
name = 'net1'
socket = "net1.sock"
# a line under net1's keys

# net2: the lab
[[device]]
name = "net2"
socket = "net2.sock"   # the lab's VM
mac = "52:54:00:00:00:02"

# end of the file
"""


@pytest.fixture
def operator_file(tmp_path: Path) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(OPERATOR_FILE)
    return path


def edited(path: Path, change: dict[str, str | None]) -> str:
    """The file after the running definitions changed: name -> new profile, or None: gone."""
    config = load_config(path)
    config.devices = [dataclasses.replace(spec, profile=change.get(spec.name) or spec.profile)
                      for spec in config.devices if change.get(spec.name, "") is not None]
    save_config(config)
    return path.read_text()


def test_nothing_changed_writes_the_same_bytes(operator_file: Path) -> None:
    assert edited(operator_file, {}) == OPERATOR_FILE


def test_set_profile_changes_one_value_and_keeps_its_comment(operator_file: Path) -> None:
    assert edited(operator_file, {"net0": "transitional"}) == OPERATOR_FILE.replace(
        'profile = "modern"       # switched at runtime',
        'profile = "transitional"       # switched at runtime')


def test_a_key_left_to_its_default_is_added_under_the_last_key(operator_file: Path) -> None:
    assert edited(operator_file, {"net1": "transitional", "net2": "transitional"}) == (
        OPERATOR_FILE
        .replace('socket = "net1.sock"\n', 'socket = "net1.sock"\nprofile = "transitional"\n')
        .replace('mac = "52:54:00:00:00:02"\n',
                 'mac = "52:54:00:00:00:02"\nprofile = "transitional"\n'))


def test_a_removed_device_takes_its_own_comments_only(operator_file: Path) -> None:
    assert edited(operator_file, {"net1": None}) == OPERATOR_FILE.replace(
        "# net1: the spare\n# (two lines about it)\n[[device]]\nname = 'net1'\n"
        'socket = "net1.sock"\n# a line under net1\'s keys\n\n', "")
    assert edited(operator_file, {"net2": None}) == OPERATOR_FILE.replace(
        "# net1: the spare\n# (two lines about it)\n[[device]]\nname = 'net1'\n"
        'socket = "net1.sock"\n# a line under net1\'s keys\n\n', "").replace(
        '# net2: the lab\n[[device]]\nname = "net2"\nsocket = "net2.sock"   # the lab\'s VM\n'
        'mac = "52:54:00:00:00:02"\n\n', "")


def test_the_first_device_goes_without_the_server_table_s_comments(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text("# about the file\n\n# net0\n[[device]]\nname = \"net0\"\n"
                    "socket = \"net0.sock\"\n\n# net1\n[[device]]\nname = \"net1\"\n"
                    "socket = \"net1.sock\"\n")
    assert edited(path, {"net0": None}) == (
        "# about the file\n\n# net1\n[[device]]\nname = \"net1\"\nsocket = \"net1.sock\"\n")


def test_an_added_device_comes_last_with_every_key(operator_file: Path) -> None:
    config = load_config(operator_file)
    config.devices.append(device_from_mapping({
        "name": "net3", "socket": str(operator_file.parent / 'odd "3".sock'),
        "netdev": "stream,server=on,addr.type=unix,addr.path=/run/a,,b.sock"}))
    save_config(config)
    text = operator_file.read_text()
    assert text.startswith(OPERATOR_FILE)
    assert text.removeprefix(OPERATOR_FILE) == (
        '\n[[device]]\nname = "net3"\n'
        f'socket = "{operator_file.parent}/odd \\"3\\".sock"\n'
        'profile = "modern"\n'
        f'mac = "{":".join(f"{b:02x}" for b in config.devices[-1].mac)}"\n'
        'netdev = "stream,server=on,addr.type=unix,addr.path=/run/a,,b.sock"\n')
    assert load_config(operator_file).devices == config.devices


def test_the_server_table_is_the_operator_s(operator_file: Path) -> None:
    config = load_config(operator_file)
    assert config.poll_max_ns == 0x4000
    config.control = "/run/elsewhere.sock"  # as `vfuserver run --control` sets it
    config.poll_max_ns = 0  # as `vfuserver run --poll-max-ns 0` sets it
    config.devices[0] = dataclasses.replace(config.devices[0], profile="transitional")
    save_config(config)
    assert operator_file.read_text().startswith(OPERATOR_FILE.split("# net0")[0])


def test_a_file_that_is_no_longer_valid_is_left_alone(operator_file: Path) -> None:
    config = load_config(operator_file)
    broken = OPERATOR_FILE.replace('name = "net2"', 'name = "net2"\ncolour = "red"')
    operator_file.write_text(broken)
    with pytest.raises(ConfigError, match=r"unknown key colour.*not overwriting"):
        save_config(config)
    assert operator_file.read_text() == broken


def test_a_missing_file_is_written_afresh(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    odd = '/run/a"b\\c\td\x7fe\u00e9'
    config = ServerConfig(control=odd, poll_max_ns=0, devices=[
        device_from_mapping({"name": "net0", "socket": "/run/net0.sock"})], path=path)
    save_config(config)
    written = load_config(path)
    assert written.control == odd  # tomlkit escapes what TOML requires
    assert written.poll_max_ns == 0
    assert written.devices == config.devices
    assert path.read_text().startswith("# vfuserver device definitions")
    assert render_config(config) == path.read_text()


def test_a_missing_file_gets_only_the_server_settings_that_are_not_defaults(
        tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    save_config(ServerConfig(devices=[], path=path))
    assert "[server]" not in path.read_text()
    save_config(ServerConfig(poll_max_ns=1000, devices=[], path=tmp_path / "other.toml"))
    assert "[server]\npoll-max-ns = 1000\n" in (tmp_path / "other.toml").read_text()


def test_save_config_is_atomic_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text("")
    os.chmod(path, 0o640)
    inode = os.stat(path).st_ino
    config = ServerConfig(devices=[device_from_mapping(
        {"name": "net0", "socket": "/run/net0.sock", "profile": "transitional"})], path=path)
    save_config(config)
    assert os.stat(path).st_ino != inode  # replaced by rename, never rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load_config(path).devices == config.devices
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.toml"]  # no temp left


def test_save_config_through_a_symlink_replaces_its_target(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text("# kept\n")
    link = tmp_path / "devices.toml"
    link.symlink_to(real)
    save_config(ServerConfig(devices=[device_from_mapping(
        {"name": "net0", "socket": "/run/net0.sock"})], path=link))
    assert link.is_symlink()
    assert [d.name for d in load_config(real).devices] == ["net0"]
    assert real.read_text().startswith("# kept\n\n[[device]]\n")


def test_removing_the_last_device_with_a_comment_above_it(tmp_path: Path) -> None:
    # The removal takes the comment block above the table, the last lines of the file:
    # the walk over the file must not run past its shortened end (it did: IndexError).
    path = tmp_path / "devices.toml"
    path.write_text('[[device]]\nname = "net0"\nsocket = "net0.sock"\n\n'
                    '# the last one\n[[device]]\nname = "net1"\nsocket = "net1.sock"\n')
    assert edited(path, {"net1": None}) == '[[device]]\nname = "net0"\nsocket = "net0.sock"\n'


def test_a_change_leaves_the_operator_s_edits_to_other_devices(operator_file: Path) -> None:
    # The server started with net0..net2; meanwhile the operator gave net1 a netdev and
    # added net9 by hand. Switching net0's profile must write net0 and nothing else.
    config = load_config(operator_file)
    edited_by_hand = OPERATOR_FILE.replace(
        'socket = "net1.sock"\n', 'socket = "net1.sock"\nnetdev = "tap,ifname=tap1"\n'
    ) + '\n[[device]]\nname = "net9"\nsocket = "net9.sock"\n'
    operator_file.write_text(edited_by_hand)
    config.devices = [dataclasses.replace(spec, profile="transitional") if spec.name == "net0"
                      else spec for spec in config.devices]
    save_config(config, changed={"net0"})
    assert operator_file.read_text() == edited_by_hand.replace(
        'profile = "modern"       # switched', 'profile = "transitional"       # switched')


def test_an_inline_array_of_devices_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    text = 'device = [{name = "net0", socket = "net0.sock"}]\n'
    path.write_text(text)
    config = load_config(path)
    config.devices = [dataclasses.replace(config.devices[0], profile="transitional")]
    with pytest.raises(ConfigError, match=r"one \[\[device\]\] table per device"):
        save_config(config, changed={"net0"})
    assert path.read_text() == text


def test_a_disk_s_profile_change_touches_only_its_profile(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    original = ('[[device]]\nname = "disk0"\nsocket = "d.sock"\n'
                'type = "virtio-blk"  # a disk\nimage = "d.img"\nqueues = 2\n')
    path.write_text(original)
    assert edited(path, {"disk0": "transitional"}) == original + 'profile = "transitional"\n'
    [disk] = load_config(path).devices
    assert (disk.type, disk.profile, disk.image, disk.queues) == (
        "virtio-blk", "transitional", str(tmp_path / "d.img"), 2)
