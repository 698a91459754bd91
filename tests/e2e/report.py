"""Parse what the test guest's /init reports on the serial console.

The guest (contrib/qemu/test-guest-init.sh) writes one line per event, each ``@@VFU`` followed
by space-separated ``key=value`` fields::

    @@VFU boot uptime=1.85 kernel=6.1.0-56-cloud-amd64 plan=lspci,virtio
    @@VFU module name=virtio_net status=pass params=
    @@VFU step=1 name=lspci record=pci bdf=0000:00:01.0 class=020000 vendor=1af4 ...
    @@VFU step=1 name=lspci status=pass count=5
    @@VFU done steps=1 passed=1 failed=0 uptime=2.37

Everything else on the console (kernel messages, command output) is ignored. The prefix is
searched anywhere in a line: a kernel message may be printed in front of a report line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

PREFIX = "@@VFU "
# ESC sequences SeaBIOS and the kernel print on the console
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|.)")

Fields = dict[str, str]


class ReportError(Exception):
    """The console holds a report line that breaks the format (a guest-side bug)."""


def _fields(words: list[str], line: str) -> Fields:
    out: Fields = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ReportError(f"field {word!r} is not key=value in report line {line!r}")
        out[key] = value
    return out


def _hex(value: str) -> int:
    return int(value, 16)


@dataclass(frozen=True)
class Bar:
    """One assigned PCI resource (``barN=KIND:START:SIZE:FLAGS`` or ``rom=...``)."""

    name: str  # bar0..bar5, rom, resN
    kind: str  # io, mem32, mem64
    prefetchable: bool
    start: int
    size: int
    flags: int  # the kernel's IORESOURCE_* bits, as in sysfs "resource"

    @property
    def is_io(self) -> bool:
        return self.kind == "io"

    @classmethod
    def parse(cls, name: str, value: str) -> Bar:
        kind, start, size, flags = value.split(":")
        base, _, pref = kind.partition("-")
        return cls(name, base, pref == "pref", int(start, 16), int(size, 16), int(flags, 16))


@dataclass(frozen=True)
class PciFunction:
    """One ``record=pci`` line of the lspci step (sysfs values, as Linux sees the function)."""

    bdf: str
    class_code: int  # base class, subclass, prog-if: 0x020000 for an Ethernet controller
    vendor: int
    device: int
    subvendor: int
    subdevice: int
    revision: int
    driver: str | None
    irq: int
    msi_irqs: int
    bars: Mapping[str, Bar]

    @property
    def ids(self) -> tuple[int, int]:
        return self.vendor, self.device

    @property
    def io_bars(self) -> list[Bar]:
        return [bar for bar in self.bars.values() if bar.is_io]

    @classmethod
    def from_fields(cls, f: Mapping[str, str]) -> PciFunction:
        bars = {k: Bar.parse(k, v) for k, v in f.items() if re.fullmatch(r"bar\d|rom|res\d+", k)}
        return cls(
            bdf=f["bdf"], class_code=_hex(f["class"]), vendor=_hex(f["vendor"]),
            device=_hex(f["device"]), subvendor=_hex(f["subvendor"]),
            subdevice=_hex(f["subdevice"]), revision=_hex(f["revision"]),
            driver=None if f["driver"] == "none" else f["driver"], irq=int(f["irq"]),
            msi_irqs=int(f["msi"]), bars=bars,
        )


# virtio 1.2 section 6: VIRTIO_F_VERSION_1 is feature bit 32
VIRTIO_F_VERSION_1 = 32


@dataclass(frozen=True)
class VirtioDevice:
    """One ``record=virtio`` line of the virtio step."""

    name: str  # virtio0
    pci: str  # BDF of the PCI function that carries it
    device_id: int  # virtio device type: 1 for network
    vendor: int
    driver: str | None
    status: int
    features: int  # negotiated feature bits (sysfs "features" is a bit string, bit 0 first)
    ifname: str | None

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def version_1(self) -> bool:
        """True when the modern (virtio 1.x) driver drives it, False for the legacy driver."""
        return self.has_feature(VIRTIO_F_VERSION_1)

    @classmethod
    def from_fields(cls, f: Mapping[str, str]) -> VirtioDevice:
        bits = f["features"]
        return cls(
            name=f["dev"], pci=f["pci"], device_id=_hex(f["device"]), vendor=_hex(f["vendor"]),
            driver=None if f["driver"] == "none" else f["driver"], status=_hex(f["status"]),
            features=sum(1 << i for i, c in enumerate(bits) if c == "1"),
            ifname=None if f["ifname"] == "none" else f["ifname"],
        )


@dataclass
class Step:
    """One plan step: its status line and the data records printed before it."""

    number: int
    name: str
    status: str
    fields: Fields
    records: list[Fields] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def int_field(self, key: str) -> int:
        return int(self.fields[key])

    def float_field(self, key: str) -> float:
        return float(self.fields[key])

    def __str__(self) -> str:
        text = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return f"step {self.number} {self.name}: {self.status} {text}"


@dataclass
class GuestReport:
    """Everything the guest reported, in order."""

    boot: Fields | None = None
    modules: list[Fields] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    done: Fields | None = None
    timed_out: bool = False

    @property
    def complete(self) -> bool:
        """The guest ran its whole plan (whatever the steps' results)."""
        return self.done is not None

    @property
    def failed_steps(self) -> list[Step]:
        return [s for s in self.steps if not s.passed]

    @property
    def failed_modules(self) -> list[str]:
        return [m["name"] for m in self.modules if m.get("status") != "pass"]

    def step(self, name: str, index: int = 0) -> Step:
        """The index-th step called name (0: the first); KeyError if there is none."""
        matches = [s for s in self.steps if s.name == name]
        if index >= len(matches) or index < -len(matches):
            raise KeyError(f"no step {name!r} #{index} in {[s.name for s in self.steps]}")
        return matches[index]

    def records(self, name: str, kind: str, index: int = -1) -> list[Fields]:
        return [r for r in self.step(name, index).records if r.get("record") == kind]

    def pci_functions(self, index: int = -1) -> list[PciFunction]:
        """Functions listed by the index-th lspci step (default: the last)."""
        return [PciFunction.from_fields(r) for r in self.records("lspci", "pci", index)]

    def pci_function(self, vendor: int, device: int, index: int = -1) -> PciFunction:
        """The first function with these IDs in an lspci step; KeyError if absent."""
        functions = self.pci_functions(index)
        for function in functions:
            if function.ids == (vendor, device):
                return function
        seen = ", ".join(f"{f.bdf} {f.vendor:04x}:{f.device:04x}" for f in functions)
        raise KeyError(f"no PCI function {vendor:04x}:{device:04x} (guest saw: {seen})")

    def virtio_devices(self, index: int = -1) -> list[VirtioDevice]:
        return [VirtioDevice.from_fields(r) for r in self.records("virtio", "virtio", index)]

    def virtio_device_on(self, bdf: str, index: int = -1) -> VirtioDevice:
        for device in self.virtio_devices(index):
            if device.pci == bdf:
                return device
        raise KeyError(f"no virtio device on {bdf}")

    def summary(self) -> str:
        lines = [str(s) for s in self.steps]
        if self.failed_modules:
            lines.insert(0, f"modules that failed to load: {', '.join(self.failed_modules)}")
        if self.timed_out:
            lines.append("the guest's watchdog fired (vfu.timeout)")
        if self.done is None:
            lines.append("the guest never reported 'done'")
        return "\n".join(lines)


def parse(console: str) -> GuestReport:
    """Collect the report lines of one guest run from its console text."""
    report = GuestReport()
    pending: dict[int, list[Fields]] = {}
    for raw in console.splitlines():
        line = _ESCAPES.sub("", raw).replace("\r", "")
        at = line.find(PREFIX)
        if at < 0:
            continue
        line = line[at + len(PREFIX) :]
        words = line.split()
        if not words:
            continue
        if "=" not in words[0]:
            event, rest = words[0], _fields(words[1:], line)
            if event == "boot":
                report.boot = rest
            elif event == "module":
                report.modules.append(rest)
            elif event == "done":
                report.done = rest
            elif event == "timeout":
                report.timed_out = True
            continue
        # step=N name=NAME first; the other fields may reuse "name" (irq records do not)
        head = _fields(words[:2], line)
        if list(head) != ["step", "name"] or not head["step"].isdigit():
            raise ReportError(f"report line without step=N name=NAME: {line!r}")
        number, name = int(head["step"]), head["name"]
        f = _fields(words[2:], line)
        if "record" in f:
            pending.setdefault(number, []).append(f)
        elif "status" in f:
            status = f.pop("status")
            report.steps.append(Step(number, name, status, f, pending.pop(number, [])))
        else:
            raise ReportError(f"step line with neither record= nor status=: {line!r}")
    return report
