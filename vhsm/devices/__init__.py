"""Reference devices written only with vhsm's public API: read them to learn to write one.

* :mod:`vhsm.devices.rng` — ``RngBackend()``: the smallest device, one queue filled
  with ``os.urandom``; start here.
* :mod:`vhsm.devices.blk` — ``BlkBackend(path, read_only=False, num_queues=1)``: a
  file-backed virtio-blk, requests with headers, status bytes and zero-copy I/O.
* :mod:`vhsm.devices.net` — ``NetBackend(mode="sink", queue_pairs=1)``: virtio-net
  sink or loopback, queue pairs, mergeable receive buffers, the numpy batch API.
* :mod:`vhsm.devices.net_tap` — ``TapNetBackend(ifname, queue_pairs=1)``: virtio-net on a
  Linux TAP (``vhsm.devices.tap``), offloads passed through, one TAP queue per pair.
* :mod:`vhsm.devices.vsock` — ``VsockBackend(guest_cid, uds_path)``: virtio-vsock
  streams joined to host unix sockets, sockets watched by the worker as listeners,
  credit flow control, and a device state saved and restored (``vsock_state``).

Each module is imported on its own (``vhsm serve`` imports only the one it runs).
"""

from __future__ import annotations
