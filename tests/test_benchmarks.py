"""Smoke tests: each benchmark runs for about a second and still produces its table.

Nothing here is timed: the figures are printed, never compared. Benchmarks whose
external program (DPDK testpmd, qemu-storage-daemon) is missing are skipped with
the package to install.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from vhsm.cli import main as cli_main
from vhsm.commands.bench import BENCHMARKS, benchmarks_dir, load

pytestmark = pytest.mark.timeout(180)

NO_TESTPMD = "dpdk-testpmd not installed (Debian 12: apt-get install dpdk-dev)"
NO_QSD = "qemu-storage-daemon not installed (apt-get install qemu-system-common)"


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    if not benchmarks_dir().is_dir():
        pytest.skip("benchmarks/ is not next to the vhsm package (not a source checkout)")
    return {name: load(name) for name in BENCHMARKS}


def test_every_benchmark_script_exists() -> None:
    for script, _ in BENCHMARKS.values():
        assert (benchmarks_dir() / script).is_file(), script


def test_net_bench_sink_copies_by_default(bench: dict[str, Any]) -> None:
    """Like for like: DPDK's back-end copies each packet, so the vhsm sink does too."""
    parser = bench["net"].build_parser()
    assert parser.parse_args([]).sink_reads == "copy"
    assert parser.parse_args(["--sink-reads", "checksum"]).sink_reads == "checksum"


def test_virtq_bench_runs(bench: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench["virtq"].main(["--size", "256", "--chains", "2048"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (ring, descs, mode)
        for ring in ("split", "packed")
        for descs in ("1", "3")
        for mode in ("chain", "batch")
    }


def test_net_burst_runs(bench: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench["burst"].main(["--bursts", "20", "--frame", "300"]) == 0
    out = capsys.readouterr().out.splitlines()
    fits = [line.split()[:2] for line in out if " fit: " in line]
    assert fits == [[r, m] for r in ("split", "packed") for m in ("checksum", "copy")]
    assert len([line for line in out if line.split()[2:3] in (["16"], ["64"], ["256"])]) == 12


def test_net_burst_refuses_a_frame_too_big(bench: dict[str, Any]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench["burst"].main(["--frame", "5000"])
    assert exc.value.code == 2


@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason=NO_TESTPMD)
def test_net_dpdk_runs_both_backends(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = bench["net"]
    args = ["--seconds", "1", "--runs", "1", "--sizes", "64", "--rings", "split"]
    args += ["--ring-sizes", "512", "--queues", "1", "--workdir", str(tmp_path)]
    assert mod.main([*args, "--sink-reads", "checksum"]) == 0
    out = capsys.readouterr().out
    assert "placement: front-end testpmd on CPU" in out
    assert "vhsm sink reads each frame by: checksum" in out
    rows = {tuple(line.split()[:5]): line for line in out.splitlines() if "64B" in line}
    assert set(rows) == {
        ("split", "1q", "512d", "64B", "vhsm"),
        ("split", "1q", "512d", "64B", "dpdk"),
    }
    assert "failed" not in out
    # packets flowed through both back-ends (a max above zero; no rate is asserted)
    for line in rows.values():
        assert float(line.split()[7].replace(",", "")) > 0, line
    vdev = mod.frontend_vdev(mod.Config(64, "packed", 2, 1024), Path("/s"))
    assert vdev == "net_virtio_user0,path=/s,queues=2,queue_size=1024,packed_vq=1"


@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason=NO_TESTPMD)
def test_net_dpdk_packed_two_queue_pairs(bench: dict[str, Any], tmp_path: Path) -> None:
    mod = bench["net"]
    cfg = mod.Config(1500, "packed", 2, 1024)
    samples = mod.one_run("vhsm", cfg, 1, 1, tmp_path, "smoke")
    assert samples and max(samples) > 0


def test_net_dpdk_says_what_is_missing(
    bench: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert bench["net"].main(["--runs", "1"]) == 2
    assert "apt-get install dpdk-dev" in capsys.readouterr().err


def test_net_dpdk_refuses_an_unknown_ring_layout(
    bench: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench["net"].main(["--rings", "split,rings"])
    assert exc.value.code == 2
    assert "ring layouts are split and packed, not 'split,rings'" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason=NO_TESTPMD)
@pytest.mark.skipif(os.geteuid() != 0, reason="the TAP benchmark needs root (a netns)")
def test_tap_bench_counts_frames_on_the_tap(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = bench["tap"]
    args = ["--seconds", "1", "--runs", "1", "--sizes", "64", "--workdir", str(tmp_path)]
    assert mod.main(args) == 0
    out = capsys.readouterr().out
    assert "placement: front-end testpmd on CPU" in out
    (row,) = [line.split() for line in out.splitlines() if line.lstrip().startswith("64B")]
    assert float(row[3].replace(",", "")) > 0  # frames reached the TAP (max; no rate asserted)
    assert float(row[4]) > 0  # the back-end's CPU per frame was read
    assert "failed" not in out


@pytest.mark.skipif(os.geteuid() != 0, reason="the TAP benchmark needs root (a netns)")
def test_tap_bench_device_side_runs(
    bench: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench["tap"].main(["--device-side", "--bursts", "5", "--sizes", "64,1000"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:]]
    assert [r[0] for r in rows] == ["64B", "1000B"]
    for row in rows:  # CPU per frame was measured both ways (no figure is asserted)
        assert float(row[1].replace(",", "")) > 0 and float(row[2].replace(",", "")) > 0


def test_tap_bench_says_what_is_missing(
    bench: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert bench["tap"].main(["--runs", "1"]) == 2
    assert "apt-get install dpdk-dev" in capsys.readouterr().err


def test_blk_vhsm_runs(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--seconds", "0.5", "--runs", "1", "--depths", "1,32", "--backends", "vhsm"]
    assert bench["blk"].main([*args, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("QD")] == [
        ["QD1", "vhsm"],
        ["QD32", "vhsm"],
    ]
    assert "failed" not in out


def test_blk_and_latency_pass_the_busy_poll_window(
    bench: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mod = bench["blk"]
    monkeypatch.setattr(mod, "BUSY_POLL_US", None)
    assert "--busy-poll-us" not in mod.backend_command("vhsm", tmp_path / "s", tmp_path / "i")
    args = ["--seconds", "0.2", "--runs", "1", "--depths", "1", "--backends", "vhsm"]
    assert mod.main([*args, "--busy-poll-us", "20", "--workdir", str(tmp_path)]) == 0
    command = mod.backend_command("vhsm", tmp_path / "s", tmp_path / "i")
    assert command[-2:] == ["--busy-poll-us", "20"]
    assert "--busy-poll-us" not in mod.backend_command("qsd", tmp_path / "s", tmp_path / "i")


@pytest.mark.parametrize("name", ["net", "blk", "latency"])
def test_a_negative_busy_poll_window_is_refused(
    bench: dict[str, Any], name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench[name].build_parser().parse_args(["--busy-poll-us", "-1"])
    assert exc.value.code == 2
    assert "-1 not in 0..1000000 microseconds" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None, reason=NO_QSD)
def test_blk_qemu_storage_daemon_runs(bench: dict[str, Any], tmp_path: Path) -> None:
    mod = bench["blk"]
    image = tmp_path / "disk.img"
    mod.make_image(image, 4 << 20)
    out = mod.one_run("qsd", image, 32, 0.5, tmp_path, "smoke")
    assert out.requests > 0 and out.cpu >= 0


def test_blk_device_runs(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--requests", "64", "--repeat", "1", "--depths", "1,8", "--image-dir", str(tmp_path)]
    assert bench["blk-device"].main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("split", "1"),
        ("split", "8"),
        ("packed", "1"),
        ("packed", "8"),
    ]
    assert all(float(r[2]) > 0 for r in rows)


def test_idle_memory_runs(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = "vhsm" + (",qsd" if shutil.which("qemu-storage-daemon") else "")
    args = ["--daemons", "2", "--settle", "0.2", "--requests", "20", "--backends", backends]
    assert bench["idle"].main([*args, "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    states = [line.split()[0] for line in lines[2:5]]
    assert states == ["idle", "served", "2"]
    # three figures (RSS / anon / PSS) per back-end, each a positive number of MiB
    figures = [float(x) for x in lines[2].split()[1:] if x != "/"]
    assert len(figures) == 3 * len(backends.split(",")) and min(figures) > 0


def test_idle_memory_of_a_process(bench: dict[str, Any]) -> None:
    mem = bench["idle"].memory_of(os.getpid())
    assert mem.rss > 0 and mem.anon > 0 and mem.pss > 0
    assert mem.anon <= mem.rss


def test_latency_runs(
    bench: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    targets = "rng/vhsm,blk/vhsm" + (",blk/qsd" if shutil.which("qemu-storage-daemon") else "")
    args = ["--requests", "200", "--runs", "1", "--targets", targets]
    assert bench["latency"].main([*args, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if "/" in line.split()[0]]
    assert [r[0] for r in rows] == targets.split(",")
    assert all(r[1] == "200" for r in rows)


def test_percentile_nearest_rank(bench: dict[str, Any]) -> None:
    pct = bench["latency"].percentile
    values = list(range(1, 101))
    assert (pct(values, 50), pct(values, 99), pct(values, 100)) == (50, 99, 100)
    assert pct([], 99) == 0.0


def test_cpu_seconds_reads_proc_stat(bench: dict[str, Any]) -> None:
    import os

    lib = bench["net"].benchlib
    assert lib.cpu_seconds(os.getpid()) > 0
    assert lib.summary([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)


def test_cli_lists_bench(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS)


def test_cli_passes_options_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "virtq", "--size", "64", "--chains", "256"]) == 0
    assert "queue size 64" in capsys.readouterr().out


def test_an_installed_package_says_in_one_line_it_needs_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vhsm.cli import main
    from vhsm.commands import bench

    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path / "benchmarks")
    assert main(["bench", "virtq", "--seconds", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vhsm bench needs a source checkout" in err
