"""Scaling out through the CLI: the same outputs with 1 x 1, 1 x 2 and 2 x 2 (processes x workers),
and with a cluster started by hand, one process per --addresses entry."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from cli import main
from connectors.run.runner import free_addresses
from tests.conftest import jsonl_counts

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "samples" / "conversations.jsonl"
RULES = ROOT / "samples" / "rules.jsonl"


def run_args(out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(SAMPLE), "--rules", str(RULES), "--out-dir", str(out), "--speed-factor", "0",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Counter[bytes]]:
    out = tmp_path_factory.mktemp("cluster") / "1x1"
    assert main(run_args(out)) == 0
    found = jsonl_counts(out)
    assert all(found[f"{kind}.jsonl"] for kind in ("messages", "windows", "alerts", "moderated", "dead_letter"))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("processes", "workers"), [(1, 2), (2, 2)])
def test_windows_alerts_and_moderation_do_not_depend_on_processes_and_workers(
    reference: dict[str, Counter[bytes]], tmp_path: Path, processes: int, workers: int
) -> None:
    out = tmp_path / f"{processes}x{workers}"
    assert main(run_args(out, "--processes", str(processes), "--workers", str(workers))) == 0
    assert jsonl_counts(out) == reference


@pytest.mark.slow
def test_a_cluster_started_by_hand_writes_what_one_process_writes(
    reference: dict[str, Counter[bytes]], tmp_path: Path
) -> None:
    out, addresses = tmp_path / "by-hand", ",".join(free_addresses(2))
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "cli.py"),
                               *run_args(out, "--addresses", addresses, "--process-id", str(pid))],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-1500:] for _, err in results]
    assert jsonl_counts(out) == reference


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--addresses", "127.0.0.1:2101"], "--addresses and --process-id go together"),
    (["--process-id", "0"], "--addresses and --process-id go together"),
    (["--addresses", "127.0.0.1:2101,nowhere", "--process-id", "0"], "expected host:port"),
    (["--addresses", "127.0.0.1:2101", "--process-id", "1"], "--process-id 1 is out of range for 1 addresses"),
    (["--addresses", "127.0.0.1:2101", "--process-id", "0", "--processes", "2"], "--processes starts a local cluster"),
])
def test_bad_cluster_options_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                                                fragment: str) -> None:
    assert main(run_args(tmp_path / "out", *extra)) == 2
    assert fragment in capsys.readouterr().err
