"""`vhsm.wire.enums`: every bit, flag and limit read from specs/, and written nowhere else."""

from __future__ import annotations

import ast
import io
import tokenize
from enum import Enum
from pathlib import Path

import pytest

from vhsm.errors import VhsmError
from vhsm.specs import load_spec
from vhsm.wire import enums
from vhsm.wire.enums import (
    DEFAULT_MAX_MEM_SLOTS,
    DEVICE_FEATURE_MASK,
    MAX_QUEUE_SIZE,
    NET_MAX_QUEUE_PAIRS,
    PACKED_BASE_INITIAL,
    RESERVED_FLAGS_MASK,
    VERSION_MASK,
    VRING_NOFD_MASK,
    BlkFeature,
    DeviceStatus,
    HeaderFlags,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
    XenMmapFlag,
)

ROOT = Path(__file__).resolve().parent.parent
ENUMS = ROOT / "vhsm" / "wire" / "enums.py"
SOURCES = [
    p
    for folder in ("vhsm", "benchmarks", "fuzz")
    for p in sorted((ROOT / folder).rglob("*.py"))
    if p != ENUMS
]
BITS = load_spec("bits")
FLAG_ENUMS: dict[type[Enum], str] = {
    ProtocolFeature: "protocol_features",
    VirtioFeature: "virtio_features",
    BlkFeature: "blk_features",
    NetFeature: "net_features",
    XenMmapFlag: "xen_mmap_flags",
}


@pytest.mark.parametrize("flag_enum", FLAG_ENUMS, ids=lambda e: e.__name__)
def test_feature_words_are_the_declared_bit_numbers(flag_enum: type[Enum]) -> None:
    declared = BITS[FLAG_ENUMS[flag_enum]]
    assert {m.name: m.value for m in flag_enum} == {n: 1 << b for n, b in declared.items()}


def test_flags_masks_and_limits_are_the_declared_values() -> None:
    assert {m.name: m.value for m in HeaderFlags} == BITS["header"]["flags"]
    assert VERSION_MASK == BITS["header"]["version_mask"] == 0x3
    assert BITS["header"]["reserved_flags_mask"] == RESERVED_FLAGS_MASK
    assert {m.name: m.value for m in DeviceStatus} == BITS["device_status"]
    assert BITS["net_max_queue_pairs"] == NET_MAX_QUEUE_PAIRS
    assert DEVICE_FEATURE_MASK == ((1 << 24) - 1) | (((1 << 64) - 1) ^ ((1 << 50) - 1))
    limits = load_spec("requests")["limits"]
    assert (
        limits["max_queue_size"],
        limits["default_max_mem_slots"],
    ) == (MAX_QUEUE_SIZE, DEFAULT_MAX_MEM_SLOTS)
    assert limits["nofd_bit"] == VRING_NOFD_MASK


def _constant(node: ast.expr) -> int | None:
    """The value of an int literal expression (``1 << 34``, ``0x8``), else None."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.LShift | ast.BitOr | ast.Mult):
        left, right = _constant(node.left), _constant(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.LShift):
            return left << right
        return left | right if isinstance(node.op, ast.BitOr) else left * right
    return None


def test_no_module_restates_a_declared_bit() -> None:
    """``RING_PACKED = 1 << 34`` outside enums.py is a second home for the fact."""
    declared = {
        member.name: int(member.value)
        for flag_enum in (*FLAG_ENUMS, HeaderFlags, DeviceStatus)
        for member in flag_enum
    }
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if not isinstance(target, ast.Name):
                continue
            name = target.id.lstrip("_").removeprefix("VIRTIO_F_").removeprefix("F_")
            if name in declared and _constant(value) == declared[name]:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {target.id}")
    assert offenders == []


#: Other facts that happen to share a value with a declared limit: (file, line text).
SAME_VALUE_ELSEWHERE = {
    ("vhsm/virtq/common.py", "VIRTQ_DESC_F_USED = 0x8000"),  # packed descriptor flag
    ("vhsm/inflight.py", "_USED = 1 << 15  # VRING_PACKED_DESC_F_USED"),
    ("vhsm/devices/tap.py", "IFF_MULTI_QUEUE = 0x0100"),  # Linux TUN flag
}


def test_no_bare_protocol_limit_in_the_sources() -> None:
    """32768, 509, masks, the packed initial base and the no-fd bit are read, never written.

    The no-fd bit is 0x100 = 256, also a common ring size: it is looked for in
    its hexadecimal spelling only.
    """
    limits = {
        MAX_QUEUE_SIZE,
        DEFAULT_MAX_MEM_SLOTS,
        RESERVED_FLAGS_MASK,
        NET_MAX_QUEUE_PAIRS,
        PACKED_BASE_INITIAL,
    }
    offenders = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        rel = str(path.relative_to(ROOT))
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type != tokenize.NUMBER:
                continue
            value = ast.literal_eval(token.string)
            hexa = token.string.lower().startswith("0x")
            if type(value) is not int:
                continue
            if value in limits or (hexa and value == VRING_NOFD_MASK):
                line = lines[token.start[0] - 1].strip()
                if (rel, line) not in SAME_VALUE_ELSEWHERE:
                    offenders.append(f"{rel}:{token.start[0]} {line}")
    assert offenders == []


def test_an_enum_and_the_declaration_that_drift_apart_fail_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    declared = {m.name: int(m.value) for m in ProtocolFeature}
    monkeypatch.setattr(enums, "_DECLARED", ((ProtocolFeature, {**declared, "NEW_BIT": 1 << 60}),))
    with pytest.raises(VhsmError, match="ProtocolFeature"):
        enums._check_declared()
