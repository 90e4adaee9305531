"""A vhost-user front-end driver in Python: test back-ends without a VM.

`Frontend` negotiates, owns memfd guest memory, lays out split or packed rings,
posts chains, kicks, waits for used buffers, serves the back-end request
channel and records every message; `BlkDevice`, `RngDevice` and `NetDevice`
speak the device protocols on top.
"""

from __future__ import annotations

from vhsm.frontend.connection import B2F, F2B, Connection, Recorder
from vhsm.frontend.devices import (
    NET_HDR_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    BlkDevice,
    NetDevice,
    RngDevice,
)
from vhsm.frontend.frontend import (
    SUPPORTED_FEATURES,
    SUPPORTED_PROTOCOL_FEATURES,
    Frontend,
    FrontendListener,
    connect_unix,
)
from vhsm.frontend.memory import UVA_BASE, FrontendMemory, GuestRegion
from vhsm.frontend.reqchannel import BackendRequestHandler, BackendRequestServer
from vhsm.frontend.virtqueue import Virtqueue

__all__ = [
    "B2F",
    "F2B",
    "NET_HDR_SIZE",
    "SECTOR_SIZE",
    "SUPPORTED_FEATURES",
    "SUPPORTED_PROTOCOL_FEATURES",
    "UVA_BASE",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "BackendRequestHandler",
    "BackendRequestServer",
    "BlkDevice",
    "Connection",
    "Frontend",
    "FrontendListener",
    "FrontendMemory",
    "GuestRegion",
    "NetDevice",
    "Recorder",
    "RngDevice",
    "Virtqueue",
    "connect_unix",
]
