"""The device's stores into a ring are seen by a concurrent driver only as final values.

Guest memory is shared with a driver that runs at the same time on another CPU. A C thread
(compiled here with cffi; it runs without the GIL, on the other core) spins on ``used.idx``
and ``avail_event`` while the real :class:`VirtQueue` pops, pushes and flushes against the
test driver. Both fields only ever move forward (by one per round; the thread may miss
rounds when it is descheduled) and stay below 0x8000 here, so a step backwards is a value
the device exposed in passing. ``struct.pack_into`` did exactly that (it zeroes
the destination before storing: Modules/_struct.c s_pack_internal), and a used index that
read 0 for a moment made Linux read last lap's used element ("input.0:id N is not a
head!"). With pack_into back in VirtQueue this test sees thousands of such steps.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.devices.driver import Buf, DriverQueue, GuestRam
from vfuserver.devices.virtqueue import VirtQueue
from vfuserver.protocol import virtio_ring as ring

WATCHER_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>

struct watch {
    const uint16_t *fields[2];
    int stop;
    unsigned long samples;
    unsigned long odd_steps[2];
    uint16_t odd_from[2], odd_to[2];
    pthread_t thread;
};

static void *spin(void *arg)
{
    struct watch *w = arg;
    uint16_t last[2];
    for (int i = 0; i < 2; i++)
        last[i] = __atomic_load_n(w->fields[i], __ATOMIC_ACQUIRE);
    while (!__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
        for (int i = 0; i < 2; i++) {
            uint16_t now = __atomic_load_n(w->fields[i], __ATOMIC_ACQUIRE);
            /* backwards: a value the field held before, or one in passing (0) */
            if ((uint16_t)(now - last[i]) >= 0x8000) {
                w->odd_steps[i]++;
                w->odd_from[i] = last[i];
                w->odd_to[i] = now;
            }
            last[i] = now;
        }
        w->samples++;
    }
    return NULL;
}

int watch_start(struct watch *w) { return pthread_create(&w->thread, NULL, spin, w); }

void watch_stop(struct watch *w)
{
    __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
    pthread_join(w->thread, NULL);
}
"""

WATCHER_CDEF = """
struct watch {
    const uint16_t *fields[2];
    int stop;
    unsigned long samples;
    unsigned long odd_steps[2];
    uint16_t odd_from[2], odd_to[2];
    ...;
};
int watch_start(struct watch *w);
void watch_stop(struct watch *w);
"""

ROUNDS = 30000
"""Below 0x8000: every transient value, 0 included, is a step backwards."""


@pytest.fixture(scope="module")
def watcher(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    if shutil.which("gcc") is None:
        pytest.skip("the watcher thread is C: gcc is missing")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a concurrent watcher needs a second CPU")
    from cffi import FFI

    build = tmp_path_factory.mktemp("watcher")
    ffi = FFI()
    ffi.cdef(WATCHER_CDEF)
    ffi.set_source("_ring_store_watcher", WATCHER_SOURCE, extra_compile_args=["-O2"],
                   libraries=["pthread"])
    library = Path(ffi.compile(tmpdir=str(build)))
    spec = importlib.util.spec_from_file_location("_ring_store_watcher", library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault("_ring_store_watcher", module)
    return module


def test_used_idx_and_avail_event_only_move_forward(watcher: ModuleType) -> None:
    ffi, lib = watcher.ffi, watcher.lib
    ram = GuestRam()
    queue = VirtQueue(ram.memory, 0, 256)
    queue.event_idx = True  # pop() then stores avail_event after every chain
    drv = DriverQueue(ram, queue, size=256, event_idx=True)
    buf = Buf(ram.alloc(64), 64, True)
    base = ffi.from_buffer(ram.backing)
    watch = ffi.new("struct watch *")
    for i, addr in enumerate((drv.used + ring.USED_IDX_OFFSET,
                              drv.used + ring.avail_event_offset(drv.size))):
        watch.fields[i] = ffi.cast("uint16_t *", base + (addr - ram.base))
    assert lib.watch_start(watch) == 0
    try:
        for _ in range(ROUNDS):
            drv.add_bufs([buf])
            chain = queue.pop()
            assert chain is not None
            queue.push(chain, 1)
            queue.flush()
            assert len(drv.get_used()) == 1
    finally:
        lib.watch_stop(watch)
    assert drv.used_idx == ROUNDS & 0xFFFF
    assert drv.avail_event == ROUNDS & 0xFFFF
    assert watch.samples > ROUNDS, "the watcher thread did not run alongside"
    names = ("used.idx", "avail_event")
    seen = {name: (watch.odd_steps[i], watch.odd_from[i], watch.odd_to[i])
            for i, name in enumerate(names)}
    assert all(steps == 0 for steps, _, _ in seen.values()), (
        f"a concurrent driver saw a ring field step backwards (count, last from, to): "
        f"{seen}")
