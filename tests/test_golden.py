"""The differential test: every output record of every golden case, however the flow runs.

Each case's input (tests/golden/cases.py) runs 1 x 1, 1 x 2 (workers), as 2 processes, as 2 processes
encoding their JSONL where it is made (`--no-writer-threads`) and, for the cases short enough, paced; every output file must hold exactly the records of the golden file
(order within a file aside), byte for byte. The golden files were written by today's core, so this
guards every step of the columnar rewrite: a difference is a bug, or a deliberate change that is
re-recorded (`python -m tests.golden.record CASE`) and stated in the commit.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.golden.cases import CASES, OUTPUTS, digest, load_golden, output_digests, run_golden

MODES = {"1x1": [], "1x2": ["--workers", "2"], "2p": ["--processes", "2"],
         "2p-no-writer-threads": ["--processes", "2", "--no-writer-threads"]}


def differences(written: dict[str, Counter[bytes]], golden: dict[str, Counter[str]]) -> list[str]:
    """What differs, per file: how many records are missing or extra, and the first extra ones in full."""
    problems = []
    for file, found in output_digests(written).items():
        missing, extra = golden[file] - found, found - golden[file]
        if missing or extra:
            shown = [line.decode(errors="replace")[:300] for line in written[file] if digest(line) in extra][:3]
            problems.append(f"{file}: {sum(missing.values())} golden records missing, {sum(extra.values())} extra: {shown}")
    return problems


def run_case(name: str, tmp_path: Path, *extra: str) -> list[str]:
    return differences(run_golden(name, tmp_path, *extra), load_golden(name))


def test_every_golden_case_has_records_in_the_outputs_it_is_about() -> None:
    golden = {name: load_golden(name) for name in CASES}
    assert set(golden) == set(CASES) and all(set(files) == {f"{kind}.jsonl" for kind in OUTPUTS} for files in golden.values())
    total = lambda name, file: sum(golden[name][file].values())  # noqa: E731
    assert all(total(name, "messages.jsonl") > 0 and total(name, "windows.jsonl") > 0 for name in CASES)
    assert total("malformed", "dead_letter.jsonl") >= 20
    assert total("disorder", "late.jsonl") > 0
    assert total("rules", "moderated.jsonl") > 0 and total("chat", "alerts.jsonl") > 0
    assert total("dense", "windows.jsonl") < total("dense", "messages.jsonl") / 5
    assert total("sparse", "windows.jsonl") > total("sparse", "messages.jsonl") * 0.9


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_the_outputs_equal_the_golden_records(name: str, mode: str, tmp_path: Path) -> None:
    assert run_case(name, tmp_path, "--speed-factor", "0", *MODES[mode]) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.paced_speed])
def test_a_paced_run_writes_the_golden_records(name: str, tmp_path: Path) -> None:
    assert run_case(name, tmp_path, "--speed-factor", str(CASES[name].paced_speed)) == []


@pytest.mark.slow
def test_a_changed_output_is_reported_with_the_records_that_differ(tmp_path: Path) -> None:
    problems = run_case("dense", tmp_path, "--speed-factor", "0", "--window-size", "20")
    assert [p.split(":")[0] for p in problems] == ["windows.jsonl"]  # messages do not carry their window
    assert "golden records missing" in problems[0] and '"window_start"' in problems[0]
