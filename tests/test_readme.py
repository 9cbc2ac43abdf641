"""Every `python cli.py` command in the README's code blocks runs as shown.

The commands run in the order the README gives them (the lake inspector reads what the replay
before it wrote), in a scratch folder that links the project's code and samples, so their `out/...`
paths land there. Commands that need something a test machine does not have are left out, each for
a reason the predicate names: a Kafka broker on the shown address, a remote catalog, other machines.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NEEDS_ELSEWHERE = ("--kafka-brokers", "--catalog", "--addresses", "/shared/")
"""A command with one of these needs a broker, a remote catalog or other machines."""


def readme_commands(text: str) -> list[str]:
    """The `python cli.py ...` lines of the fenced code blocks, continuation lines joined."""
    commands, fenced = [], False
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced and stripped.startswith("python cli.py "):
            while stripped.endswith("\\"):
                stripped = stripped[:-1] + next(lines).strip()
            commands.append(stripped)
    return commands


def runnable(command: str) -> bool:
    return not any(marker in command for marker in NEEDS_ELSEWHERE)


def test_the_readme_shows_commands_for_each_part_it_documents() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    shown = {shlex.split(c)[2] for c in commands}
    assert {"run", "produce", "samples", "rules", "lake"} <= shown
    assert len([c for c in commands if runnable(c)]) >= 7


@pytest.mark.slow
@pytest.mark.lake
def test_every_readme_command_runs_as_shown(tmp_path: Path) -> None:
    for part in ("cli.py", "dataflows", "connectors", "samples"):
        (tmp_path / part).symlink_to(ROOT / part)
    for command in filter(runnable, readme_commands((ROOT / "README.md").read_text())):
        argv = shlex.split(command)
        done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stderr}"
        if argv[2] == "run":
            out_dir = tmp_path / argv[argv.index("--out-dir") + 1]
            assert (out_dir / "messages.jsonl").stat().st_size > 0, f"{command} wrote no messages"
        else:
            assert done.stdout.strip(), f"README command printed nothing: {command}"
