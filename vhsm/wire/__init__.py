"""vhsm.wire: the sans-IO codec of vhost-user messages (header, payloads, framing, JSON).

The JSON forms (`vhsm.wire.jsonconv`, built on cattrs) are imported on first use:
a daemon serves without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vhsm.wire.catalogue import Check, RequestSpec, catalogue, request_spec
from vhsm.wire.enums import (
    DEFAULT_MAX_MEM_SLOTS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    MAX_QUEUE_SIZE,
    VRING_NOFD_MASK,
    BackendReq,
    BlkFeature,
    Channel,
    ConfigFlags,
    DeviceStatus,
    FrontendReq,
    HeaderFlags,
    IotlbPerm,
    IotlbType,
    NetFeature,
    ProtocolFeature,
    TransferDirection,
    TransferPhase,
    VirtioFeature,
    feature_names,
    request_name,
)
from vhsm.wire.framing import (
    HEADER_SIZE,
    MAX_FDS,
    Decoder,
    Message,
    decode_message,
    encode,
    make_reply,
    make_request,
)
from vhsm.wire.payloads import (
    PAYLOAD_CLASSES,
    Payload,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserIotlb,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserMMap,
    VhostUserOpaque,
    VhostUserShared,
    VhostUserShMemConfig,
    VhostUserSingleMemoryRegion,
    VhostUserTransferDeviceState,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringArea,
    VhostUserVringFd,
    VhostUserVringState,
)

if TYPE_CHECKING:
    from vhsm.wire.jsonconv import (
        RecordError,
        describe_payload,
        message_to_record,
        payload_from_dict,
        payload_to_dict,
        record_to_message,
    )

#: Names served by `vhsm.wire.jsonconv`, imported when one is first asked for.
_JSON_NAMES = frozenset(
    {
        "RecordError",
        "describe_payload",
        "message_to_record",
        "payload_from_dict",
        "payload_to_dict",
        "record_to_message",
    }
)


def __getattr__(name: str) -> Any:
    """Import the JSON conversions (cattrs) only when one of their names is used."""
    if name in _JSON_NAMES:
        value = getattr(importlib.import_module("vhsm.wire.jsonconv"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD",
    "MAX_QUEUE_SIZE",
    "PAYLOAD_CLASSES",
    "VRING_NOFD_MASK",
    "BackendReq",
    "BlkFeature",
    "Channel",
    "Check",
    "ConfigFlags",
    "Decoder",
    "DeviceStatus",
    "FrontendReq",
    "HeaderFlags",
    "IotlbPerm",
    "IotlbType",
    "Message",
    "NetFeature",
    "Payload",
    "ProtocolFeature",
    "RecordError",
    "RequestSpec",
    "TransferDirection",
    "TransferPhase",
    "VhostUserConfig",
    "VhostUserInflight",
    "VhostUserIotlb",
    "VhostUserLog",
    "VhostUserMMap",
    "VhostUserMemory",
    "VhostUserMemoryRegion",
    "VhostUserOpaque",
    "VhostUserShMemConfig",
    "VhostUserShared",
    "VhostUserSingleMemoryRegion",
    "VhostUserTransferDeviceState",
    "VhostUserU64",
    "VhostUserVringAddr",
    "VhostUserVringArea",
    "VhostUserVringFd",
    "VhostUserVringState",
    "VirtioFeature",
    "catalogue",
    "decode_message",
    "describe_payload",
    "encode",
    "feature_names",
    "make_reply",
    "make_request",
    "message_to_record",
    "payload_from_dict",
    "payload_to_dict",
    "record_to_message",
    "request_name",
    "request_spec",
]
