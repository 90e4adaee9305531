"""specs/ is found from a checkout, an editable install and an installed wheel."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from vhsm.errors import VhsmError
from vhsm.session import all_rules
from vhsm.session.machines import composition
from vhsm.specs import cache_dirs, load_spec, read_spec, specs_dir

ROOT = Path(__file__).resolve().parent.parent


def test_checkout_specs_are_found() -> None:
    assert specs_dir() == ROOT / "specs"
    assert {p.stem for p in specs_dir().glob("*.yaml")} == {
        "requests",
        "bits",
        "session",
        "rules",
        "upstream",
        *composition().machines,
    }


def test_unknown_spec_is_a_clear_error() -> None:
    with pytest.raises(VhsmError, match="spec 'nope' not found"):
        load_spec("nope")


def test_every_rule_a_machine_names_exists() -> None:
    rules = all_rules()
    for spec in composition().specs:
        named = [c["rule"] for c in spec.conditions.values() if "rule" in c]
        named += list(spec.invalid_state_rules.values())
        assert set(named) <= set(rules), set(named) - set(rules)
    for entry in load_spec("requests")["frontend"]:
        for check in entry.get("checks", []):
            assert check["rule"] in rules


def test_rules_cover_every_label_of_the_earlier_checklist() -> None:
    items = {r.alias for r in all_rules().values() if r.alias}
    expected = (
        {f"F{i}" for i in range(1, 9)}
        | {f"N{i}" for i in range(1, 11)}
        | {f"R{i}" for i in range(1, 10)}
        | {f"M{i}" for i in range(1, 14)}
        | {f"P{i}" for i in range(1, 10)}
    )
    assert expected <= items


@pytest.mark.slow
def test_wheel_ships_the_specs(tmp_path: Path) -> None:
    """Build the wheel, install it alone into a directory, and load the specs from there."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("vhsm-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    probe = (
        "import vhsm.specs as s, vhsm.session as se; "
        "print(s.specs_dir()); print(len(se.all_rules())); "
        "from vhsm.session.machines import load_machine_spec as m; print(m('vring').initial.name)"
    )
    deps = sysconfig.get_paths()["purelib"]
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path[:0] = [{str(target)!r}, {deps!r}]; {probe}",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    assert out[0] == str(target / "vhsm" / "specs")
    assert int(out[1]) == len(all_rules())
    assert out[2] == "STOPPED_DISABLED"


# --- the parsed-document cache ------------------------------------------------------------
def test_every_spec_is_served_from_the_cache_as_yaml_parses_it(tmp_path: Path) -> None:
    import yaml

    for path in sorted(specs_dir().glob("*.yaml")):
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        parsed = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert read_spec(copy) == parsed  # parsed, then cached
        assert list((tmp_path / "__pycache__").glob(f"{path.stem}.*.marshal"))
        assert read_spec(copy) == parsed  # from the cache


def test_a_cached_spec_needs_no_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("codes: {1: one, 2: two}\nlist: [a, b]\n")
    expected = {"codes": {1: "one", 2: "two"}, "list": ["a", "b"]}
    assert read_spec(spec) == expected
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now fails
    assert read_spec(spec) == expected


def test_an_edited_spec_is_parsed_again(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("value: 1\n")
    assert read_spec(spec) == {"value": 1}
    spec.write_text("value: 2\n")  # same size, maybe the same mtime: the digest differs
    assert read_spec(spec) == {"value": 2}
    assert read_spec(spec) == {"value": 2}


def test_a_corrupt_cache_entry_is_replaced(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("value: 1\n")
    read_spec(spec)
    (entry,) = (tmp_path / "__pycache__").iterdir()
    entry.write_bytes(b"\x00garbage")
    assert read_spec(spec) == {"value": 1}
    assert read_spec(spec) == {"value": 1}
    assert entry.read_bytes() != b"\x00garbage"


def test_a_read_only_spec_directory_caches_in_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    spec = specs / "s.yaml"
    spec.write_text("value: 1\n")
    (specs / "__pycache__").write_text("not a directory")  # the package's cache is unusable
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Path(cache_dirs(specs)[1]) == tmp_path / "xdg" / "vhsm" / "specs"
    assert read_spec(spec) == {"value": 1}
    assert list((tmp_path / "xdg" / "vhsm" / "specs").glob("s.*.marshal"))
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert read_spec(spec) == {"value": 1}
