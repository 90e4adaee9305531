"""Request codes, header flags, limits and feature bits of vhost-user.

Names follow the spec (``VHOST_USER_`` prefix dropped) and the virtio spec
(``VIRTIO_*_F_`` prefix dropped); values are the wire values. Every value is
declared in ``specs/`` and only read here: request codes and the protocol's
numeric limits in ``specs/requests.yaml``, feature bits, flag words and masks
in ``specs/bits.yaml``. The enums are written out by name so code (and mypy)
can name their members; an import-time check keeps the names and the YAML
in step. Every layer (runtime, auditor, front-end, diagrams) imports them.
"""

from __future__ import annotations

import enum
from enum import IntEnum, IntFlag
from typing import Any, Final

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
#: A packed ring's GET/SET_VRING_BASE word before any SET_VRING_BASE (wrap counters 1).
PACKED_BASE_INITIAL: Final[int] = _LIMITS["packed_base_initial"]
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


_BITS: dict[str, Any] = load_spec("bits")


def _values(section: str) -> dict[str, int]:
    """Member values of a flag or enum section of bits.yaml (given as values)."""
    return {name: int(value) for name, value in _BITS[section].items()}


def _bit_values(section: str) -> dict[str, int]:
    """Member values of a feature-word section of bits.yaml (given as bit numbers)."""
    return {name: 1 << int(bit) for name, bit in _BITS[section].items()}


_HEADER = {name: int(value) for name, value in _BITS["header"]["flags"].items()}
_PROTOCOL = _bit_values("protocol_features")
_VIRTIO = _bit_values("virtio_features")
_BLK = _bit_values("blk_features")
_NET = _bit_values("net_features")
_STATUS = _values("device_status")
_XEN = _bit_values("xen_mmap_flags")
_IOTLB_TYPE = _values("iotlb_type")
_IOTLB_PERM = _values("iotlb_perm")
_CONFIG = _values("config_flags")
_DIRECTION = _values("transfer_direction")
_PHASE = _values("transfer_phase")


class HeaderFlags(IntFlag):
    """Bits of the header's ``flags`` word."""

    VERSION_1 = _HEADER["VERSION_1"]
    REPLY = _HEADER["REPLY"]
    NEED_REPLY = _HEADER["NEED_REPLY"]


#: The version bits of the header's flags (VU-FRAME-001).
VERSION_MASK: Final[int] = int(_BITS["header"]["version_mask"])
#: Header flag bits that must be zero (VU-FRAME-002).
RESERVED_FLAGS_MASK: Final[int] = int(_BITS["header"]["reserved_flags_mask"])


class ProtocolFeature(IntFlag):
    """vhost-user protocol features, GET/SET_PROTOCOL_FEATURES."""

    MQ = _PROTOCOL["MQ"]
    LOG_SHMFD = _PROTOCOL["LOG_SHMFD"]
    RARP = _PROTOCOL["RARP"]
    REPLY_ACK = _PROTOCOL["REPLY_ACK"]
    NET_MTU = _PROTOCOL["NET_MTU"]
    BACKEND_REQ = _PROTOCOL["BACKEND_REQ"]
    CROSS_ENDIAN = _PROTOCOL["CROSS_ENDIAN"]
    CRYPTO_SESSION = _PROTOCOL["CRYPTO_SESSION"]
    PAGEFAULT = _PROTOCOL["PAGEFAULT"]
    CONFIG = _PROTOCOL["CONFIG"]
    BACKEND_SEND_FD = _PROTOCOL["BACKEND_SEND_FD"]
    HOST_NOTIFIER = _PROTOCOL["HOST_NOTIFIER"]
    INFLIGHT_SHMFD = _PROTOCOL["INFLIGHT_SHMFD"]
    RESET_DEVICE = _PROTOCOL["RESET_DEVICE"]
    INBAND_NOTIFICATIONS = _PROTOCOL["INBAND_NOTIFICATIONS"]
    CONFIGURE_MEM_SLOTS = _PROTOCOL["CONFIGURE_MEM_SLOTS"]
    STATUS = _PROTOCOL["STATUS"]
    XEN_MMAP = _PROTOCOL["XEN_MMAP"]
    SHARED_OBJECT = _PROTOCOL["SHARED_OBJECT"]
    DEVICE_STATE = _PROTOCOL["DEVICE_STATE"]
    GET_VRING_BASE_INFLIGHT = _PROTOCOL["GET_VRING_BASE_INFLIGHT"]
    GPA_ADDRESSES = _PROTOCOL["GPA_ADDRESSES"]
    SHMEM = _PROTOCOL["SHMEM"]
    GET_VRING_BASE_SKIP_DRAIN = _PROTOCOL["GET_VRING_BASE_SKIP_DRAIN"]


#: Every protocol feature bit this version of the protocol defines.
ALL_PROTOCOL_FEATURES: Final[int] = sum(int(feature) for feature in ProtocolFeature)


class VirtioFeature(IntFlag):
    """Device-independent virtio and vhost feature bits of GET/SET_FEATURES."""

    NOTIFY_ON_EMPTY = _VIRTIO["NOTIFY_ON_EMPTY"]
    LOG_ALL = _VIRTIO["LOG_ALL"]
    ANY_LAYOUT = _VIRTIO["ANY_LAYOUT"]
    RING_INDIRECT_DESC = _VIRTIO["RING_INDIRECT_DESC"]
    RING_EVENT_IDX = _VIRTIO["RING_EVENT_IDX"]
    PROTOCOL_FEATURES = _VIRTIO["PROTOCOL_FEATURES"]
    VERSION_1 = _VIRTIO["VERSION_1"]
    ACCESS_PLATFORM = _VIRTIO["ACCESS_PLATFORM"]
    RING_PACKED = _VIRTIO["RING_PACKED"]
    IN_ORDER = _VIRTIO["IN_ORDER"]
    ORDER_PLATFORM = _VIRTIO["ORDER_PLATFORM"]
    SR_IOV = _VIRTIO["SR_IOV"]
    NOTIFICATION_DATA = _VIRTIO["NOTIFICATION_DATA"]
    NOTIF_CONFIG_DATA = _VIRTIO["NOTIF_CONFIG_DATA"]
    RING_RESET = _VIRTIO["RING_RESET"]
    ADMIN_VQ = _VIRTIO["ADMIN_VQ"]
    SUSPEND = _VIRTIO["SUSPEND"]


class BlkFeature(IntFlag):
    """virtio-blk device feature bits (virtio spec, ``VIRTIO_BLK_F_*``)."""

    BARRIER = _BLK["BARRIER"]
    SIZE_MAX = _BLK["SIZE_MAX"]
    SEG_MAX = _BLK["SEG_MAX"]
    GEOMETRY = _BLK["GEOMETRY"]
    RO = _BLK["RO"]
    BLK_SIZE = _BLK["BLK_SIZE"]
    SCSI = _BLK["SCSI"]
    FLUSH = _BLK["FLUSH"]
    TOPOLOGY = _BLK["TOPOLOGY"]
    CONFIG_WCE = _BLK["CONFIG_WCE"]
    MQ = _BLK["MQ"]
    DISCARD = _BLK["DISCARD"]
    WRITE_ZEROES = _BLK["WRITE_ZEROES"]
    LIFETIME = _BLK["LIFETIME"]
    SECURE_ERASE = _BLK["SECURE_ERASE"]
    ZONED = _BLK["ZONED"]


class NetFeature(IntFlag):
    """virtio-net device feature bits (virtio spec, ``VIRTIO_NET_F_*``)."""

    CSUM = _NET["CSUM"]
    GUEST_CSUM = _NET["GUEST_CSUM"]
    CTRL_GUEST_OFFLOADS = _NET["CTRL_GUEST_OFFLOADS"]
    MTU = _NET["MTU"]
    MAC = _NET["MAC"]
    GSO = _NET["GSO"]
    GUEST_TSO4 = _NET["GUEST_TSO4"]
    GUEST_TSO6 = _NET["GUEST_TSO6"]
    GUEST_ECN = _NET["GUEST_ECN"]
    GUEST_UFO = _NET["GUEST_UFO"]
    HOST_TSO4 = _NET["HOST_TSO4"]
    HOST_TSO6 = _NET["HOST_TSO6"]
    HOST_ECN = _NET["HOST_ECN"]
    HOST_UFO = _NET["HOST_UFO"]
    MRG_RXBUF = _NET["MRG_RXBUF"]
    STATUS = _NET["STATUS"]
    CTRL_VQ = _NET["CTRL_VQ"]
    CTRL_RX = _NET["CTRL_RX"]
    CTRL_VLAN = _NET["CTRL_VLAN"]
    CTRL_RX_EXTRA = _NET["CTRL_RX_EXTRA"]
    GUEST_ANNOUNCE = _NET["GUEST_ANNOUNCE"]
    MQ = _NET["MQ"]
    CTRL_MAC_ADDR = _NET["CTRL_MAC_ADDR"]
    GUEST_USO4 = _NET["GUEST_USO4"]
    GUEST_USO6 = _NET["GUEST_USO6"]
    HOST_USO = _NET["HOST_USO"]
    HASH_REPORT = _NET["HASH_REPORT"]
    GUEST_HDRLEN = _NET["GUEST_HDRLEN"]
    RSS = _NET["RSS"]
    RSC_EXT = _NET["RSC_EXT"]
    STANDBY = _NET["STANDBY"]
    SPEED_DUPLEX = _NET["SPEED_DUPLEX"]


class DeviceStatus(IntFlag):
    """The virtio device status byte of SET_STATUS / GET_STATUS; 0 = reset."""

    ACKNOWLEDGE = _STATUS["ACKNOWLEDGE"]
    DRIVER = _STATUS["DRIVER"]
    DRIVER_OK = _STATUS["DRIVER_OK"]
    FEATURES_OK = _STATUS["FEATURES_OK"]
    SUSPEND = _STATUS["SUSPEND"]
    DEVICE_NEEDS_RESET = _STATUS["DEVICE_NEEDS_RESET"]
    FAILED = _STATUS["FAILED"]


class IotlbType(IntEnum):
    """``type`` of a vhost_iotlb_msg."""

    MISS = _IOTLB_TYPE["MISS"]
    UPDATE = _IOTLB_TYPE["UPDATE"]
    INVALIDATE = _IOTLB_TYPE["INVALIDATE"]
    ACCESS_FAIL = _IOTLB_TYPE["ACCESS_FAIL"]


class IotlbPerm(IntEnum):
    """``perm`` of a vhost_iotlb_msg."""

    NONE = _IOTLB_PERM["NONE"]
    RO = _IOTLB_PERM["RO"]
    WO = _IOTLB_PERM["WO"]
    RW = _IOTLB_PERM["RW"]


class ConfigFlags(IntEnum):
    """``flags`` of a config space message."""

    FRONTEND = _CONFIG["FRONTEND"]
    MIGRATION = _CONFIG["MIGRATION"]


class TransferDirection(IntEnum):
    """``direction`` of SET_DEVICE_STATE_FD."""

    SAVE = _DIRECTION["SAVE"]
    LOAD = _DIRECTION["LOAD"]


class XenMmapFlag(IntFlag):
    """``xen_mmap_flags`` of a memory region with XEN_MMAP."""

    FOREIGN = _XEN["FOREIGN"]
    GRANT = _XEN["GRANT"]
    NO_ADVANCE_MAP = _XEN["NO_ADVANCE_MAP"]  # 0x8 as front-ends send it (specs/bits.yaml)


class TransferPhase(IntEnum):
    """``phase`` of SET_DEVICE_STATE_FD."""

    STOPPED = _PHASE["STOPPED"]


#: Bits a device type defines for itself (virtio: 0-23 and 50-63 of the 64-bit word).
DEVICE_FEATURE_MASK: Final[int] = sum(
    1 << bit for low, high in _BITS["device_feature_ranges"] for bit in range(low, high + 1)
)

#: virtio-net's largest number of queue pairs (max_virtqueue_pairs).
NET_MAX_QUEUE_PAIRS: Final[int] = int(_BITS["net_max_queue_pairs"])

_DECLARED: tuple[tuple[type[IntEnum] | type[IntFlag], dict[str, int]], ...] = (
    (HeaderFlags, _HEADER),
    (ProtocolFeature, _PROTOCOL),
    (VirtioFeature, _VIRTIO),
    (BlkFeature, _BLK),
    (NetFeature, _NET),
    (DeviceStatus, _STATUS),
    (XenMmapFlag, _XEN),
    (IotlbType, _IOTLB_TYPE),
    (IotlbPerm, _IOTLB_PERM),
    (ConfigFlags, _CONFIG),
    (TransferDirection, _DIRECTION),
    (TransferPhase, _PHASE),
)


def _check_declared() -> None:
    """Each enum names exactly the members bits.yaml declares (no silent drift)."""
    for flag_enum, declared in _DECLARED:
        if set(flag_enum.__members__) != set(declared):
            raise VhsmError(
                f"specs/bits.yaml and vhsm.wire.enums name different {flag_enum.__name__} members"
            )


_check_declared()


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
