"""Disk backends of the virtio-blk device.

One idea per module:

* :mod:`~vfuserver.blkdev.raw`: :class:`~vfuserver.blkdev.raw.RawImage`, a raw image (a
  regular file or a block device) opened read-write or read-only, buffered or O_DIRECT,
  and the blocking execution of one request on it;
* :mod:`~vfuserver.blkdev.backend`: :class:`~vfuserver.blkdev.backend.ImageBackend`, the
  device's :class:`~vfuserver.devices.virtio_blk.BlockBackend`: requests run on a bounded
  pool of worker threads (``trio.to_thread``), so disk I/O never blocks the event loop,
  and come back as they finish.

Life cycle: ``backend = ImageBackend(RawImage(path, ...))``, then ``await
nursery.start(backend.run, complete)``; cancel that task, then ``backend.close()``.
"""
