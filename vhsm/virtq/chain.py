"""A descriptor chain popped from a virtqueue: the buffers the device reads and writes."""

from __future__ import annotations

from collections.abc import Sequence

#: DescriptorChain's slots in constructor order (the compiled path fills them in place).
CHAIN_SLOTS = ("head", "readable", "writable", "readable_len", "writable_len")


class DescriptorChain:
    """One available buffer: head id, device-readable then device-writable memoryviews.

    ``head`` is the id to hand back to ``add_used`` (split: head descriptor index;
    packed: buffer id). The views alias guest memory: they are valid while the memory
    snapshot the queue was built on is leased. Writes the device reports through
    ``add_used`` are dirty-logged by the queue.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: Sequence[memoryview],
        writable: Sequence[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_len}B"
            f"/{len(self.readable)}, writable={self.writable_len}B/{len(self.writable)})"
        )

    def read_all(self) -> bytes:
        """Copy every device-readable byte, in chain order."""
        if len(self.readable) == 1:
            return bytes(self.readable[0])
        return b"".join(self.readable)

    def read(self, size: int, offset: int = 0) -> bytes:
        """Copy up to ``size`` readable bytes starting ``offset`` bytes into the readable part."""
        out = bytearray()
        for view in self.readable:
            n = len(view)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, size - len(out))
            out += view[offset : offset + take]
            offset = 0
            if len(out) >= size:
                break
        return bytes(out)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers from ``offset``; returns bytes written.

        Writes stop at the end of the writable space (the result is then short).
        """
        src = memoryview(data).cast("B")
        done = 0
        total = len(src)
        for view in self.writable:
            n = len(view)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, total - done)
            view[offset : offset + take] = src[done : done + take]
            done += take
            offset = 0
            if done >= total:
                break
        return done

    def fill(self, value: int = 0) -> int:
        """Set every writable byte to ``value``; returns the writable length."""
        for view in self.writable:
            view[:] = bytes([value]) * len(view)
        return self.writable_len
