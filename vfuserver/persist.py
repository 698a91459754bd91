"""Writing the device definitions back to the operator's TOML file (``--persist``).

The file is edited, not regenerated: it is read again with tomlkit (a style-preserving
TOML library), the ``[[device]]`` tables of the running definitions are changed in place,
and every comment, blank line, key order, quoting and relative path the operator wrote
stays. Only what changed is written:

* a changed value (``profile`` after set-profile) replaces the old one, its end-of-line
  comment kept; a key that was left to its default is added after the table's last key;
* a new device (device-add) becomes a new ``[[device]]`` table at the end of the file,
  every key spelled out;
* a removed device (device-del) takes its table with it, and the comment lines that belong
  to it: the block directly above its header and the block directly below its last key
  (no blank line between). Other comments stay where they were.

``[server]`` is the operator's: it is never edited, so a ``--control`` or
``--poll-max-ns`` given on the command line is not written into the file. A file that is
missing is written afresh (a header, ``[server]`` with the settings in effect that are not
defaults, every device); a file that no longer parses as a config is left alone
(:class:`ConfigError`).

:func:`save_config` writes the file the way editors that care do: a temporary file in the
same directory, fsync, rename over the old one, fsync of the directory. A reader (or a
crash) sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Comment, Item, Table, Trivia, Whitespace

from vfuserver.config import (
    DEFAULT_POLL_MAX_NS,
    ConfigError,
    ServerConfig,
    device_from_mapping,
    device_to_mapping,
    parse_config,
)

HEADER = ("vfuserver device definitions (see contrib/systemd/README.md).",
          "A server running with --persist writes its changes back here; comments are kept.")

DEVICE_TABLE = "device"


def save_config(config: ServerConfig, path: Path | None = None, *,
                changed: Collection[str] | None = None) -> None:
    """Write ``config``'s devices to ``path`` (default: where it came from), atomically.

    ``changed``: the names of the devices a command changed (set, added or removed); only
    their tables are touched, so what the operator edited in the file meanwhile stays.
    None: make the file's devices those of ``config``.
    ConfigError if the file there is no longer a valid config (it is left alone).
    """
    target = path or config.path
    if target is None:
        raise ValueError("the config has no file to be written to")
    # Through a symlink (/etc/vfuserver/devices.toml -> elsewhere): replace its target.
    real = Path(os.path.realpath(target))
    try:
        previous: str | None = real.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {real}: {exc}") from None
    write_atomically(real, render_config(config, previous, path=Path(target),
                                         changed=changed).encode())


def render_config(config: ServerConfig, previous: str | None = None, *,
                  path: Path | None = None, changed: Collection[str] | None = None) -> str:
    """The TOML text of ``config``: ``previous`` edited (see the module), or a new file.

    ``path`` is where ``previous`` lives: its relative socket paths are relative to it;
    ``changed`` as for :func:`save_config`.
    """
    if previous is None:
        document = _new_document(config)
    else:
        try:
            parse_config(previous, path=path)  # the whole file is valid, or it stays as is
        except ConfigError as exc:
            raise ConfigError(f"{exc}; not overwriting it") from None
        document = tomlkit.parse(previous)
        if DEVICE_TABLE in document and not isinstance(document.item(DEVICE_TABLE), AoT):
            raise ConfigError(f"--persist edits [[{DEVICE_TABLE}]] tables; this file defines "
                              f"its devices as an inline array: write one [[{DEVICE_TABLE}]] "
                              "table per device, then try again")
    edit = _Edit.of(document)
    only = None if previous is None or changed is None else set(changed)  # a new file: all
    edit.update(config, base=path.parent if path is not None else None, changed=only)
    return edit.render()


def _new_document(config: ServerConfig) -> tomlkit.TOMLDocument:
    document = tomlkit.document()
    for line in HEADER:
        document.add(tomlkit.comment(line))
    server = tomlkit.table()
    if config.control is not None:
        server.add("control", config.control)
    if config.poll_max_ns != DEFAULT_POLL_MAX_NS:
        server.add("poll-max-ns", config.poll_max_ns)
    if server:
        document.add(tomlkit.nl())
        document.append("server", server)
    return document


@dataclass
class _Piece:
    """One table of the file (its keys only), or one comment or blank line between tables."""

    key: str | None
    item: Item

    @property
    def is_comment(self) -> bool:
        return isinstance(self.item, Comment)

    @property
    def is_blank(self) -> bool:
        return isinstance(self.item, Whitespace)

    def device_name(self) -> str | None:
        if self.key != DEVICE_TABLE or not isinstance(self.item, Table):
            return None
        return str(self.item.get("name"))


class _Edit:
    """A document as a flat list of pieces, in file order: tables, comments, blank lines.

    tomlkit keeps the lines between two tables at the end of the first table's body, so a
    comment above ``[[device]]`` would follow its predecessor (and a key added to that one
    would land below the comment). The edit takes those lines out of the tables first and
    puts them back in order when it renders.
    """

    def __init__(self, pieces: list[_Piece]) -> None:
        self.pieces = pieces

    @classmethod
    def of(cls, document: tomlkit.TOMLDocument) -> _Edit:
        pieces: list[_Piece] = []
        for key, item in document.body:
            if key is None:
                pieces.append(_Piece(None, item))
                continue
            tables = item.body if isinstance(item, AoT) else [item]
            for table in tables:
                pieces.append(_Piece(key.key, table))
                if isinstance(table, Table):
                    pieces += [_Piece(None, line) for line in _take_tail(table.value)]
        return cls(pieces)

    def render(self) -> str:
        document = tomlkit.document()
        document.parsing(True)  # as tomlkit's parser builds it: no whitespace added
        holder: Container = document
        for piece in self.pieces:
            if piece.key is None:
                holder.add(piece.item)
            else:
                document.append(piece.key, piece.item)
                if isinstance(piece.item, Table):
                    holder = piece.item.value
        document.parsing(False)
        return tomlkit.dumps(document)

    def update(self, config: ServerConfig, *, base: Path | None,
               changed: set[str] | None) -> None:
        """Make the tables of the ``changed`` devices (None: all) those of ``config``."""
        wanted = {spec.name: spec for spec in config.devices}
        present: set[str] = set()
        index = len(self.pieces) - 1
        while index >= 0:
            piece = self.pieces[index]
            name = piece.device_name()
            if name is None or (changed is not None and name not in changed):
                index -= 1
                continue
            if name not in wanted:
                index = self._remove(index) - 1  # it may take comments above it too
                continue
            present.add(name)
            table = piece.item
            if not isinstance(table, Table):  # device_name() saw a table
                raise TypeError(f"device {name}: not a table")
            old = device_from_mapping(table.unwrap(), base=base)
            new = wanted[name]
            mapping = device_to_mapping(new)
            for key in [key for key in mapping if key != "name"]:
                if getattr(old, key) != getattr(new, key):
                    table[key] = mapping[key]  # an existing key keeps its comment
            index -= 1
        for spec in config.devices:
            if spec.name not in present and (changed is None or spec.name in changed):
                self._append_device(device_to_mapping(spec))

    def _remove(self, index: int) -> int:
        """Drop a table and the comment blocks that touch it (above and below); the index
        of the first piece dropped."""
        start = index
        while start > 0 and self.pieces[start - 1].is_comment:
            start -= 1
        end = index + 1
        below = end
        while below < len(self.pieces) and self.pieces[below].is_comment:
            below += 1
        if below < len(self.pieces) and self.pieces[below].is_blank:
            end = below  # a block below it, set off from what follows: its own
        del self.pieces[start:end]
        # one blank line where its two neighbours' blank lines meet
        if (0 < start < len(self.pieces) and self.pieces[start - 1].is_blank
                and self.pieces[start].is_blank):
            del self.pieces[start]
        elif start == len(self.pieces) and start > 0 and self.pieces[start - 1].is_blank:
            del self.pieces[start - 1]  # it was the last table: no blank line left at the end
            start -= 1
        return start

    def _append_device(self, mapping: dict[str, str | bool | int]) -> None:
        table = Table(Container(), Trivia(), is_aot_element=True)
        for key, value in mapping.items():
            table.add(key, value)  # tomlkit quotes and escapes
        if self.pieces and not self.pieces[-1].is_blank:
            self.pieces.append(_Piece(None, tomlkit.nl()))
        self.pieces.append(_Piece(DEVICE_TABLE, table))


def _take_tail(container: Container) -> list[Item]:
    """Remove and return the comments and blank lines after a table's last key."""
    body = container.body
    cut = len(body)
    while cut and body[cut - 1][0] is None and isinstance(body[cut - 1][1],
                                                          (Comment, Whitespace)):
        cut -= 1
    tail = [item for _, item in body[cut:]]
    del body[cut:]  # only keyless items go: the container's key index stays right
    return tail


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``: temp file in the same directory, fsync, rename, fsync.

    The new file keeps the old one's permission bits (0644 for a new file); its owner is
    whoever writes it.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)  # the rename itself is durable once the directory is synced
    finally:
        os.close(directory)
