"""Guest test scripts (busybox sh) and the host-side checks of what they did.

blk: the host seeds a raw image, the guest checks it reads the seed, writes random
data at aligned and 512-but-not-4096-aligned offsets (O_DIRECT and through the page
cache), flushes, reads everything back, and prints the checksums; the host then checks
the image file byte for byte (written regions by checksum, everything else unchanged).
rng: the guest checks that the virtio hwrng is current and reads from /dev/hwrng.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from .harness import GuestResult

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class BlkRegion:
    """One range the guest fills with random data.

    Attributes:
        name: key in the guest output (`region.<name>`).
        offset: byte offset on the disk (a multiple of 512).
        length: bytes to write (a multiple of 512).
        bs: dd block size; each block is one write() (None: the whole region at once).
        direct: O_DIRECT if True, else through the page cache.
    """

    name: str
    offset: int
    length: int
    bs: int | None = None
    direct: bool = True


DEFAULT_REGIONS = (
    # 16 writes of 64 KiB: several requests, multi-page buffers.
    BlkRegion("aligned", 0, 1 * MiB, bs=64 * KiB),
    # Seven single-sector writes at offsets that are not multiples of 4096.
    BlkRegion("sectors", 1 * MiB + 3 * 512, 7 * 512, bs=512),
    # One 5 KiB request starting 1.5 KiB before a 2 MiB boundary.
    BlkRegion("unaligned", 2 * MiB - 1536, 5 * KiB),
    # One large write at a 512-aligned offset: the block layer splits it.
    BlkRegion("large", 4 * MiB + 512, 1 * MiB + 3 * 512),
    # Through the page cache: reaches the disk only via sync / flush.
    BlkRegion("buffered", 6 * MiB, 260 * KiB, bs=4 * KiB, direct=False),
)


def _check_regions(regions: tuple[BlkRegion, ...], image_size: int) -> None:
    for r in regions:
        if r.offset % 512 or r.length % 512 or (r.bs or 512) % 512:
            raise ValueError(f"region {r.name} is not sector aligned")
        if r.bs is not None and r.length % r.bs:
            raise ValueError(f"region {r.name}: length is not a multiple of bs")
        if r.offset + r.length > image_size:
            raise ValueError(f"region {r.name} ends past the image")


@dataclass(frozen=True)
class BlkPlan:
    """The blk guest test: image layout, the script, and the host-side verification."""

    image_size: int = 16 * MiB
    regions: tuple[BlkRegion, ...] = DEFAULT_REGIONS
    seed_offset: int = 8 * MiB + 512
    seed: bytes = field(default_factory=lambda: os.urandom(512 * KiB))
    device: str = "/dev/vda"
    force_writeback: bool = True

    def __post_init__(self) -> None:
        spans = [(r.offset, r.offset + r.length) for r in self.regions]
        spans.append((self.seed_offset, self.seed_offset + len(self.seed)))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start < end:
                raise ValueError("blk regions overlap")
        _check_regions(self.regions, self.image_size)

    def prepare_image(self, path: Path) -> Path:
        """Create the raw image: zeros, plus the seed the guest must read back."""
        with open(path, "wb") as f:
            f.truncate(self.image_size)
            f.seek(self.seed_offset)
            f.write(self.seed)
        return path

    def script(self) -> str:
        """The busybox sh script run in the guest."""
        seed_sha = hashlib.sha256(self.seed).hexdigest()
        lines = [
            _BLK_PRELUDE.format(
                dev=self.device, size=self.image_size, writeback=int(self.force_writeback)
            ),
            'echo "step: read the host seed (O_DIRECT)"',
            f"got=$(rd {self.seed_offset} {len(self.seed)} 4096 ,direct)",
            f'[ "$got" = "{seed_sha}" ] || fail "seed mismatch: got $got"',
            f'echo "VHSM-KV seed={self.seed_offset}:{len(self.seed)}:$got"',
        ]
        for r in self.regions:
            flags = ",direct" if r.direct else ""
            lines.append(f"wr {r.name} {r.offset} {r.length} {r.bs or r.length} {flags}")
        lines.append(_BLK_FLUSH)
        for r in self.regions:
            lines.append(f"chk {r.name} {r.offset} {r.length} {r.bs or r.length}")
        lines.append(
            f"got=$(rd {self.seed_offset} {len(self.seed)} 4096 '')\n"
            f'[ "$got" = "{seed_sha}" ] || fail "seed changed: got $got"'
        )
        lines.append('echo "VHSM-KV blk=ok"')
        return "\n".join(lines) + "\n"

    def verify_image(self, path: Path, result: GuestResult) -> list[str]:
        """Check the image file against what the guest reported; returns the names checked.

        Raises:
            AssertionError: a region's checksum differs, a region was not reported, or a
                byte outside the written regions and the seed is not what it was.
        """
        data = Path(path).read_bytes()
        problems: list[str] = []
        if len(data) != self.image_size:
            problems.append(f"image size {len(data)} != {self.image_size}")
        checked: list[str] = []
        untouched = bytearray(data)
        for r in self.regions:
            reported = result.values.get(f"region.{r.name}")
            expected = f"{r.offset}:{r.length}:"
            if reported is None or not reported.startswith(expected):
                problems.append(f"region {r.name}: guest reported {reported!r}")
                continue
            want = reported[len(expected) :]
            got = hashlib.sha256(data[r.offset : r.offset + r.length]).hexdigest()
            if got != want:
                problems.append(f"region {r.name}: image has {got}, guest wrote {want}")
            untouched[r.offset : r.offset + r.length] = bytes(r.length)
            checked.append(r.name)
        end = self.seed_offset + len(self.seed)
        if data[self.seed_offset : end] != self.seed:
            problems.append("seed region changed in the image")
        untouched[self.seed_offset : end] = bytes(len(self.seed))
        if any(untouched):
            first = next(i for i, b in enumerate(untouched) if b)
            problems.append(f"stray write: image byte {first} is nonzero outside all regions")
        if problems:
            raise AssertionError(
                "image check failed:\n  " + "\n  ".join(problems) + "\n" + result.report()
            )
        return checked


_BLK_PRELUDE = """set -e
DEV={dev}
fail() {{ echo "FAIL: $*"; exit 1; }}
sha() {{ sha256sum | cut -d' ' -f1; }}
# rd OFF LEN BS IFLAGS: checksum of LEN bytes at OFF
rd() {{ dd if=$DEV bs=$3 skip=$1 count=$2 iflag=skip_bytes,count_bytes$4 2>/tmp/dd.err | sha; }}
# wr NAME OFF LEN BS OFLAGS: write LEN random bytes at OFF, BS bytes per write()
wr() {{
    echo "step: write $1 off=$2 len=$3 bs=$4 flags=$5"
    dd if=/dev/urandom of=/tmp/src.$1 bs=$3 count=1 iflag=fullblock 2>/dev/null
    dd if=/tmp/src.$1 of=$DEV bs=$4 seek=$2 oflag=seek_bytes$5 conv=notrunc 2>/tmp/dd.err \\
        || {{ cat /tmp/dd.err; fail "write $1"; }}
    want=$(sha </tmp/src.$1)
    got=$(rd $2 $3 $4 ,direct)
    [ "$got" = "$want" ] || {{ cat /tmp/dd.err; fail "$1 read back (O_DIRECT) $got != $want"; }}
    echo "VHSM-KV region.$1=$2:$3:$want"
}}
# chk NAME OFF LEN BS: after the flush, O_DIRECT and page-cache reads both match
chk() {{
    want=$(sha </tmp/src.$1)
    got=$(rd $2 $3 $4 ,direct)
    [ "$got" = "$want" ] || fail "$1 after flush (O_DIRECT) $got != $want"
    got=$(rd $2 $3 $4 '')
    [ "$got" = "$want" ] || fail "$1 after flush (page cache) $got != $want"
    echo "checked $1"
}}
i=0
while [ ! -b $DEV ]; do
    i=$((i + 1)); [ $i -le 100 ] || {{ ls /dev; dmesg | tail -20; fail "no $DEV"; }}
    sleep 0.1
done
name=${{DEV##*/}}
size=$(blockdev --getsize64 $DEV)
echo "VHSM-KV size=$size"
echo "VHSM-KV logical_block_size=$(cat /sys/block/$name/queue/logical_block_size)"
echo "VHSM-KV write_cache=$(cat /sys/block/$name/queue/write_cache)"
echo "VHSM-KV virtio_features=$(cat /sys/block/$name/device/features 2>/dev/null)"
[ "$size" = {size} ] || fail "disk size $size != {size}"
if [ {writeback} = 1 ] && [ "$(cat /sys/block/$name/queue/write_cache)" != "write back" ]; then
    # Turn the device's write cache on (virtio config write of `writeback`, only if
    # VIRTIO_BLK_F_CONFIG_WCE was negotiated) so that sync and fsync send FLUSH requests.
    echo "write back" >/sys/block/$name/cache_type 2>/dev/null || true
    echo "VHSM-KV write_cache_set=$(cat /sys/block/$name/queue/write_cache)"
fi
"""

_BLK_FLUSH = """echo "step: flush (sync, blockdev --flushbufs, drop caches)"
sync
blockdev --flushbufs $DEV
echo 3 >/proc/sys/vm/drop_caches
"""


VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34


def guest_virtio_features(result: GuestResult) -> int:
    """The device features the guest driver negotiated (sysfs `features`: bit i is char i)."""
    bits = result.values.get("virtio_features", "")
    return sum(1 << i for i, c in enumerate(bits) if c == "1")


def rng_script(nbytes: int = 8192) -> str:
    """Guest script: the current hwrng must be virtio; read `nbytes` from /dev/hwrng."""
    return f"""set -e
fail() {{ echo "FAIL: $*"; exit 1; }}
hw=/sys/class/misc/hw_random
i=0
while ! grep -q virtio $hw/rng_current 2>/dev/null; do
    i=$((i + 1))
    [ $i -le 100 ] || {{ cat $hw/rng_available $hw/rng_current; fail "virtio rng not current"; }}
    sleep 0.1
done
echo "VHSM-KV rng_available=$(cat $hw/rng_available)"
echo "VHSM-KV rng_current=$(cat $hw/rng_current)"
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat $d/device)" = 0x0004 ]; then
        echo "VHSM-KV virtio_features=$(cat $d/features)"
    fi
done
dd if=/dev/hwrng of=/tmp/rng bs={nbytes} count=1 iflag=fullblock 2>/tmp/dd.err \\
    || {{ cat /tmp/dd.err; fail "read /dev/hwrng"; }}
n=$(wc -c </tmp/rng)
echo "VHSM-KV rng_bytes=$n"
[ "$n" = {nbytes} ] || fail "read $n bytes from /dev/hwrng, wanted {nbytes}"
nonzero=$(tr -d '\\000' </tmp/rng | wc -c)
echo "VHSM-KV rng_nonzero_bytes=$nonzero"
[ "$nonzero" -gt 0 ] || fail "/dev/hwrng gave only zero bytes"
echo "VHSM-KV rng_sha256=$(sha256sum </tmp/rng | cut -d' ' -f1)"
"""


def check_rng_result(result: GuestResult, nbytes: int = 8192) -> None:
    """Assert the rng guest test passed and read `nbytes` from a virtio hwrng."""
    result.assert_passed()
    if result.values.get("rng_bytes") != str(nbytes):
        raise AssertionError(
            f"guest read {result.values.get('rng_bytes')} bytes\n" + result.report()
        )
    if not result.values.get("rng_current", "").startswith("virtio"):
        raise AssertionError("guest hwrng is not virtio\n" + result.report())


# --- net ------------------------------------------------------------------------------
#: ICMP payload sizes pinged: one frame up to 1472 bytes, IP fragments beyond (MTU 1500).
PING_SIZES = (56, 1000, 1472, 3000, 8000)
PING_COUNT = 2
ARP_COUNT = 3
_MTU_PAYLOAD = 1480  # IPv4 payload bytes per fragment at MTU 1500


@dataclass(frozen=True)
class NetNic:
    """One guest NIC of the net test.

    Attributes:
        name: key prefix in the guest output.
        mac: how the guest finds the interface.
        subnet: the NIC gets 10.0.<subnet>.1/24.
        loopback: the back-end returns every frame (else it drops them: a sink).
    """

    name: str
    mac: str
    subnet: int
    loopback: bool

    def expected_frames(self) -> int:
        """Frames the script sends at least: ARP requests plus every ping's fragments."""
        per_round = sum(-(-(size + 8) // _MTU_PAYLOAD) for size in PING_SIZES)
        return ARP_COUNT + PING_COUNT * per_round


_NET_STATS = (
    "tx_packets rx_packets tx_bytes rx_bytes tx_errors rx_errors tx_dropped rx_dropped "
    "rx_length_errors rx_crc_errors rx_frame_errors"
)

_NET_FUNCTIONS = f"""fail() {{ echo "FAIL: $*"; exit 1; }}
ifname() {{
    for d in /sys/class/net/*; do
        [ "$(cat $d/address)" = "$1" ] && {{ echo ${{d##*/}}; return 0; }}
    done
    return 1
}}
stat() {{ cat /sys/class/net/$1/statistics/$2; }}
# nic NAME MAC SUBNET LOOPBACK: bring the NIC up, send ARP and pings, report its counters
nic() {{
    i=0
    while ! dev=$(ifname $2); do
        i=$((i + 1)); [ $i -le 100 ] || fail "$1: no interface with MAC $2"; sleep 0.1
    done
    echo 1 >/proc/sys/net/ipv6/conf/$dev/disable_ipv6 2>/dev/null || true
    ip link set $dev up
    ip addr add 10.0.$3.1/24 dev $dev
    i=0
    while [ "$(cat /sys/class/net/$dev/carrier 2>/dev/null)" != 1 ]; do
        i=$((i + 1)); [ $i -le 100 ] || fail "$1: no carrier on $dev"; sleep 0.1
    done
    tx0=$(stat $dev tx_packets); rx0=$(stat $dev rx_packets)
    # Nobody answers on this wire: ARP for a stranger, then ping a peer whose MAC is
    # our own (a static entry), so every ICMP request leaves without ARP.
    arping -c {ARP_COUNT} -w {ARP_COUNT + 1} -I $dev 10.0.$3.3 >/dev/null || true
    arp -i $dev -s 10.0.$3.2 $2
    for s in {" ".join(map(str, PING_SIZES))}; do
        ping -c {PING_COUNT} -i 0.2 -W 1 -s $s 10.0.$3.2 >/dev/null || true
    done
    if [ $4 = 1 ]; then  # loopback: the last frames may still be on their way back
        i=0
        while [ $(stat $dev rx_packets) -lt $(stat $dev tx_packets) ] && [ $i -lt 50 ]; do
            i=$((i + 1)); sleep 0.1
        done
    fi
    echo "VHSM-KV $1.ifname=$dev"
    echo "VHSM-KV $1.tx_frames=$(( $(stat $dev tx_packets) - tx0 ))"
    echo "VHSM-KV $1.rx_frames=$(( $(stat $dev rx_packets) - rx0 ))"
    for k in {_NET_STATS}; do echo "VHSM-KV $1.$k=$(stat $dev $k)"; done
    echo "VHSM-KV $1.done=1"
}}
"""


def net_script(nics: tuple[NetNic, ...]) -> str:
    """Guest script: every NIC in parallel (each one's traffic only waits on its own wire)."""
    jobs = "".join(f"nic {n.name} {n.mac} {n.subnet} {int(n.loopback)} &\n" for n in nics)
    return _NET_FUNCTIONS + jobs + "wait\n"


def check_net_result(result: GuestResult, nic: NetNic) -> dict[str, int]:
    """Assert `nic` sent every frame, (loopback) got each back, and counted no error.

    Returns:
        The NIC's counters (and ``tx_frames`` / ``rx_frames`` of the test itself).
    """
    result.assert_passed()
    prefix = f"{nic.name}."
    values = {k[len(prefix) :]: v for k, v in result.values.items() if k.startswith(prefix)}
    problems = []
    if values.get("done") != "1":
        problems.append(f"{nic.name}: the guest script did not finish")
    counters = {k: int(v) for k, v in values.items() if v.isdigit()}
    sent, want = counters.get("tx_frames", 0), nic.expected_frames()
    if sent < want:
        problems.append(f"{nic.name}: {sent} frames sent, at least {want} expected")
    if nic.loopback:
        for kind in ("packets", "bytes"):
            tx, rx = counters.get(f"tx_{kind}"), counters.get(f"rx_{kind}")
            if tx != rx:
                problems.append(f"{nic.name}: loopback returned {rx} {kind} of {tx}")
    elif counters.get("rx_packets") != 0:
        problems.append(f"{nic.name}: a sink returned {counters.get('rx_packets')} frames")
    for key in _NET_STATS.split():
        if ("error" in key or "dropped" in key) and counters.get(key) != 0:
            problems.append(f"{nic.name}: {key}={counters.get(key)}")
    if problems:
        raise AssertionError(
            "net check failed:\n  " + "\n  ".join(problems) + "\n" + result.report()
        )
    return counters
