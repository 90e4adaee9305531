"""`make check-diagrams`: have mermaid itself parse and draw every diagram vhsm writes.

The unit tests check the shape of the mermaid text `vhsm diagram` generates; this check
gives it to the real renderer: mermaid-cli (``mmdc``, npm package
``@mermaid-js/mermaid-cli``) driving Debian's headless ``chromium``. The documents are:

* every machine and the overview (``vhsm diagram --machine all``, i.e. ``diagrams/*.mmd``);
* what plain ``vhsm diagram`` prints;
* the sequence diagram of every shipped transcript (``vhsm diagram --trace``);
* every ``mermaid`` block of the docs and the README (the site draws them).

Each one is written to ``--out`` as ``.mmd`` and ``.svg`` (and ``.png`` with ``--png``), for
a person to look at; the documents go through one browser per format (a refused document
is reported and the rest drawn). Exit status 0 when every document rendered, 1 when
mermaid refused one (its error is printed), 2 when the renderer is missing (the message
says how to install it).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vhsm import diagram  # noqa: E402
from vhsm.audit.transcript import load_transcript  # noqa: E402
from vhsm.diagram_trace import trace_sequence  # noqa: E402

MERMAID_BLOCK = re.compile(r"```mermaid\n(.*?)```", re.S)
#: What a rendered SVG says when mermaid drew its error picture instead of the diagram.
ERROR_SVG = ("Syntax error in text", "Parse error")


def documents() -> dict[str, str]:
    """Every mermaid document vhsm generates or publishes, by file name (no duplicates)."""
    found: dict[str, str] = {}
    for machine in diagram.MACHINES:
        found[f"{machine}.mmd"] = diagram.machine_source(machine, "mermaid")
    plain = subprocess.run(
        [sys.executable, "-m", "vhsm", "diagram"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found["vhsm-diagram-stdout.mmd"] = plain.stdout
    for transcript in sorted((ROOT / "tests" / "data").glob("*.jsonl")):
        text = trace_sequence(load_transcript(transcript), title=transcript.name)
        found[f"{transcript.stem}-sequence.mmd"] = text
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        blocks = MERMAID_BLOCK.findall(page.read_text(encoding="utf-8"))
        for number, block in enumerate(blocks, 1):
            found[f"{page.stem}-{number}.mmd"] = block
    unique: dict[str, str] = {}
    for name, text in found.items():
        if text not in unique.values():
            unique[name] = text
    return unique


def renderer(mmdc: Path) -> tuple[Path, Path]:
    """The mmdc and chromium programs; exit status 2, saying what to install, without them."""
    chromium = shutil.which("chromium")
    missing = []
    if not mmdc.exists():
        missing.append(f"no {mmdc} (make check-diagrams installs it with npm: Debian package npm)")
    if chromium is None:
        missing.append("no chromium (Debian: apt-get install chromium)")
    if missing or chromium is None:
        print("\n".join(f"check-diagrams: {line}" for line in missing), file=sys.stderr)
        raise SystemExit(2)
    return mmdc, Path(chromium)


def render(
    mmdc: Path, config: Path, docs: list[tuple[str, str]], out: Path, fmt: str
) -> tuple[int, tuple[str, str] | None]:
    """Draw `docs` in order, in one browser, as `out`/NAME.`fmt`; stop at the first refusal.

    Returns how many were drawn and, when mermaid refused one, its name and complaint
    (the documents after it are not drawn: the caller goes on with them).
    """
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.md"
        blocks = [f"```mermaid\n{text}```\n" for _, text in docs]
        batch.write_text("\n".join(blocks), encoding="utf-8")
        done = subprocess.run(
            [str(mmdc), "-p", str(config), "-e", fmt, "-i", str(batch), "-o", f"{tmp}/out.md"],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        drawn = 0
        for number, (name, _) in enumerate(docs, 1):
            picture = Path(tmp) / f"out-{number}.{fmt}"
            if not picture.exists():
                break
            if fmt == "svg":
                svg = picture.read_text(encoding="utf-8")
                marker = next((m for m in ERROR_SVG if m in svg), None)
                if marker is not None:
                    return drawn, (name, f"mermaid drew its error picture ({marker!r})")
            shutil.move(picture, out / f"{Path(name).stem}.{fmt}")
            drawn += 1
    if drawn == len(docs):
        return drawn, None
    lines = [
        line.strip()
        for line in (done.stderr + done.stdout).splitlines()
        if line.strip() and not line.lstrip().startswith(("at ", "Found ", "\u2705"))
    ]
    why = lines[0] if lines else f"mmdc exit status {done.returncode}"
    return drawn, (docs[drawn][0], why)


def main(argv: list[str] | None = None) -> int:
    """Render every document; print one line each; 0 when all rendered."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mmdc", type=Path, default=ROOT / ".cache/mermaid-cli/node_modules/.bin/mmdc"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "diagrams-check")
    parser.add_argument("--png", action="store_true", help="draw PNGs besides the SVGs")
    args = parser.parse_args(argv)
    mmdc, chromium = renderer(args.mmdc)
    args.out.mkdir(parents=True, exist_ok=True)
    # Root has no user namespace sandbox to give chromium; headless needs no GPU.
    config = {"executablePath": str(chromium), "args": ["--no-sandbox", "--disable-gpu"]}
    start = time.monotonic()
    docs = documents()
    for name, text in docs.items():
        (args.out / name).write_text(text, encoding="utf-8")
    refused: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "puppeteer.json"
        config_path.write_text(json.dumps(config), encoding="utf-8")
        for fmt in ("svg", "png") if args.png else ("svg",):
            todo = [(name, text) for name, text in docs.items() if name not in refused]
            while todo:
                drawn, failure = render(mmdc, config_path, todo, args.out, fmt)
                for name, _ in todo[:drawn]:
                    print(f"ok   {name} ({fmt})", flush=True)
                if failure is None:
                    break
                refused[failure[0]] = failure[1]
                print(f"FAIL {failure[0]}: {failure[1]}", flush=True)
                todo = todo[drawn + 1 :]
    took = time.monotonic() - start
    print(
        f"check-diagrams: {len(docs) - len(refused)} of {len(docs)} documents rendered by "
        f"mermaid in {took:.0f} s; sources and pictures in {args.out}"
    )
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
