"""What every fuzz target shares: reading structured values out of the fuzzer's bytes,
and the one exception type that marks a broken invariant."""

from __future__ import annotations

from typing import Protocol


class FuzzTarget(Protocol):
    """A fuzz target: built once per process, then called with one input at a time."""

    def __call__(self, data: bytes) -> None: ...

    @classmethod
    def seeds(cls) -> dict[str, bytes]:
        """Named starting inputs (tests/fuzz/corpus/<target>/seed-<name>)."""
        ...


class Finding(AssertionError):
    """An input broke an invariant of the code under test (not a defined error)."""


class ByteReader:
    """Values taken in order from a fuzz input; zeros once the input is used up.

    Zero-filling (instead of stopping) keeps every prefix of an input meaningful, which
    is what libFuzzer's mutations (truncation, insertion) expect.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, size: int) -> bytes:
        """``size`` bytes (fewer only if the input ends)."""
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size).ljust(size, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def pick(self, choices: tuple[int, ...]) -> int:
        """One of ``choices``, chosen by the next byte."""
        return choices[self.u8() % len(choices)]
