"""Linux ioctl request numbers, computed the way ``<asm-generic/ioctl.h>`` does.

``_IOC(dir, type, nr, size)`` packs a direction (2 bits), the argument size
(14 bits), a type character (8 bits) and a number (8 bits). The TAP device
(`vhsm.devices.tap`) and the Xen mappers (`vhsm.xen`) name their requests
with these helpers, so every number can be checked against the kernel headers.
"""

from __future__ import annotations

IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_TYPESHIFT = _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS


def ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """``_IOC``: one request number."""
    if not 0 <= size < 1 << _SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_SIZEBITS} bits")
    return (direction << _DIRSHIFT) | (size << _SIZESHIFT) | (ord(kind) << _TYPESHIFT) | nr


def io(kind: str, nr: int, size: int = 0) -> int:
    """``_IO``: no argument copied (``size`` is 0 except for Xen's own encoding)."""
    return ioc(IOC_NONE, kind, nr, size)


def iow(kind: str, nr: int, size: int) -> int:
    """``_IOW``: the kernel reads ``size`` bytes."""
    return ioc(IOC_WRITE, kind, nr, size)


def ior(kind: str, nr: int, size: int) -> int:
    """``_IOR``: the kernel writes ``size`` bytes."""
    return ioc(IOC_READ, kind, nr, size)


__all__ = ["IOC_NONE", "IOC_READ", "IOC_WRITE", "io", "ioc", "ior", "iow"]
