"""Packaging of the accelerator: sdist and wheel build it, no compiler means pure Python."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_speedups  # noqa: E402

PROBE = (
    "import numpy as np, vhsm, vhsm.speedups as s; print(vhsm.__file__); print(s.data_path()); "
    "from vhsm.cli import main; main(['--version'])"
)


def _run_installed(venv: Path, code: str) -> list[str]:
    """Run ``code`` in the clean venv, the test venv's site-packages for vhsm's dependencies."""
    deps = sysconfig.get_paths()["purelib"]
    out = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-I",
            "-c",
            f"import sys; sys.path.append({deps!r}); {code}",
        ],
        cwd=venv,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return out.splitlines()


def _clean_venv(path: Path, wheel: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python")]
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    return path


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_accelerator(tmp_path: Path) -> None:
    """`python -m build`: an sdist with the C source, a platform wheel with the module."""
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("VHSM_PURE_PYTHON", "CC")}
    subprocess.run(
        [sys.executable, "-m", "build", "-q", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    (sdist,) = dist.glob("vhsm-*.tar.gz")
    (wheel,) = dist.glob("vhsm-*.whl")
    assert "py3-none-any" not in wheel.name  # a platform wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert f"vhsm/{build_speedups.target_name()}" in names
    venv = _clean_venv(tmp_path / "venv", wheel)
    where, path, version = _run_installed(venv, PROBE)
    assert where.startswith(str(venv))
    assert path == "compiled accelerator (vhsm._speedups)"
    assert version.endswith("data path: compiled accelerator (vhsm._speedups)")
    del sdist


@pytest.mark.slow
def test_without_a_compiler_the_wheel_is_pure_python(tmp_path: Path) -> None:
    """No working compiler: one line says so, the build succeeds, vhsm runs pure Python."""
    env = {k: v for k, v in os.environ.items() if k != "VHSM_PURE_PYTHON"}
    env["CC"] = "false"  # a compiler that fails: as good as none
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "accelerator not built" in ln]
    assert len(lines) == 1, lines
    (wheel,) = wheels.glob("vhsm-*.whl")
    assert wheel.name.endswith("py3-none-any.whl")
    venv = _clean_venv(tmp_path / "venv", wheel)
    _, path, _ = _run_installed(venv, PROBE)
    assert path.startswith("pure Python (compiled accelerator not available")


def test_build_reports_a_missing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")
    with pytest.raises(build_speedups.Unavailable, match="compile failed"):
        build_speedups.build(tmp_path)
    assert build_speedups.main(["--out", str(tmp_path)]) == 0  # one line, no error
    assert build_speedups.main(["--out", str(tmp_path), "--strict"]) == 1
    assert not list(tmp_path.glob("_speedups*"))


def test_in_place_build_matches_the_source() -> None:
    """The module the tests import was built from this _speedups.c (or there is none)."""
    from vhsm import speedups

    if speedups.accel is not None:
        assert speedups.accel.source_sha256 == build_speedups.source_digest()
