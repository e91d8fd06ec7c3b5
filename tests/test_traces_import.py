"""`loopctl traces import`: a team's own chat-completion logs become trace records and feedback, once,
all or nothing, and read like the gateway's own (no Ray, no models)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from loop.cli import main
from loop.config import load_config
from loop.data.importer import ImportRefused, file_digest, import_file, import_request_id, imports
from loop.traces.log import TraceLog, read_feedback, read_traces

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, one_endpoint=False) -> Path:
    """configs/tiny.yaml (endpoints tiny-support of acme, globex-chat of globex) with its state in tmp_path."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path / "state")
    if one_endpoint:
        raw["tenants"] = raw["tenants"][:1]
    path = tmp_path / ("one.yaml" if one_endpoint else "tiny.yaml")
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("LOOP_STORAGE_ROOT", raising=False)
    monkeypatch.delenv("LOOP_CONFIG", raising=False)


def _completion(text, prompt_tokens=7, completion_tokens=3, id_="chatcmpl-1"):
    return {"id": id_, "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "response": _completion("Paris."), "user": "u1", "score": 1, "created": 1700000100.5},
    {"messages": [{"role": "user", "content": "2+2?"}], "response": "4", "label": "thumbs_down",
     "model": "model-tiny-support"},
    {"request": {"model": "model-globex-chat", "user": "g7",
                 "messages": [{"role": "user", "content": "Hello", "name": "greg"}]},
     "response": _completion("Hi!", 2, 1, "chatcmpl-2"), "score": 0.25},
    {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}],
     "response": {"choices": [{"message": {"role": "assistant", "content": "z"}}]}, "model": "tiny-support"},
]


def _write(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_a_valid_file_becomes_records_and_feedback(tmp_path):
    cfg = load_config(_config(tmp_path))
    traces = cfg.storage.path("traces")
    live = TraceLog(traces)  # a live record and feedback already there: the import adds beside them
    live.append([dict(request_id="req-live", tenant="acme", endpoint="tiny-support", variant="champion",
                      model_version="student-tiny-support/1", prompt="[]", ts=1.0)])
    live.compact()
    live.append_feedback([{"request_id": "req-live", "tenant": "acme", "score": 0.0, "label": None, "ts": 1.0}])
    logs = _write(tmp_path / "logs.jsonl", GOOD[:2] + [""] + GOOD[2:])  # a blank line is skipped

    result = import_file(cfg, logs, endpoint="model-tiny-support", now=1800000000.0)

    digest = file_digest(logs)
    assert (result.records, result.feedback, result.digest) == (4, 3, digest)
    assert result.endpoints == {"tiny-support": 3, "globex-chat": 1}
    rows = {r["request_id"]: r for r in read_traces(traces) if r["source"] == "imported"}
    assert len(rows) == 4 and len(read_traces(traces)) == 5
    ids = [import_request_id(digest, n) for n in (1, 2, 4, 5)]
    assert set(rows) == set(ids) and all(i.startswith("imp-") and len(i) == 20 for i in ids)
    first, second, globex, fourth = (rows[i] for i in ids)
    assert {r["source_digest"] for r in rows.values()} == {digest}
    assert {r["variant"] for r in rows.values()} == {r["model_version"] for r in rows.values()} == {"imported"}
    assert {r["status"] for r in rows.values()} == {200}
    assert (first["tenant"], first["endpoint"], first["user"], first["completion"]) == ("acme", "tiny-support",
                                                                                      "u1", "Paris.")
    assert (first["prompt_tokens"], first["completion_tokens"], first["ts"]) == (7, 3, 1700000100.5)
    assert first["client_request_id"] == "chatcmpl-1"
    assert (second["completion"], second["prompt_tokens"], second["ts"]) == ("4", 0, 1800000000.0)
    assert (globex["tenant"], globex["endpoint"], globex["user"]) == ("globex", "globex-chat", "g7")
    assert json.loads(globex["prompt"]) == [{"role": "user", "content": "Hello", "name": "greg"}]
    assert fourth["completion"] == "z" and fourth["prompt_tokens"] == 0
    feedback = {f["request_id"]: f for f in read_feedback(traces)}
    assert set(feedback) == {"req-live", ids[0], ids[1], ids[2]}
    assert feedback[ids[0]] == {"request_id": ids[0], "tenant": "acme", "score": 1.0, "label": None,
                                "ts": 1700000100.5}
    assert (feedback[ids[1]]["score"], feedback[ids[1]]["label"]) == (None, "thumbs_down")
    assert (feedback[ids[2]]["tenant"], feedback[ids[2]]["score"]) == ("globex", 0.25)
    # Its own part beside the compacted ones, its own feedback file, one ledger row.
    hexd = digest.split(":")[1]
    assert sorted(p.name for p in (traces / "parquet").iterdir())[-1] == f"part-import-{hexd}.parquet"
    assert (traces / f"feedback-import-{hexd}.jsonl").exists()
    assert list(imports(traces)) == [digest] and imports(traces)[digest]["records"] == 4
    assert not list(traces.rglob("*.tmp"))


def test_importing_the_same_file_twice_adds_nothing(tmp_path):
    cfg = load_config(_config(tmp_path))
    logs = _write(tmp_path / "logs.jsonl", GOOD)
    assert import_file(cfg, logs, endpoint="tiny-support").records == 4
    traces = cfg.storage.path("traces")
    before = (read_traces(traces), read_feedback(traces))
    again = import_file(cfg, logs, endpoint="tiny-support")
    renamed = tmp_path / "copy.jsonl"
    renamed.write_bytes(logs.read_bytes())
    copied = import_file(cfg, renamed, endpoint="tiny-support")
    assert again.already_imported and copied.already_imported and again.records == copied.records == 0
    assert (read_traces(traces), read_feedback(traces)) == before
    assert len((traces / "imports.jsonl").read_text().splitlines()) == 1


def test_a_crash_before_the_ledger_row_does_not_duplicate(tmp_path):
    cfg = load_config(_config(tmp_path))
    logs = _write(tmp_path / "logs.jsonl", GOOD)
    import_file(cfg, logs, endpoint="tiny-support", now=1800000000.0)
    traces = cfg.storage.path("traces")
    records = read_traces(traces)
    hexd = file_digest(logs).split(":")[1]
    # The crash: the part is written, the feedback file and the ledger row are not (a torn row instead).
    (traces / f"feedback-import-{hexd}.jsonl").unlink()
    (traces / "imports.jsonl").write_text('{"digest": "sha256:')
    result = import_file(cfg, logs, endpoint="tiny-support", now=1900000000.0)
    assert not result.already_imported and result.records == 4
    assert read_traces(traces) == records, "the part was kept, not written twice"
    by_id = {r["request_id"]: r["ts"] for r in records}
    assert [f["ts"] for f in read_feedback(traces)] == [by_id[f["request_id"]] for f in read_feedback(traces)]
    assert 1800000000.0 in [f["ts"] for f in read_feedback(traces)], "the first attempt's import time stands"
    assert import_file(cfg, logs, endpoint="tiny-support").already_imported
    assert len(imports(traces)) == 1


def test_bad_lines_are_all_named_and_nothing_is_written(tmp_path):
    cfg = load_config(_config(tmp_path))
    logs = _write(tmp_path / "bad.jsonl", [
        GOOD[0],
        '{"messages": [ oops',
        GOOD[1],
        {"messages": [{"role": "tool", "content": "x"}], "response": "y"},
        {**GOOD[0], "score": 1.5},
    ])
    with pytest.raises(ImportRefused) as e:
        import_file(cfg, logs, endpoint="tiny-support")
    assert [(p.line, p.field) for p in e.value.problems] == [(2, "(line)"), (4, "messages[0].role"), (5, "score")]
    assert "not one of system, user, assistant, developer" in str(e.value.problems[1])
    traces = cfg.storage.path("traces")
    assert read_traces(traces) == [] and read_feedback(traces) == [] and imports(traces) == {}
    assert not (traces / "parquet").exists() and not list(traces.glob("feedback-import-*"))


@pytest.mark.parametrize("line, field", [
    ({"response": "x"}, "messages"),
    ({"messages": [], "response": "x"}, "messages"),
    ({"messages": ["hi"], "response": "x"}, "messages[0]"),
    ({"messages": [{"content": "hi"}], "response": "x"}, "messages[0].role"),
    ({"messages": [{"role": "user"}], "response": "x"}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}], "response": "x"}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "q"}]}, "response"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "  "}, "response"),
    ({"messages": [{"role": "user", "content": "q"}], "response": {"choices": []}}, "response.choices"),
    ({"messages": [{"role": "user", "content": "q"}], "response": {"role": "assistant", "content": "a"}},
     "response.choices"),
    ({"messages": [{"role": "user", "content": "q"}], "response": {"choices": [{"message": {"content": None}}]}},
     "response.choices[0].message.content"),
    ({"messages": [{"role": "user", "content": "q"}], "response": {**_completion("a"), "usage": {"prompt_tokens": -1}}},
     "response.usage.prompt_tokens"),
    ('{"messages": [{"role": "user", "content": "q"}], "response": "a", "score": NaN}', "score"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "score": True}, "score"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "score": -0.1}, "score"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "label": 3}, "label"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "created": "yesterday"}, "created"),
    ({"messages": [{"role": "user", "content": "q"}], "response": "a", "model": "gpt-4o"}, "model"),
    ({"request": {"messages": [{"role": "user", "content": "q"}], "model": "nope"}, "response": "a"},
     "request.model"),
    ({"request": {"messages": [{"role": "bot", "content": "q"}]}, "response": "a"}, "request.messages[0].role"),
    ({"request": "q", "response": "a"}, "request"),
    ("[1, 2]", "(line)"),
])
def test_each_malformed_field_is_named(tmp_path, line, field):
    cfg = load_config(_config(tmp_path))
    logs = _write(tmp_path / "bad.jsonl", [GOOD[1], line])
    with pytest.raises(ImportRefused) as e:
        import_file(cfg, logs, endpoint="tiny-support")
    assert [(p.line, p.field) for p in e.value.problems] == [(2, field)]


def test_the_endpoint_must_be_known(tmp_path):
    cfg = load_config(_config(tmp_path))
    logs = _write(tmp_path / "logs.jsonl", [GOOD[0], GOOD[2]])
    with pytest.raises(ImportRefused) as e:  # two endpoints, and line 1 names none
        import_file(cfg, logs)
    assert [(p.line, p.field) for p in e.value.problems] == [(1, "model")]
    with pytest.raises(ImportRefused, match="model-nope is not an endpoint of tiny"):
        import_file(cfg, logs, endpoint="model-nope")
    one = load_config(_config(tmp_path, one_endpoint=True))
    assert import_file(one, _write(tmp_path / "one.jsonl", [GOOD[0]])).endpoints == {"tiny-support": 1}


def test_an_imported_prompt_is_the_json_the_gateway_stores(tmp_path):
    from loop.serving.gateway import Gateway
    from loop.serving.protocol import ChatCompletionRequest

    messages = [{"role": "system", "content": "Réponds en français."}, {"name": "ann", "content": "Ça va ?",
                                                                         "role": "user"}]
    gateway = Gateway.__new__(Gateway)  # only the routing core: no engine, no Ray
    gateway.tenant_models = {"acme": {"model-tiny-support": "tiny-support"}}
    gateway.rollouts = {"tiny-support": {"champion": {"version": "student-tiny-support/1"}, "challenger": None}}
    body = json.dumps({"model": "model-tiny-support", "messages": messages}).encode()
    call, _ = gateway._route(SimpleNamespace(headers={}), ChatCompletionRequest, "req-1", 0.0, "acme", body)

    cfg = load_config(_config(tmp_path))
    import_file(cfg, _write(tmp_path / "logs.jsonl", [{"messages": messages, "response": "Oui."}]),
                endpoint="tiny-support")
    (row,) = read_traces(cfg.storage.path("traces"))
    assert row["prompt"] == call.record["prompt"]


def test_loopctl_traces_import_and_show(tmp_path, capsys, monkeypatch):
    config = str(_config(tmp_path))
    logs = str(_write(tmp_path / "logs.jsonl", GOOD))
    digest = file_digest(logs)

    assert main(["traces", "import", logs, "--config", config, "--endpoint", "tiny-support"]) == 0
    out = capsys.readouterr().out
    assert "imported 4 records" in out and "3 feedback rows" in out and digest in out
    monkeypatch.setenv("LOOP_CONFIG", config)  # the environment names the config as well
    assert main(["traces", "import", logs, "--endpoint", "tiny-support"]) == 0
    assert "imported before: nothing added" in capsys.readouterr().out
    assert main(["traces", "show", "--source", "imported"]) == 0
    shown = capsys.readouterr().out
    assert "tiny-support             imported  3" in shown and "globex-chat              imported  1" in shown
    assert "feedback rows: 3" in shown and digest in shown

    bad = str(_write(tmp_path / "bad.jsonl", [GOOD[0], "nope", {"messages": [{"role": "user"}], "response": "a"}]))
    assert main(["traces", "import", bad, "--endpoint", "tiny-support"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{bad}: line 2: (line): not JSON: Expecting value at column 1",
                   f"{bad}: line 3: messages[0].content: required: a string",
                   f"error: 2 problem(s) on 2 line(s) of {bad}; nothing was imported"]
    assert main(["traces", "import", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    monkeypatch.delenv("LOOP_CONFIG")
    assert main(["traces", "import", logs]) == 2
    assert capsys.readouterr().err == "error: no config: pass --config CONFIG or set LOOP_CONFIG=CONFIG\n"
    assert len(read_traces(load_config(config).storage.path("traces"))) == 4
    assert os.path.exists(load_config(config).storage.path("traces", "imports.jsonl"))
