"""bench_llm runs the tests' fake OpenAI server as a script: it must find it where the tests keep it."""

from __future__ import annotations

from benchmarks import bench_llm


def test_the_fake_server_script_starts_and_says_where_it_listens() -> None:
    assert bench_llm.FAKE_SERVER.is_file()
    server = bench_llm.ServerProcess(latency=0.0)
    try:
        assert server.base_url.startswith("http://127.0.0.1:") and server.requests == 0
    finally:
        server.stop()
