"""The cases of the active back-end suite: legal scenarios, and one bad input per rule.

Each method returns an outcome and a detail (see `vhsm.audit.probe`), or
raises `Skip` when the back-end does not offer what the case needs.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence

import attrs

from vhsm.audit.probe import BAD_INDEX, FOREIGN_UVA, RING_SIZE, Skip, SuiteCore, _ack_value
from vhsm.audit.report import Outcome
from vhsm.devices.vsock_packet import Op as VsockOp
from vhsm.errors import BackendError
from vhsm.frontend import (
    SUPPORTED_PROTOCOL_FEATURES,
    BlkDevice,
    Frontend,
    NetDevice,
    RngDevice,
)
from vhsm.frontend.vsock import VsockDevice
from vhsm.session.machines import load_machine_spec
from vhsm.transport import PeerClosed
from vhsm.wire import (
    BlkFeature,
    DeviceStatus,
    FrontendReq,
    HeaderFlags,
    Message,
    NetFeature,
    ProtocolFeature,
    VhostUserConfig,
    VhostUserInflight,
    VhostUserLog,
    VhostUserMemory,
    VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringFd,
    VhostUserVringState,
    VirtioFeature,
)
from vhsm.wire.enums import ALL_PROTOCOL_FEATURES, DEVICE_FEATURE_MASK
from vhsm.wire.framing import HEADER

PF = ProtocolFeature


class Scenarios(SuiteCore):
    """Legal sequences a back-end must accept and carry out."""

    # --- scenarios ------------------------------------------------------------------------
    def s_qemu_order(self) -> tuple[Outcome, str]:
        """GET_FEATURES, protocol features, queries, SET_OWNER, SET_FEATURES, memory, rings."""
        self._started(backend_req=True)
        return "pass", ""

    def s_owner_first(self) -> tuple[Outcome, str]:
        """Cloud Hypervisor's order: SET_OWNER before everything."""
        self._started(owner_first=True, backend_req=True)
        return "pass", ""

    def s_protocol_first(self) -> tuple[Outcome, str]:
        """GET/SET_PROTOCOL_FEATURES before SET_OWNER and SET_FEATURES must be accepted."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        fe = self._connect()
        fe.get_protocol_features()
        fe.set_protocol_features(fe.offered_protocol_features & SUPPORTED_PROTOCOL_FEATURES)
        fe.set_owner()
        fe.set_features(fe.default_features(fe.offered_features))
        fe.get_features()  # barrier
        return "pass", ""

    def s_renegotiate(self) -> tuple[Outcome, str]:
        """Stop the rings, SET_FEATURES with fewer bits, set the rings up again, use them."""
        fe = self._started()
        self._round_trip(fe)
        for i in self.queues:
            fe.stop_vring(i)
        fewer = fe.acked_features & ~int(
            VirtioFeature.RING_EVENT_IDX | VirtioFeature.RING_INDIRECT_DESC
        )
        fe.set_features(fewer)
        for i in self.queues:
            fe.setup_vring(i, RING_SIZE)
        return self._round_trip(fe, "after renegotiation")

    def s_mem_replace(self) -> tuple[Outcome, str]:
        """SET_MEM_TABLE again (one more region) while rings run; rings re-translated."""
        fe = self._started()
        self._round_trip(fe)
        fe.memory.add_region(0x4000_0000, 1 << 20)
        fe.set_mem_table()
        self._round_trip(fe, "after adding a region")
        fe.set_mem_table()
        return self._round_trip(fe, "after the same table again")

    def s_add_rem(self) -> tuple[Outcome, str]:
        """ADD_MEM_REG then REM_MEM_REG of a region while rings run."""
        self._need_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        fe = self._started()
        if not fe.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise Skip("CONFIGURE_MEM_SLOTS not negotiated")
        slots = fe.max_mem_slots or 0
        if slots < 2:
            return "fail", f"GET_MAX_MEM_SLOTS answered {slots}"
        fe.add_mem_region(0x4000_0000, 1 << 20)
        self._round_trip(fe, "after ADD_MEM_REG")
        fe.remove_mem_region(0x4000_0000)
        return self._round_trip(fe, "after REM_MEM_REG")

    def s_ring_cycles(self) -> tuple[Outcome, str]:
        """GET_VRING_BASE stops a ring and reports where it stopped; restarting resumes."""
        fe = self._started()
        for cycle in range(3):
            self._round_trip(fe, f"cycle {cycle}")
            # the last ring is the one the round trip fills (net: TX); a receive ring
            # keeps its buffers until traffic comes (a TAP, a sink)
            vq = fe.vring(self.queues[-1])
            expected = getattr(vq.driver, "avail_idx", None)
            reply = fe.call(FrontendReq.GET_VRING_BASE, VhostUserVringState(vq.index, 0))
            state = reply.payload if reply is not None else None
            if not isinstance(state, VhostUserVringState):
                return "fail", "GET_VRING_BASE answered without a vring state"
            if state.index != vq.index:
                return "fail", f"GET_VRING_BASE answered ring {state.index}, asked {vq.index}"
            if expected is not None and self.device != "generic" and state.num != expected:
                return "fail", f"base {state.num} after {expected} buffers were consumed"
            vq.base = state.num
            fe.restart_vring(vq.index)
            if fe.protocol_features_in_use:
                fe.enable_vring(vq.index, True)
        return self._round_trip(fe, "after the last restart")

    def s_disabled_ring(self) -> tuple[Outcome, str]:
        """A started but disabled ring is processed without side effects (VU-STATE-008)."""
        if self.device not in ("rng", "blk"):
            raise Skip("only judged for rng and blk (net drops frames instead)")
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("rings cannot be disabled without VHOST_USER_F_PROTOCOL_FEATURES")
        fe = self._started()
        self._round_trip(fe)
        vq = fe.vring(self.queues[0])
        fe.enable_vring(vq.index, False)
        gpa = fe.memory.alloc(512)
        if self.device == "rng":
            vq.post([], [(gpa, 64)])
        else:
            header = fe.memory.alloc(16)
            fe.memory.write(header, struct.pack("<IIQ", 0, 0, 0))
            vq.post([(header, 16)], [(gpa, 512), (gpa + 512 - 1, 1)])
        vq.kick(force=True)
        time.sleep(min(0.3, self.timeout))
        if vq.get_used() is not None:
            return "fail", "a buffer was used while the ring was disabled"
        fe.enable_vring(vq.index, True)
        vq.kick(force=True)
        try:
            vq.wait_used(self.timeout)
        except TimeoutError:
            return "pass", "the buffer posted while disabled was not used after enabling either"
        return "pass", ""

    def s_enable_cycles(self) -> tuple[Outcome, str]:
        """SET_VRING_ENABLE 0/1 repeatedly; the ring works after each enable."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        fe = self._started()
        for cycle in range(3):
            for i in self.queues:
                fe.enable_vring(i, False)
            for i in self.queues:
                fe.enable_vring(i, True)
            self._round_trip(fe, f"cycle {cycle}")
        return "pass", ""

    def s_reset(self) -> tuple[Outcome, str]:
        """RESET_DEVICE, then the whole set-up again on the same connection."""
        self._need_protocol(ProtocolFeature.RESET_DEVICE)
        fe = self._started()
        self._round_trip(fe)
        fe.reset_device()
        fe.set_features(fe.acked_features)
        fe.set_mem_table()
        for i in self.queues:
            fe.setup_vring(i, RING_SIZE)
        return self._round_trip(fe, "after RESET_DEVICE")

    def s_status(self) -> tuple[Outcome, str]:
        """SET_STATUS then GET_STATUS gives the byte back."""
        self._need_protocol(ProtocolFeature.STATUS)
        fe = self._started()
        want = fe.status
        got = fe.get_status()
        if got & 0xFF != want & 0xFF:
            return "fail", f"GET_STATUS {got:#x} after SET_STATUS {want:#x}"
        expected = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.DRIVER_OK
        if not got & expected:
            return "fail", f"status {got:#x} lost the driver bits"
        return "pass", ""

    def s_config(self) -> tuple[Outcome, str]:
        """GET_CONFIG answers with exactly the size asked."""
        self._need_protocol(ProtocolFeature.CONFIG)
        fe = self._negotiated()
        if not fe.has_protocol(ProtocolFeature.CONFIG):
            raise Skip("CONFIG not negotiated")
        reply = fe.request(FrontendReq.GET_CONFIG, VhostUserConfig(0, 8, 0, bytes(8)))
        payload = reply.payload if reply is not None else None
        if not isinstance(payload, VhostUserConfig):
            return "fail", "GET_CONFIG of 8 bytes answered with an empty payload"
        if payload.size != 8 or len(payload.payload) != 8:
            return "fail", f"GET_CONFIG of 8 bytes answered {payload.size}"
        return "pass", ""

    def s_reconnect(self) -> tuple[Outcome, str]:
        """Disconnect, connect again, redo the set-up resuming the rings."""
        fe = self._started()
        self._round_trip(fe)
        deadline = time.monotonic() + self.timeout * 2
        while True:
            try:
                fe.reconnect(self.timeout)
                break
            except (PeerClosed, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return self._round_trip(fe, "after reconnecting")

    def s_data(self) -> tuple[Outcome, str]:
        """The device type's own round trip."""
        if self.device == "generic":
            raise Skip("no data round trip for a generic device")
        fe = self._started()
        return self._round_trip(fe)

    def s_acks(self) -> tuple[Outcome, str]:
        """With REPLY_ACK, every request sent with NEED_REPLY is acked (the set-up relies on it)."""
        self._need_protocol(ProtocolFeature.REPLY_ACK)
        fe = self._started()
        for i in self.queues:
            reply = fe.request(
                FrontendReq.SET_VRING_CALL,
                VhostUserVringFd(i),
                fds=[fe.vring(i).call_fd],
                need_reply=True,
            )
            if reply is None or not isinstance(reply.payload, VhostUserU64):
                return "fail", "SET_VRING_CALL with NEED_REPLY got no u64 ack"
        return "pass", ""

    def _round_trip(self, fe: Frontend, when: str = "") -> tuple[Outcome, str]:
        """Move data through the device; raise BackendError if it does not work."""
        suffix = f" ({when})" if when else ""
        try:
            if self.device == "rng":
                got = RngDevice(fe, self.queues[0]).read(64)
                if not got:
                    raise BackendError("rng: 0 bytes")
            elif self.device == "blk":
                blk = BlkDevice(fe, self.queues[0])
                before = blk.read(0, 1)
                if not fe.acked_features & BlkFeature.RO:
                    blk.write(0, before)  # unchanged: the audit never alters the disk
                    if blk.read(0, 1) != before:
                        raise BackendError("blk: sector 0 changed after writing it back")
                if fe.acked_features & BlkFeature.FLUSH:
                    blk.flush()
            elif self.device == "net":
                net = NetDevice(fe, self.queues[0], self.queues[1])
                net.post_rx(1)
                net.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + bytes(50))
            elif self.device == "vsock":
                _vsock_round_trip(fe)
        except TimeoutError as exc:
            raise BackendError(f"data round trip{suffix}: {exc}") from None
        except BackendError as exc:
            raise BackendError(f"data round trip{suffix}: {exc}") from None
        return "pass", ""


def _vsock_round_trip(fe: Frontend) -> None:
    """A guest REQUEST to an unlikely host port must be answered (RST, or RESPONSE then RST).

    Exactly one receive buffer is posted and used, so the ring cycles stay exact.
    """
    if not fe.has_protocol(ProtocolFeature.CONFIG):
        raise BackendError("vsock: no CONFIG protocol feature to read the guest CID with")
    cid = int.from_bytes(fe.get_config(0, 8), "little")
    vsock = VsockDevice(fe, cid, rx_buffers=1)
    src, dst = 0x7FFF_0001, 0x7FFF_F00D
    vsock.send(vsock.header(VsockOp.REQUEST, src, dst))
    hdr, _ = vsock.recv(repost=False)
    if (hdr.src_port, hdr.dst_port) != (dst, src) or hdr.op not in (
        VsockOp.RST,
        VsockOp.RESPONSE,
    ):
        raise BackendError(f"vsock: REQUEST answered with {hdr}")
    if hdr.op == VsockOp.RESPONSE:
        vsock.send(vsock.header(VsockOp.RST, src, dst))


class BadInputs(SuiteCore):
    """Bad inputs, each breaking one rule of specs/rules.yaml, judged by `SuiteCore._judge`."""

    # --- framing (VU-FRAME-*) -------------------------------------------------------------
    def b_flags(self, flags: int) -> tuple[Outcome, str]:
        """GET_FEATURES with bad header flags: any answer means it was taken."""
        fe = self._connect()
        return self._judge(fe, HEADER.pack(FrontendReq.GET_FEATURES, flags, 0))

    def b_unknown(self) -> tuple[Outcome, str]:
        """Request code 99 with NEED_REPLY (when REPLY_ACK is negotiated)."""
        fe = self._negotiated()
        flags = HeaderFlags.VERSION_1 | (HeaderFlags.NEED_REPLY if fe.reply_ack else 0)
        return self._judge(fe, HEADER.pack(99, flags, 0), rejected=_nack)

    def b_code_zero(self) -> tuple[Outcome, str]:
        """Request code 0 (VHOST_USER_NONE)."""
        fe = self._negotiated()
        return self._judge(fe, HEADER.pack(0, HeaderFlags.VERSION_1, 0))

    def b_unknown_silent(self) -> tuple[Outcome, str]:
        """An unknown request without NEED_REPLY: the connection must close."""
        fe = self._negotiated()
        return self._judge(fe, HEADER.pack(99, HeaderFlags.VERSION_1, 0))

    def b_oversized(self, size: int) -> tuple[Outcome, str]:
        """A header announcing a payload above 4096 bytes, and no payload."""
        fe = self._connect()
        return self._judge(fe, HEADER.pack(FrontendReq.SET_FEATURES, 1, size & 0xFFFF_FFFF))

    def b_short_u64(self) -> tuple[Outcome, str]:
        """SET_FEATURES with a 4-byte payload."""
        fe = self._connect()
        fe.set_owner()
        return self._bad(fe, FrontendReq.SET_FEATURES, struct.pack("<I", 1))

    def b_long_state(self) -> tuple[Outcome, str]:
        """SET_VRING_NUM with 16 bytes."""
        fe = self._with_memory()
        return self._bad(fe, FrontendReq.SET_VRING_NUM, struct.pack("<IIQ", 0, RING_SIZE, 0))

    def b_payload_on_get(self) -> tuple[Outcome, str]:
        """GET_FEATURES carrying 8 bytes."""
        fe = self._connect()
        return self._judge(fe, HEADER.pack(FrontendReq.GET_FEATURES, 1, 8) + bytes(8))

    def b_truncated(self) -> tuple[Outcome, str]:
        """Half a header, then the end of the stream: the back-end must survive."""
        fe = self._connect()
        fe.send_raw(HEADER.pack(FrontendReq.GET_FEATURES, 1, 0)[:6])
        fe.disconnect()
        ok, why = self._alive()
        return ("pass", "") if ok else ("crashed", why)

    def b_fd_on_get(self) -> tuple[Outcome, str]:
        """GET_FEATURES with an eventfd attached."""
        fe = self._connect()
        data = HEADER.pack(FrontendReq.GET_FEATURES, 1, 0)
        return self._judge(fe, data, [os.eventfd(0, os.EFD_CLOEXEC)])

    def b_fd_on_num(self) -> tuple[Outcome, str]:
        """SET_VRING_NUM with an eventfd attached."""
        fe = self._with_memory()
        return self._bad(
            fe,
            FrontendReq.SET_VRING_NUM,
            VhostUserVringState(0, RING_SIZE),
            [os.eventfd(0, os.EFD_CLOEXEC)],
        )

    # --- negotiation (VU-NEG-*) -------------------------------------------------------------
    def b_no_vf30(self) -> tuple[Outcome, str]:
        """GET_PROTOCOL_FEATURES to a back-end that does not offer them."""
        if self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("the back-end offers VHOST_USER_F_PROTOCOL_FEATURES")
        fe = self._connect()
        return self._judge(fe, HEADER.pack(FrontendReq.GET_PROTOCOL_FEATURES, 1, 0))

    def _minimal(self) -> Frontend:
        """Negotiated with REPLY_ACK only (when offered), no other protocol feature."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        return self._negotiated(protocol=self.offered_protocol & ProtocolFeature.REPLY_ACK)

    def b_gate_queue_num(self) -> tuple[Outcome, str]:
        """GET_QUEUE_NUM without MQ negotiated."""
        self._need_protocol(ProtocolFeature.MQ)
        fe = self._minimal()
        return self._judge(fe, HEADER.pack(FrontendReq.GET_QUEUE_NUM, 1, 0))

    def b_gate_reset(self) -> tuple[Outcome, str]:
        """RESET_DEVICE without RESET_DEVICE negotiated."""
        self._need_protocol(ProtocolFeature.RESET_DEVICE)
        fe = self._minimal()
        return self._bad(fe, FrontendReq.RESET_DEVICE)

    def b_gate_config(self) -> tuple[Outcome, str]:
        """GET_CONFIG without CONFIG negotiated."""
        self._need_protocol(ProtocolFeature.CONFIG)
        fe = self._minimal()
        return self._bad(
            fe, FrontendReq.GET_CONFIG, VhostUserConfig(0, 8, 0, bytes(8)), rejected=_empty
        )

    def b_enable_no_vf30(self) -> tuple[Outcome, str]:
        """SET_VRING_ENABLE after SET_FEATURES without VHOST_USER_F_PROTOCOL_FEATURES."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        fe = self._connect()
        features = fe.default_features(self.offered) & ~int(VirtioFeature.PROTOCOL_FEATURES)
        fe.set_owner()  # no protocol features at all: the rings are enabled from the start
        fe.set_features(features)
        fe.set_mem_table()
        return self._bad(fe, FrontendReq.SET_VRING_ENABLE, VhostUserVringState(0, 1))

    def b_unoffered(self) -> tuple[Outcome, str]:
        """SET_FEATURES acking a device bit the back-end never offered."""
        bit = _unoffered_bit(self.offered)
        fe = self._connect()
        if self.offered & VirtioFeature.PROTOCOL_FEATURES:
            fe.get_protocol_features()
            fe.set_protocol_features(self.offered_protocol & SUPPORTED_PROTOCOL_FEATURES)
        fe.set_owner()
        features = fe.default_features(self.offered) | bit
        return self._bad(fe, FrontendReq.SET_FEATURES, VhostUserU64(features))

    def b_unoffered_pf(self) -> tuple[Outcome, str]:
        """SET_PROTOCOL_FEATURES with a bit the back-end never offered."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        own_rules = (
            PF.INBAND_NOTIFICATIONS,
            PF.GET_VRING_BASE_INFLIGHT,
            PF.GET_VRING_BASE_SKIP_DRAIN,
        )
        spare = [f for f in PF if not self.offered_protocol & f and f not in own_rules]
        if not spare:
            raise Skip("every protocol feature bit is offered")
        fe = self._connect()
        fe.get_protocol_features()
        value = (self.offered_protocol & ALL_PROTOCOL_FEATURES & ~PF.INBAND_NOTIFICATIONS) | spare[
            0
        ]
        return self._bad(
            fe, FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(value), flags=HeaderFlags.VERSION_1
        )

    def b_inband(self) -> tuple[Outcome, str]:
        """INBAND_NOTIFICATIONS without REPLY_ACK and BACKEND_REQ."""
        self._need_protocol(ProtocolFeature.INBAND_NOTIFICATIONS)
        fe = self._connect()
        fe.get_protocol_features()
        return self._bad(
            fe,
            FrontendReq.SET_PROTOCOL_FEATURES,
            VhostUserU64(int(ProtocolFeature.INBAND_NOTIFICATIONS)),
            flags=HeaderFlags.VERSION_1,
        )

    # --- rings (VU-RING-*) ------------------------------------------------------------------
    def b_index_num(self) -> tuple[Outcome, str]:
        """SET_VRING_NUM for a ring the device does not have."""
        fe = self._with_memory()
        return self._bad(fe, FrontendReq.SET_VRING_NUM, VhostUserVringState(BAD_INDEX, RING_SIZE))

    def b_index_call(self) -> tuple[Outcome, str]:
        """SET_VRING_CALL for a ring the device does not have."""
        fe = self._with_memory()
        return self._bad(
            fe,
            FrontendReq.SET_VRING_CALL,
            VhostUserVringFd(BAD_INDEX),
            [os.eventfd(0, os.EFD_CLOEXEC)],
        )

    def b_ring_size(self, size: int) -> tuple[Outcome, str]:
        """SET_VRING_NUM with an impossible size."""
        fe = self._with_memory()
        return self._bad(fe, FrontendReq.SET_VRING_NUM, VhostUserVringState(0, size))

    def _ring_addr(self, fe: Frontend, **change: int) -> VhostUserVringAddr:
        base = fe.memory.alloc(RING_SIZE * 32 + 4096, align=4096)
        mem = fe.memory
        addr = VhostUserVringAddr(
            0,
            0,
            mem.gpa_to_uva(base),
            mem.gpa_to_uva(base + RING_SIZE * 16 + 2048),
            mem.gpa_to_uva(base + RING_SIZE * 16),
            base + RING_SIZE * 16 + 2048,
        )
        return attrs.evolve(addr, **change)

    def b_misaligned(self) -> tuple[Outcome, str]:
        """SET_VRING_ADDR with a descriptor table on an 8-byte boundary."""
        fe = self._with_memory()
        fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, RING_SIZE))
        addr = self._ring_addr(fe)
        bad = attrs.evolve(addr, desc_user_addr=addr.desc_user_addr + 8)
        return self._bad(fe, FrontendReq.SET_VRING_ADDR, bad)

    def b_addr_flags(self) -> tuple[Outcome, str]:
        """SET_VRING_ADDR with an unknown flag bit."""
        fe = self._with_memory()
        fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, RING_SIZE))
        return self._bad(fe, FrontendReq.SET_VRING_ADDR, self._ring_addr(fe, flags=0x2))

    def b_addr_outside(self) -> tuple[Outcome, str]:
        """SET_VRING_ADDR pointing outside the memory table."""
        fe = self._with_memory()
        fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, RING_SIZE))
        bad = self._ring_addr(
            fe,
            desc_user_addr=FOREIGN_UVA,
            used_user_addr=FOREIGN_UVA + 0x2000,
            avail_user_addr=FOREIGN_UVA + 0x1000,
        )
        return self._bad(fe, FrontendReq.SET_VRING_ADDR, bad)

    def b_addr_no_table(self) -> tuple[Outcome, str]:
        """SET_VRING_ADDR before any memory table."""
        fe = self._negotiated()
        fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, RING_SIZE))
        return self._bad(fe, FrontendReq.SET_VRING_ADDR, self._ring_addr(fe))

    def b_base_reserved(self) -> tuple[Outcome, str]:
        """SET_VRING_BASE of a split ring with bits 16-31 set."""
        fe = self._with_memory()
        fe.call(FrontendReq.SET_VRING_NUM, VhostUserVringState(0, RING_SIZE))
        return self._bad(fe, FrontendReq.SET_VRING_BASE, VhostUserVringState(0, 0x0001_0000))

    def b_enable_two(self) -> tuple[Outcome, str]:
        """SET_VRING_ENABLE with num 2."""
        if not self.offered & VirtioFeature.PROTOCOL_FEATURES:
            raise Skip("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        fe = self._started()
        return self._bad(fe, FrontendReq.SET_VRING_ENABLE, VhostUserVringState(0, 2))

    def b_endian(self) -> tuple[Outcome, str]:
        """SET_VRING_ENDIAN with num 2."""
        self._need_protocol(ProtocolFeature.CROSS_ENDIAN)
        fe = self._with_memory()
        return self._bad(fe, FrontendReq.SET_VRING_ENDIAN, VhostUserVringState(0, 2))

    def b_kick_nofd(self) -> tuple[Outcome, str]:
        """SET_VRING_KICK with neither an fd nor the no-fd bit."""
        fe = self._with_memory()
        return self._bad(fe, FrontendReq.SET_VRING_KICK, VhostUserVringFd(0))

    def b_call_both(self) -> tuple[Outcome, str]:
        """SET_VRING_CALL with an fd and the no-fd bit."""
        fe = self._with_memory()
        return self._bad(
            fe,
            FrontendReq.SET_VRING_CALL,
            VhostUserVringFd(0, nofd=True),
            [os.eventfd(0, os.EFD_CLOEXEC)],
        )

    def b_err_two(self) -> tuple[Outcome, str]:
        """SET_VRING_ERR with two fds."""
        fe = self._with_memory()
        fds = [os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)]
        return self._bad(fe, FrontendReq.SET_VRING_ERR, VhostUserVringFd(0), fds)

    def b_kick_bits(self) -> tuple[Outcome, str]:
        """SET_VRING_KICK with bits 9-63 set."""
        fe = self._with_memory()
        return self._bad(
            fe,
            FrontendReq.SET_VRING_KICK,
            struct.pack("<Q", 0x1_0000),
            [os.eventfd(0, os.EFD_CLOEXEC)],
        )

    # --- memory (VU-MEM-*) ------------------------------------------------------------------
    def _table(
        self, fe: Frontend, regions: Sequence[VhostUserMemoryRegion], nfds: int | None = None
    ) -> tuple[Outcome, str]:
        fds = [_memfd(1 << 20) for _ in range(len(regions) if nfds is None else nfds)]
        return self._bad(fe, FrontendReq.SET_MEM_TABLE, VhostUserMemory(tuple(regions)), fds)

    def b_zero_regions(self) -> tuple[Outcome, str]:
        """SET_MEM_TABLE with no region."""
        return self._table(self._negotiated(), [])

    def b_nine_regions(self) -> tuple[Outcome, str]:
        """SET_MEM_TABLE with 9 regions (8 fds: a message carries at most 8)."""
        regions = [_region(i << 20, 1 << 20, 0x10_0000_0000 + (i << 20)) for i in range(9)]
        return self._table(self._negotiated(), regions, nfds=8)

    def b_region_nofd(self) -> tuple[Outcome, str]:
        """SET_MEM_TABLE with one region and no fd."""
        return self._table(self._negotiated(), [_region(0, 1 << 20, 0x10_0000_0000)], nfds=0)

    def b_table_size(self) -> tuple[Outcome, str]:
        """SET_MEM_TABLE announcing 1 region in a 2-region payload."""
        fe = self._negotiated()
        body = VhostUserMemory((_region(0, 1 << 20, 0x10_0000_0000),)).to_bytes() + bytes(32)
        return self._bad(fe, FrontendReq.SET_MEM_TABLE, body, [_memfd(1 << 20)])

    def b_region_empty(self) -> tuple[Outcome, str]:
        """A region of size 0."""
        return self._table(self._negotiated(), [_region(0, 0, 0x10_0000_0000)])

    def b_region_overflow(self) -> tuple[Outcome, str]:
        """A region whose guest range wraps around 2^64."""
        region = _region(0xFFFF_FFFF_FFF0_0000, 1 << 21, 0x10_0000_0000)
        return self._table(self._negotiated(), [region])

    def b_overlap_gpa(self) -> tuple[Outcome, str]:
        """Two regions sharing guest-physical addresses."""
        regions = [_region(0, 2 << 20, 0x10_0000_0000), _region(1 << 20, 2 << 20, 0x20_0000_0000)]
        return self._table(self._negotiated(), regions)

    def b_overlap_uva(self) -> tuple[Outcome, str]:
        """Two regions sharing user addresses."""
        regions = [_region(0, 2 << 20, 0x10_0000_0000), _region(8 << 20, 2 << 20, 0x10_0010_0000)]
        return self._table(self._negotiated(), regions)

    def _slots(self) -> Frontend:
        self._need_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS)
        fe = self._with_memory()
        if not fe.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            raise Skip("CONFIGURE_MEM_SLOTS not negotiated")
        return fe

    def b_add_overlap(self) -> tuple[Outcome, str]:
        """ADD_MEM_REG over the guest range of an existing region."""
        fe = self._slots()
        first = fe.memory.regions[0]
        region = _region(first.guest_phys_addr, 1 << 20, 0x30_0000_0000)
        return self._bad(
            fe, FrontendReq.ADD_MEM_REG, VhostUserSingleMemoryRegion(region), [_memfd(1 << 20)]
        )

    def b_add_nofd(self) -> tuple[Outcome, str]:
        """ADD_MEM_REG without its fd."""
        fe = self._slots()
        region = _region(0x4000_0000, 1 << 20, 0x30_0000_0000)
        return self._bad(fe, FrontendReq.ADD_MEM_REG, VhostUserSingleMemoryRegion(region))

    def b_rem_unknown(self) -> tuple[Outcome, str]:
        """REM_MEM_REG of a region that was never added."""
        fe = self._slots()
        region = _region(0x4000_0000, 1 << 20, 0x30_0000_0000)
        return self._bad(fe, FrontendReq.REM_MEM_REG, VhostUserSingleMemoryRegion(region))

    def b_rem_fds(self) -> tuple[Outcome, str]:
        """REM_MEM_REG of an existing region with two fds."""
        fe = self._slots()
        region = fe.memory.regions[0].descriptor()
        fds = [_memfd(4096), _memfd(4096)]
        return self._bad(fe, FrontendReq.REM_MEM_REG, VhostUserSingleMemoryRegion(region), fds)

    def b_log_nofd(self) -> tuple[Outcome, str]:
        """SET_LOG_BASE (LOG_SHMFD form) without its fd."""
        self._need_protocol(ProtocolFeature.LOG_SHMFD)
        fe = self._negotiated(protocol=self._supported_and(ProtocolFeature.LOG_SHMFD))
        return self._bad(
            fe, FrontendReq.SET_LOG_BASE, VhostUserLog(4096, 0), flags=HeaderFlags.VERSION_1
        )

    def b_log_fd_nofd(self) -> tuple[Outcome, str]:
        """SET_LOG_FD without its eventfd."""
        fe = self._negotiated()
        return self._bad(fe, FrontendReq.SET_LOG_FD)

    def b_backend_nofd(self) -> tuple[Outcome, str]:
        """SET_BACKEND_REQ_FD without its socket."""
        self._need_protocol(ProtocolFeature.BACKEND_REQ)
        fe = self._negotiated()
        return self._bad(fe, FrontendReq.SET_BACKEND_REQ_FD)

    def b_short_fd(self) -> tuple[Outcome, str]:
        """A region of 1 MiB backed by a 4 KiB memfd (touching it would SIGBUS)."""
        fe = self._negotiated()
        region = VhostUserMemory((_region(0, 1 << 20, 0x10_0000_0000),))
        return self._bad(fe, FrontendReq.SET_MEM_TABLE, region, [_memfd(4096)])

    # --- payloads (VU-PAY-*) ----------------------------------------------------------------
    def _supported_and(self, feature: ProtocolFeature) -> int:
        return int(self.offered_protocol & (SUPPORTED_PROTOCOL_FEATURES | feature))

    def b_config(self, size: int) -> tuple[Outcome, str]:
        """GET_CONFIG of an impossible size."""
        self._need_protocol(ProtocolFeature.CONFIG)
        fe = self._negotiated()
        config = VhostUserConfig(0, size, 0, bytes(size))
        return self._bad(fe, FrontendReq.GET_CONFIG, config, rejected=_empty)

    def b_inflight(self) -> tuple[Outcome, str]:
        """GET_INFLIGHT_FD for 0 queues."""
        self._need_protocol(ProtocolFeature.INFLIGHT_SHMFD)
        fe = self._negotiated()
        return self._bad(
            fe,
            FrontendReq.GET_INFLIGHT_FD,
            VhostUserInflight(0, 0, 0, RING_SIZE),
            rejected=_no_buffer,
        )

    def b_status(self) -> tuple[Outcome, str]:
        """SET_STATUS with a value above 0xFF."""
        self._need_protocol(ProtocolFeature.STATUS)
        fe = self._negotiated()
        return self._bad(fe, FrontendReq.SET_STATUS, VhostUserU64(0x1FF))

    def b_mtu(self) -> tuple[Outcome, str]:
        """NET_SET_MTU below the IPv4 minimum."""
        self._need_protocol(ProtocolFeature.NET_MTU)
        if not self.offered & NetFeature.MTU:
            raise Skip("VIRTIO_NET_F_MTU not offered")
        fe = self._negotiated(protocol=self._supported_and(ProtocolFeature.NET_MTU))
        return self._bad(fe, FrontendReq.NET_SET_MTU, VhostUserU64(10))


def _region(gpa: int, size: int, uva: int) -> VhostUserMemoryRegion:
    return VhostUserMemoryRegion(gpa, size, uva, 0)


def _memfd(size: int) -> int:
    fd = os.memfd_create("vhsm-audit", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _unoffered_bit(offered: int) -> int:
    # not one of the bits real front-ends ack anyway (tolerated as VU-NEG-013)
    acks = load_machine_spec("features").conditions["acks_offered_bits"]
    tolerated = acks["tolerated_unoffered"]
    for bit in range(64):
        if bit in tolerated:
            continue
        if (1 << bit) & DEVICE_FEATURE_MASK and not offered & (1 << bit):
            return int(1 << bit)
    # every device bit offered: a bit outside the device ranges that virtio leaves unnamed
    named = sum(int(feature) for feature in VirtioFeature)
    return next(1 << bit for bit in range(64) if not (1 << bit) & (DEVICE_FEATURE_MASK | named))


def _nack(answer: Message) -> bool:
    return bool(_ack_value(answer))


def _empty(answer: Message) -> bool:
    return answer.payload is None or answer.error is not None


def _no_buffer(answer: Message) -> bool:
    payload = answer.payload
    return isinstance(payload, VhostUserInflight) and payload.mmap_size == 0 and not answer.fds
