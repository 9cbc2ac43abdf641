"""Every `convoflow` command in the README's code blocks runs as shown, through the installed command.

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
    """The `convoflow ...` lines of the fenced code blocks, continuation lines joined."""
    commands, fenced = [], False
    lines = iter(text.splitlines())
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
            continue
        if fenced and stripped.startswith("convoflow "):
            while stripped.endswith("\\"):
                stripped = stripped[:-1] + next(lines).strip()
            commands.append(stripped)
    return commands


def _configured_out(argv: list[str], folder: Path) -> Path:
    """The out-dir a `run --config FILE` command writes, as the settings take it from the file."""
    from connectors.run.settings import load_settings

    out_dir = load_settings(folder / argv[argv.index("--config") + 1], {}).settings.out_dir
    assert out_dir is not None and out_dir.is_relative_to(folder), f"{argv}: its outputs belong in the scratch folder"
    return out_dir


def runnable(command: str) -> bool:
    return not any(marker in command for marker in NEEDS_ELSEWHERE)


def test_the_readme_shows_commands_for_each_part_it_documents() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    shown = {shlex.split(c)[1] for c in commands}
    assert {"run", "produce", "samples", "rules", "lake"} <= shown
    assert len([c for c in commands if runnable(c)]) >= 7


@pytest.mark.slow
@pytest.mark.lake
def test_every_readme_command_runs_as_shown(tmp_path: Path) -> None:
    for part in ("cli.py", "dataflows", "connectors", "samples"):
        (tmp_path / part).symlink_to(ROOT / part)
    script = Path(sys.executable).parent / "convoflow"
    for command in filter(runnable, readme_commands((ROOT / "README.md").read_text())):
        argv = shlex.split(command)
        done = subprocess.run([str(script), *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stderr}"
        if argv[1] == "run":
            out_dir = tmp_path / argv[argv.index("--out-dir") + 1] if "--out-dir" in argv else _configured_out(argv, tmp_path)
            assert (out_dir / "messages.jsonl").stat().st_size > 0, f"{command} wrote no messages"
        else:
            assert done.stdout.strip(), f"README command printed nothing: {command}"
