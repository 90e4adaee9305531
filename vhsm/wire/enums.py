"""Request codes, header flags, limits and feature bits of vhost-user.

Names follow the spec (``VHOST_USER_`` prefix dropped) and the virtio spec
(``VIRTIO_*_F_`` prefix dropped); values are the wire values. Request codes
and the protocol's numeric limits are declared in ``specs/requests.yaml`` and
only read here; feature bits and header flags are declared here, once, and
every layer (runtime, auditor, front-end, diagrams) imports them.
"""

from __future__ import annotations

import enum
from enum import IntEnum, IntFlag
from typing import Final

from vhsm.errors import VhsmError
from vhsm.specs import load_spec


def _codes(channel: str) -> dict[str, int]:
    return {entry["name"]: int(entry["code"]) for entry in load_spec("requests")[channel]}


_FRONTEND = _codes("frontend")
_BACKEND = _codes("backend")
_LIMITS: dict[str, int] = load_spec("requests")["limits"]

#: Largest payload of one message; a larger size cannot be resynchronised (VU-FRAME-005).
MAX_PAYLOAD: Final[int] = _LIMITS["max_payload"]
#: Largest ring a front-end may configure (virtio's queue size limit, VU-RING-002).
MAX_QUEUE_SIZE: Final[int] = _LIMITS["max_queue_size"]
#: Regions one SET_MEM_TABLE may carry (VU-MEM-001).
MAX_MEM_REGIONS: Final[int] = _LIMITS["max_mem_regions"]
#: Memory slots vhsm offers in GET_MAX_MEM_SLOTS unless a device says otherwise.
DEFAULT_MAX_MEM_SLOTS: Final[int] = _LIMITS["default_max_mem_slots"]
#: Ring index bits of a ring-fd payload's u64.
VRING_IDX_MASK: Final[int] = _LIMITS["vring_idx_mask"]
#: "No fd follows" bit of a ring-fd payload's u64, also "no fd returned" in the
#: SET_DEVICE_STATE_FD reply and the host-notifier area.
VRING_NOFD_MASK: Final[int] = _LIMITS["nofd_bit"]
#: The only flag of SET_VRING_ADDR: used-ring writes are logged.
VRING_F_LOG: Final[int] = _LIMITS["vring_f_log"]
#: Alignment of the ring parts a SET_VRING_ADDR names (VU-RING-003).
VRING_ALIGN: Final[dict[str, int]] = dict(load_spec("requests")["vring_align"])


class Channel(enum.Enum):
    """Which socket a message travels on: the main one or the back-end request channel."""

    MAIN = "main"
    BACKEND = "backend"


class FrontendReq(IntEnum):
    """Front-end -> back-end request codes on the main channel."""

    GET_FEATURES = _FRONTEND["GET_FEATURES"]
    SET_FEATURES = _FRONTEND["SET_FEATURES"]
    SET_OWNER = _FRONTEND["SET_OWNER"]
    RESET_OWNER = _FRONTEND["RESET_OWNER"]
    SET_MEM_TABLE = _FRONTEND["SET_MEM_TABLE"]
    SET_LOG_BASE = _FRONTEND["SET_LOG_BASE"]
    SET_LOG_FD = _FRONTEND["SET_LOG_FD"]
    SET_VRING_NUM = _FRONTEND["SET_VRING_NUM"]
    SET_VRING_ADDR = _FRONTEND["SET_VRING_ADDR"]
    SET_VRING_BASE = _FRONTEND["SET_VRING_BASE"]
    GET_VRING_BASE = _FRONTEND["GET_VRING_BASE"]
    SET_VRING_KICK = _FRONTEND["SET_VRING_KICK"]
    SET_VRING_CALL = _FRONTEND["SET_VRING_CALL"]
    SET_VRING_ERR = _FRONTEND["SET_VRING_ERR"]
    GET_PROTOCOL_FEATURES = _FRONTEND["GET_PROTOCOL_FEATURES"]
    SET_PROTOCOL_FEATURES = _FRONTEND["SET_PROTOCOL_FEATURES"]
    GET_QUEUE_NUM = _FRONTEND["GET_QUEUE_NUM"]
    SET_VRING_ENABLE = _FRONTEND["SET_VRING_ENABLE"]
    SEND_RARP = _FRONTEND["SEND_RARP"]
    NET_SET_MTU = _FRONTEND["NET_SET_MTU"]
    SET_BACKEND_REQ_FD = _FRONTEND["SET_BACKEND_REQ_FD"]
    IOTLB_MSG = _FRONTEND["IOTLB_MSG"]
    SET_VRING_ENDIAN = _FRONTEND["SET_VRING_ENDIAN"]
    GET_CONFIG = _FRONTEND["GET_CONFIG"]
    SET_CONFIG = _FRONTEND["SET_CONFIG"]
    CREATE_CRYPTO_SESSION = _FRONTEND["CREATE_CRYPTO_SESSION"]
    CLOSE_CRYPTO_SESSION = _FRONTEND["CLOSE_CRYPTO_SESSION"]
    POSTCOPY_ADVISE = _FRONTEND["POSTCOPY_ADVISE"]
    POSTCOPY_LISTEN = _FRONTEND["POSTCOPY_LISTEN"]
    POSTCOPY_END = _FRONTEND["POSTCOPY_END"]
    GET_INFLIGHT_FD = _FRONTEND["GET_INFLIGHT_FD"]
    SET_INFLIGHT_FD = _FRONTEND["SET_INFLIGHT_FD"]
    GPU_SET_SOCKET = _FRONTEND["GPU_SET_SOCKET"]
    RESET_DEVICE = _FRONTEND["RESET_DEVICE"]
    VRING_KICK = _FRONTEND["VRING_KICK"]
    GET_MAX_MEM_SLOTS = _FRONTEND["GET_MAX_MEM_SLOTS"]
    ADD_MEM_REG = _FRONTEND["ADD_MEM_REG"]
    REM_MEM_REG = _FRONTEND["REM_MEM_REG"]
    SET_STATUS = _FRONTEND["SET_STATUS"]
    GET_STATUS = _FRONTEND["GET_STATUS"]
    GET_SHARED_OBJECT = _FRONTEND["GET_SHARED_OBJECT"]
    SET_DEVICE_STATE_FD = _FRONTEND["SET_DEVICE_STATE_FD"]
    CHECK_DEVICE_STATE = _FRONTEND["CHECK_DEVICE_STATE"]
    GET_SHMEM_CONFIG = _FRONTEND["GET_SHMEM_CONFIG"]
    GET_VRING_BASE_SKIP_DRAIN = _FRONTEND["GET_VRING_BASE_SKIP_DRAIN"]


class BackendReq(IntEnum):
    """Back-end -> front-end request codes on the back-end request channel."""

    BACKEND_IOTLB_MSG = _BACKEND["BACKEND_IOTLB_MSG"]
    BACKEND_CONFIG_CHANGE_MSG = _BACKEND["BACKEND_CONFIG_CHANGE_MSG"]
    BACKEND_VRING_HOST_NOTIFIER_MSG = _BACKEND["BACKEND_VRING_HOST_NOTIFIER_MSG"]
    BACKEND_VRING_CALL = _BACKEND["BACKEND_VRING_CALL"]
    BACKEND_VRING_ERR = _BACKEND["BACKEND_VRING_ERR"]
    BACKEND_SHARED_OBJECT_ADD = _BACKEND["BACKEND_SHARED_OBJECT_ADD"]
    BACKEND_SHARED_OBJECT_REMOVE = _BACKEND["BACKEND_SHARED_OBJECT_REMOVE"]
    BACKEND_SHARED_OBJECT_LOOKUP = _BACKEND["BACKEND_SHARED_OBJECT_LOOKUP"]
    BACKEND_SHMEM_MAP = _BACKEND["BACKEND_SHMEM_MAP"]
    BACKEND_SHMEM_UNMAP = _BACKEND["BACKEND_SHMEM_UNMAP"]


if set(FrontendReq.__members__) != set(_FRONTEND) or set(BackendReq.__members__) != set(_BACKEND):
    raise VhsmError("specs/requests.yaml and vhsm.wire.enums name different requests")


class HeaderFlags(IntFlag):
    """Bits of the header's ``flags`` word."""

    VERSION_1 = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


VERSION_MASK = 0x3
RESERVED_FLAGS_MASK = 0xFFFF_FFF0


class ProtocolFeature(IntFlag):
    """vhost-user protocol features, GET/SET_PROTOCOL_FEATURES."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20
    GPA_ADDRESSES = 1 << 21
    SHMEM = 1 << 22
    GET_VRING_BASE_SKIP_DRAIN = 1 << 23


#: Every protocol feature bit this version of the protocol defines.
ALL_PROTOCOL_FEATURES: Final[int] = sum(int(feature) for feature in ProtocolFeature)


class VirtioFeature(IntFlag):
    """Device-independent virtio and vhost feature bits of GET/SET_FEATURES."""

    NOTIFY_ON_EMPTY = 1 << 24
    LOG_ALL = 1 << 26
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    PROTOCOL_FEATURES = 1 << 30
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    SUSPEND = 1 << 43


class BlkFeature(IntFlag):
    """virtio-blk device feature bits (virtio spec, ``VIRTIO_BLK_F_*``)."""

    BARRIER = 1 << 0
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    GEOMETRY = 1 << 4
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    SCSI = 1 << 7
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14
    LIFETIME = 1 << 15
    SECURE_ERASE = 1 << 16
    ZONED = 1 << 17


class NetFeature(IntFlag):
    """virtio-net device feature bits (virtio spec, ``VIRTIO_NET_F_*``)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


class DeviceStatus(IntFlag):
    """The virtio device status byte of SET_STATUS / GET_STATUS; 0 = reset."""

    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    SUSPEND = 0x10
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class IotlbType(IntEnum):
    """``type`` of a vhost_iotlb_msg."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class IotlbPerm(IntEnum):
    """``perm`` of a vhost_iotlb_msg."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class ConfigFlags(IntEnum):
    """``flags`` of a config space message."""

    FRONTEND = 0
    MIGRATION = 1


class TransferDirection(IntEnum):
    """``direction`` of SET_DEVICE_STATE_FD."""

    SAVE = 0
    LOAD = 1


class XenMmapFlag(IntFlag):
    """``xen_mmap_flags`` of a memory region with XEN_MMAP."""

    FOREIGN = 1 << 0  # map the domain's frames through privcmd
    GRANT = 1 << 1  # map the domain's grant references through gntdev
    # Mapped per access, never whole: 0x8 is what xen-vhost-frontend sends (through
    # rust-vmm vm-memory's MmapXenFlags); QEMU's vhost-user document says bit 8 (0x100),
    # which no front-end sends (docs/xen.md).
    NO_ADVANCE_MAP = 1 << 3


class TransferPhase(IntEnum):
    """``phase`` of SET_DEVICE_STATE_FD."""

    STOPPED = 0


def feature_names(value: int, *enums: type[IntFlag]) -> list[str]:
    """Name every set bit of ``value`` from the first enum that knows it, else ``bitN``."""
    names: list[str] = []
    bit = 0
    while value >> bit:
        if (value >> bit) & 1:
            mask = 1 << bit
            for flag_enum in enums:
                member = flag_enum._value2member_map_.get(mask)
                if member is not None and member.name is not None:
                    names.append(member.name)
                    break
            else:
                names.append(f"bit{bit}")
        bit += 1
    return names


def request_name(code: int, channel: Channel = Channel.MAIN) -> str:
    """Return the spec name of a request code, ``UNKNOWN_<code>`` when it has none."""
    table: type[IntEnum] = FrontendReq if channel is Channel.MAIN else BackendReq
    member = table._value2member_map_.get(code)
    return member.name if member is not None and member.name else f"UNKNOWN_{code}"
