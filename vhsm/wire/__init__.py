"""vhsm.wire: the sans-IO codec of vhost-user messages (header, payloads, framing, JSON).

Every name below is imported from its module when it is first used: a daemon
waiting for a front-end holds the enumerations it needs (`vhsm.wire.enums`) and
none of the payload classes, the framing or the JSON forms (attrs, cattrs).
`vhsm.wire.catalogue` is the module of the request catalogue (its function
``catalogue()`` is `vhsm.wire.catalogue.catalogue`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhsm.wire.catalogue import (
        Check,
        RequestSpec,
        request_spec,
    )
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
    from vhsm.wire.jsonconv import (
        RecordError,
        describe_payload,
        message_to_record,
        payload_from_dict,
        payload_to_dict,
        record_to_message,
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

#: Each public name and the module of `vhsm.wire` that defines it.
_HOME = {
    "Check": "catalogue",
    "RequestSpec": "catalogue",
    "request_spec": "catalogue",
    "DEFAULT_MAX_MEM_SLOTS": "enums",
    "MAX_MEM_REGIONS": "enums",
    "MAX_PAYLOAD": "enums",
    "MAX_QUEUE_SIZE": "enums",
    "VRING_NOFD_MASK": "enums",
    "BackendReq": "enums",
    "BlkFeature": "enums",
    "Channel": "enums",
    "ConfigFlags": "enums",
    "DeviceStatus": "enums",
    "FrontendReq": "enums",
    "HeaderFlags": "enums",
    "IotlbPerm": "enums",
    "IotlbType": "enums",
    "NetFeature": "enums",
    "ProtocolFeature": "enums",
    "TransferDirection": "enums",
    "TransferPhase": "enums",
    "VirtioFeature": "enums",
    "feature_names": "enums",
    "request_name": "enums",
    "HEADER_SIZE": "framing",
    "MAX_FDS": "framing",
    "Decoder": "framing",
    "Message": "framing",
    "decode_message": "framing",
    "encode": "framing",
    "make_reply": "framing",
    "make_request": "framing",
    "PAYLOAD_CLASSES": "payloads",
    "Payload": "payloads",
    "VhostUserConfig": "payloads",
    "VhostUserInflight": "payloads",
    "VhostUserIotlb": "payloads",
    "VhostUserLog": "payloads",
    "VhostUserMemory": "payloads",
    "VhostUserMemoryRegion": "payloads",
    "VhostUserMMap": "payloads",
    "VhostUserOpaque": "payloads",
    "VhostUserShared": "payloads",
    "VhostUserShMemConfig": "payloads",
    "VhostUserSingleMemoryRegion": "payloads",
    "VhostUserTransferDeviceState": "payloads",
    "VhostUserU64": "payloads",
    "VhostUserVringAddr": "payloads",
    "VhostUserVringArea": "payloads",
    "VhostUserVringFd": "payloads",
    "VhostUserVringState": "payloads",
    "RecordError": "jsonconv",
    "describe_payload": "jsonconv",
    "message_to_record": "jsonconv",
    "payload_from_dict": "jsonconv",
    "payload_to_dict": "jsonconv",
    "record_to_message": "jsonconv",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used, then keep it here."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


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
