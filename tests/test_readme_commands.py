"""Every README command block marked safe for CI runs and succeeds.

A block is a fenced ```sh block directly preceded by the line `<!-- test -->`
in README.md. Each runs with `bash -euo pipefail` in a scratch folder that
mirrors the checkout (symlinks to its top-level entries), so relative paths
work and files a command writes stay out of the checkout; `.venv/bin` comes
first on PATH, as after `make setup`. The quick start's blocks
(`<!-- quick-start -->`) run one after the other in one folder, as a new
operator types them: a site from nothing to blocks landing and back down.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- test -->"
QUICK_START = "<!-- quick-start -->"
_FENCE = re.compile(r"^```(\w*)\s*$")


def marked_blocks(text: str, mark: str = MARK) -> list[tuple[int, str]]:
    """(line number, commands) of each ```sh block preceded by `mark`."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == mark:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            fence = _FENCE.match(lines[j].strip()) if j < len(lines) else None
            if fence is None or fence.group(1) not in ("sh", "bash", "shell"):
                raise AssertionError(f"README.md:{i + 1}: {mark} is not followed by a ```sh block")
            end = j + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"README.md:{j + 1}: unterminated code block")
            blocks.append((j + 1, "\n".join(lines[j + 1 : end])))
            i = end
        i += 1
    return blocks


BLOCKS = marked_blocks((REPO / "README.md").read_text())


def test_marked_blocks_are_found() -> None:
    """The extractor itself: marks, blank lines, other languages and unmarked blocks."""
    text = "\n".join(
        ["```sh", "echo unmarked", "```", MARK, "", "```sh", "echo one", "echo two", "```",
         MARK, "```bash", "true", "```"]
    )  # fmt: skip
    assert marked_blocks(text) == [(6, "echo one\necho two"), (11, "true")]
    with pytest.raises(AssertionError, match="is not followed by a ```sh block"):
        marked_blocks(f"{MARK}\n```python\nx = 1\n```")


def _scratch(tmp_path: Path) -> dict[str, str]:
    """Mirror the checkout into `tmp_path`; the environment a block runs in."""
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (tmp_path / entry.name).symlink_to(entry)
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_block(line: int, commands: str, cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"README.md:{line} failed ({proc.returncode}):\n{commands}\n--- stdout\n"
        f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.parametrize("line,commands", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs(line: int, commands: str, tmp_path: Path) -> None:
    _run_block(line, commands, tmp_path, _scratch(tmp_path))


def test_the_quick_start_takes_a_new_operator_from_nothing_to_blocks(tmp_path: Path) -> None:
    """The README's quick start, block by block in one folder: init, up, wait for settled
    hours, the regulator's admission and meter registration, down, a verifying ledger."""
    blocks = marked_blocks((REPO / "README.md").read_text(), QUICK_START)
    assert len(blocks) >= 3, "the quick start lost its blocks"
    env = _scratch(tmp_path)
    outputs = []
    try:
        for line, commands in blocks:
            outputs.append(_run_block(line, commands, tmp_path, env))
    finally:
        subprocess.run([str(REPO / ".venv" / "bin" / "meterchain"), "site", "down", "lab"],
                       cwd=tmp_path, env=env, capture_output=True, timeout=300)  # fmt: skip
    assert "valid: market lab" in outputs[-1]
    show = subprocess.run(
        [str(REPO / ".venv" / "bin" / "meterchain"), "ledger", "show", "--json",
         "lab/state/aggregator/ledger.db"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    summary = json.loads(show.stdout)
    status = json.loads((tmp_path / "lab" / "run" / "status.json").read_text())
    assert status["state"] == "down" and not status["note"]
    assert summary["readings"] == status["published"] > 0
    assert summary["participants"]["mg5-depot"] == {"role": "microgrid", "active": True}
    assert summary["transactions"]["meter"] == 13  # twelve at genesis, mg5-load registered
    assert summary["transactions"]["settlement"] >= 4


def test_readme_marks_some_blocks() -> None:
    """Not a silent pass: the README must mark at least one block for this harness."""
    if not BLOCKS:
        pytest.skip("README.md marks no ```sh block with <!-- test --> yet (the lead marks them)")


def test_readme_command_blocks_call_the_venv_meterchain() -> None:
    """Blocks are copied into shells without the venv active: `.venv/bin/meterchain`, never bare."""
    bare = []
    in_block = False
    for number, line in enumerate((REPO / "README.md").read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block and re.search(r"(^|[\s$(|;&])meterchain\s", line):
            bare.append(f"README.md:{number}: {line.strip()}")
    assert not bare, "bare `meterchain` in a command block:\n" + "\n".join(bare)
