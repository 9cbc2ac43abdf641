"""Write the golden digests from a 1 x 1 run of today's core: `python -m tests.golden.record [CASE ...]`.

Run it only when an output is meant to change, and say which and why in the commit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cli import main
from tests.golden.cases import CASES, output_digests, save_golden


def record(name: str, scratch: Path) -> None:
    folder = scratch / name
    folder.mkdir()
    args = CASES[name].write(folder)
    if main(["run", *args, "--out-dir", str(folder / "out"), "--speed-factor", "0", "--quiet"]) != 0:
        raise SystemExit(f"the run of golden case {name!r} failed")
    found = output_digests(folder / "out")
    save_golden(name, found)
    print(name, {file: sum(counter.values()) for file, counter in found.items()})


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        for name in sys.argv[1:] or CASES:
            record(name, Path(scratch))
