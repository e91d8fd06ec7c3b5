"""The trace log loses no acknowledged record and duplicates none, across compaction and crashes."""
import json

from loop.traces.log import TraceLog, new_request_id, read_traces


def _rec(i, **kw):
    return dict(request_id=f"req-{i}", tenant="acme", endpoint="e", variant="champion",
                model_version="student-e/1", prompt=json.dumps([{"role": "user", "content": f"q{i}"}]), **kw)


def test_append_compact_read(tmp_path):
    log = TraceLog(tmp_path)
    assert log.append([_rec(i) for i in range(5)]) == 5
    assert log.compact() == 5
    log.append([_rec(5), _rec(6)])
    rows = read_traces(tmp_path)
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in range(7)]
    assert rows[0]["model_version"] == "student-e/1"
    assert len(list((tmp_path / "parquet").glob("*.parquet"))) == 1
    assert log.compact() == 2 and log.compact() == 0
    assert len(read_traces(tmp_path)) == 7


def test_crash_between_seal_and_parquet_is_recovered(tmp_path):
    log = TraceLog(tmp_path)
    log.append([_rec(i) for i in range(3)])
    log._wal.close()
    # Simulate a crash right after sealing: the segment exists, its Parquet part does not.
    (tmp_path / "wal.jsonl").rename(tmp_path / "wal-123.sealed")
    assert [r["request_id"] for r in read_traces(tmp_path)] == ["req-0", "req-1", "req-2"]
    TraceLog(tmp_path)  # restart
    assert not list(tmp_path.glob("*.sealed"))
    assert len(read_traces(tmp_path)) == 3


def test_crash_after_parquet_written_does_not_duplicate(tmp_path):
    log = TraceLog(tmp_path)
    log.append([_rec(i) for i in range(3)])
    log.compact()
    part = next((tmp_path / "parquet").glob("*.parquet"))
    # The segment survived (crash before unlink): same rows exist in Parquet and in the sealed file.
    import pyarrow.parquet as pq

    (tmp_path / f"wal-{part.stem.split('-')[1]}.sealed").write_text(
        "".join(json.dumps(r) + "\n" for r in pq.read_table(part).to_pylist()))
    assert len(read_traces(tmp_path)) == 3, "readers never see the duplicate"
    TraceLog(tmp_path)
    assert len(read_traces(tmp_path)) == 3


def test_torn_last_line_is_ignored(tmp_path):
    log = TraceLog(tmp_path)
    log.append([_rec(0)])
    with open(tmp_path / "wal.jsonl", "a") as f:
        f.write('{"request_id": "req-torn", "tena')
    assert [r["request_id"] for r in read_traces(tmp_path)] == ["req-0"]
    # Restart after the crash, then acknowledge a new record: it must not be glued to the torn line.
    TraceLog(tmp_path).append([_rec(1)])
    assert [r["request_id"] for r in read_traces(tmp_path)] == ["req-0", "req-1"]


def test_a_reused_client_request_id_keeps_both_records(tmp_path):
    log = TraceLog(tmp_path)
    log.append([dict(_rec(0), ts=1.0), dict(_rec(0), ts=2.0)])
    assert len(read_traces(tmp_path)) == 2


def test_request_ids_are_unique():
    assert len({new_request_id() for _ in range(1000)}) == 1000
