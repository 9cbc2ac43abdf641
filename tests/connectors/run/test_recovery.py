from pathlib import Path

from connectors.run.recovery import Recovery, RecoveryState


def test_a_fact_of_the_first_run_is_recalled_by_a_resumed_run(tmp_path: Path) -> None:
    job = {"input": "in.jsonl"}
    first = Recovery(tmp_path / "recovery")
    assert first.open(job, partitions=1) is RecoveryState.NEW
    first.remember("profiles_start", {"table": "chat_messages", "snapshot_id": 7})
    first.remember("other", 1)
    resumed = Recovery(tmp_path / "recovery")
    assert resumed.open(job, partitions=1) is RecoveryState.RESUME
    assert resumed.recall("profiles_start") == {"table": "chat_messages", "snapshot_id": 7}
    assert resumed.recall("other") == 1
    assert resumed.recall("never kept") is None
