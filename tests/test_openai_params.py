"""OpenAI's request parameters without a cluster: each one the gateway takes reaches the engine's
SamplingParams, each one it does not honour is a 400 naming it, and a field that is not OpenAI's is
refused (loop/serving/protocol.py). The same behaviour through the real vLLM engine and the `openai`
SDK is test_cycle_job.py's `test_openai_parameters_through_the_real_engine`."""
import json

import pytest

from loop.serving.errors import BadRequest
from loop.serving.protocol import REFUSED, ChatCompletionRequest, CompletionRequest, cut_at_stop, parse_request
from loop.serving.responses import chat_logprobs, completion_logprobs
from loop.serving.routing import Call, choice_request_id, engine_args, tools_asked
from loop.data.importer import chat_prompt
from loop.traces.log import tool_traffic


def _chat(**fields) -> bytes:
    return json.dumps({"model": "model-e1", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _refusal(body: bytes, kind=ChatCompletionRequest) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse_request(body, kind)
    assert e.value.status == 400
    return e.value


def _args(req, tool_parser: str | None = None) -> dict:
    call = Call("req-1", 0.0, "model-e1", "e1", "champion", {"version": "v1"}, {})
    return engine_args(call, req, tool_parser)


def test_stop_and_the_penalties_reach_the_engine():
    req = parse_request(_chat(stop="\n", presence_penalty=0.5, frequency_penalty=-1.0), ChatCompletionRequest)
    assert _args(req)["sampling"] == {"stop": ["\n"], "presence_penalty": 0.5, "frequency_penalty": -1.0}
    req = parse_request(json.dumps({"model": "m", "prompt": "p", "stop": ["a", "b"]}).encode(), CompletionRequest)
    assert _args(req)["sampling"] == {"stop": ["a", "b"]}
    assert "sampling" not in _args(parse_request(_chat(presence_penalty=None), ChatCompletionRequest)), \
        "nothing set, nothing sent (an engine of an earlier release takes no sampling)"


@pytest.mark.parametrize("fields, param", [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"stop": 3}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
])
def test_out_of_range_sampling_names_the_field(fields, param):
    assert _refusal(_chat(**fields)).param == param


@pytest.mark.parametrize("fields", [
    {"store": True}, {"functions": [{"name": "f"}]}, {"metadata": {"a": "b"}}, {"reasoning_effort": "low"},
])
def test_an_openai_parameter_not_honoured_is_refused_by_name(fields):
    err = _refusal(_chat(**fields))
    assert err.param in fields and err.code == "unsupported_parameter" and err.param in err.message
    assert err.param in REFUSED


def test_neutral_values_of_refused_parameters_ask_nothing_and_pass():
    req = parse_request(_chat(logprobs=False, tools=[], response_format={"type": "text"}, logit_bias={},
                              modalities=["text"], service_tier="auto", tool_choice="none", top_logprobs=0,
                              parallel_tool_calls=True, n=1), ChatCompletionRequest)
    assert req.messages[0].content == "hi" and "sampling" not in _args(req), "nothing asked, nothing sent"
    # An assistant turn replayed from an OpenAI response: its neutral fields pass, a tool call does not.
    replayed = {"role": "assistant", "content": "ok", "refusal": None, "annotations": [], "tool_calls": None}
    req = parse_request(_chat(messages=[{"role": "user", "content": "hi"}, replayed]), ChatCompletionRequest)
    assert req.messages[1].as_dict() == {"role": "assistant", "content": "ok"}
    err = _refusal(_chat(messages=[{**replayed, "tool_calls": [{"id": "1", "type": "function"}]}]))
    assert err.param == "messages.0.tool_calls.0.function" and "required" in err.message


def test_a_body_nested_too_deeply_is_a_400_not_a_crash():
    err = _refusal(b"[" * 100_000)
    assert "nested too deeply" in err.message


def test_a_field_that_is_not_openais_is_refused():
    for body, kind, param in [(_chat(top_k=5), ChatCompletionRequest, "top_k"),
                              (_chat(temprature=0.2), ChatCompletionRequest, "temprature"),
                              (json.dumps({"model": "m", "prompt": "p", "messages": []}).encode(), CompletionRequest,
                               "messages"),
                              (_chat(messages=[{"role": "user", "content": "x", "mood": "sad"}]), ChatCompletionRequest,
                               "messages.0.mood")]:
        err = _refusal(body, kind)
        assert err.param == param and err.code == "unknown_parameter", (param, err.message)
    # The completions route's own refusals.
    assert _refusal(json.dumps({"model": "m", "prompt": "p", "echo": True}).encode(), CompletionRequest).param == "echo"


def test_text_parts_are_joined_as_vllm_joins_them_and_other_parts_are_refused():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    req = parse_request(_chat(messages=[{"role": "user", "content": parts, "name": "ann"}]), ChatCompletionRequest)
    assert _args(req)["messages"] == [{"role": "user", "content": "first\nsecond", "name": "ann"}]
    err = _refusal(_chat(messages=[{"role": "user", "content": [parts[0], {"type": "image_url", "image_url": {}}]}]))
    assert err.param == "messages.0.content" and "part 1 is 'image_url'" in err.message


def test_a_live_and_an_imported_prompt_compare_equal():
    live = parse_request(_chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
                         ChatCompletionRequest)
    logged = [{"role": "user", "content": "hi", "refusal": None}]
    assert chat_prompt(logged) == json.dumps([m.as_dict() for m in live.messages]) == json.dumps(
        [{"role": "user", "content": "hi"}])


def test_cut_at_stop_leaves_the_stop_string_out():
    assert cut_at_stop("one. two. three", [". t", "x"]) == "one"
    assert cut_at_stop("abc", None) == cut_at_stop("abc", ["z"]) == "abc"


def test_n_logprobs_logit_bias_and_structured_outputs_reach_the_engine():
    """Each as vLLM's own server passes it: chat's top_logprobs k (0 with logprobs alone) and the
    completions' logprobs k are SamplingParams' logprobs; response_format is structured outputs."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    req = parse_request(_chat(n=3, logprobs=True, top_logprobs=4, logit_bias={"7": 100, "9": -100.0},
                              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
                        ChatCompletionRequest)
    assert _args(req)["sampling"] == {"n": 3, "logprobs": 4, "logit_bias": {7: 100.0, 9: -100.0},
                                      "structured_outputs": {"json": schema}}
    assert _args(parse_request(_chat(logprobs=True), ChatCompletionRequest))["sampling"] == {"logprobs": 0}
    assert _args(parse_request(_chat(response_format={"type": "json_object"}), ChatCompletionRequest))[
        "sampling"] == {"structured_outputs": {"json_object": True}}
    text = parse_request(json.dumps({"model": "m", "prompt": "p", "logprobs": 0, "n": 2}).encode(), CompletionRequest)
    assert _args(text)["sampling"] == {"n": 2, "logprobs": 0}


@pytest.mark.parametrize("fields, param", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"), ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}, "response_format.json_schema.name"),
])
def test_bad_values_of_honoured_parameters_name_the_field(fields, param):
    err = _refusal(_chat(**fields))
    assert err.param == param, err.message
    assert "top_logprobs needs logprobs: true" in _refusal(_chat(top_logprobs=2)).message
    assert _refusal(json.dumps({"model": "m", "prompt": "p", "logprobs": 6}).encode(), CompletionRequest).param \
        == "logprobs"


def test_logprobs_in_each_routes_shape():
    """The engine's per-token entries (sampled token first, as vLLM orders them) as OpenAI's chat
    `logprobs.content` (top k) and the completions' token lists (top k + 1, text offsets)."""
    tokens = [{"token": "He", "logprob": -0.5, "top": [["He", -0.5], ["She", -1.5], ["It", -2.0]]},
              {"token": "llo", "logprob": -9999.0, "top": [["llo", -9999.0], ["y", -0.1]]}]
    chat = chat_logprobs(tokens, 2)
    she = {"token": "She", "logprob": -1.5, "bytes": [83, 104, 101]}
    assert chat["content"][0] == {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101]}, she]}
    assert [len(c["top_logprobs"]) for c in chat_logprobs(tokens, 0)["content"]] == [0, 0]
    text = completion_logprobs(tokens, 1, offset=3)
    assert text == {"tokens": ["He", "llo"], "token_logprobs": [-0.5, -9999.0],
                    "top_logprobs": [{"He": -0.5, "She": -1.5}, {"llo": -9999.0, "y": -0.1}], "text_offset": [3, 5]}
    req = parse_request(_chat(logprobs=True, top_logprobs=1), ChatCompletionRequest)
    assert req.format_logprobs(tokens) == chat_logprobs(tokens, 1)
    assert parse_request(_chat(), ChatCompletionRequest).format_logprobs(tokens) is None, "not asked, not given"
    assert completion_logprobs(None, 1) is None and chat_logprobs(None, 1) is None


def test_each_choice_has_its_own_trace_id():
    assert [choice_request_id("req-a", i) for i in range(3)] == ["req-a", "req-a-1", "req-a-2"]


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NOTE = {"type": "function", "function": {"name": "note"}}


def test_forced_tool_calls_are_structured_outputs_and_come_back_as_tool_calls():
    named = parse_request(_chat(tools=[WEATHER, NOTE], tool_choice={"type": "function", "function": {
        "name": "weather"}}), ChatCompletionRequest)
    args = _args(named)
    assert args["sampling"] == {"structured_outputs": {"json": WEATHER["function"]["parameters"]}}
    assert [t["function"]["name"] for t in args["tools"]] == ["weather", "note"], "the template shows the tools"
    (call,) = named.tool_calls('{"city": "Oslo"}')
    assert call["type"] == "function" and call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert call["id"].startswith("call_") and named.tool_calls('{"city": "Os') is None, "cut short: no call"
    required = parse_request(_chat(tools=[WEATHER, NOTE], tool_choice="required", parallel_tool_calls=False),
                             ChatCompletionRequest)
    schema = _args(required)["sampling"]["structured_outputs"]["json"]
    assert schema["type"] == "array" and schema["minItems"] == schema["maxItems"] == 1
    assert [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]] == [["weather"], ["note"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    calls = required.tool_calls('[{"name": "note", "parameters": {"text": "hi"}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("note", {"text": "hi"})]
    free = parse_request(_chat(tools=[WEATHER], tool_choice="none"), ChatCompletionRequest)
    assert "tools" not in _args(free) and free.tool_calls("hi") is None, "tool_choice none: free text"


@pytest.mark.parametrize("fields, param, words", [
    ({"tools": [WEATHER]}, "tool_choice", "tool-call parser"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "tool-call parser"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
     "tools.0.function.name", "pattern"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "one of"),
])
def test_tool_requests_that_cannot_be_honoured_name_the_field(fields, param, words):
    err = _refusal(_chat(**fields))
    assert err.param == param and words in err.message, err.message
    text = json.dumps({"model": "m", "prompt": "p", "tools": [WEATHER]}).encode()
    assert _refusal(text, CompletionRequest).code == "unsupported_parameter"


def test_tool_schemas_defs_are_hoisted_so_references_resolve():
    shared = {"type": "object", "properties": {"x": {"type": "integer"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": shared}}}}
    req = parse_request(_chat(tools=[tool], tool_choice="required"), ChatCompletionRequest)
    schema = _args(req)["sampling"]["structured_outputs"]["json"]
    assert schema["$defs"] == {"P": shared} and "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert "$defs" in req.tools[0].function.parameters, "the request's own schema is left as sent"
    other = {"type": "function", "function": {"name": "g", "parameters": {"$defs": {"P": {"type": "string"}}}}}
    err = _refusal(_chat(tools=[tool, other], tool_choice="required"))
    assert err.param == "tools" and "two different schemas" in err.message


def test_tool_choice_auto_reaches_the_parser_only_on_a_server_that_has_one():
    for fields in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
        req = parse_request(_chat(**fields), ChatCompletionRequest, {"tool_parser": "hermes"})
        assert req.parses_tools and req.offers_tools and req.uses_tools and not req.calls_tools
        args = _args(req, "hermes")
        assert args["tool_parser"] == "hermes" and [t["function"]["name"] for t in args["tools"]] == ["weather"]
        assert "sampling" not in args, "auto: free decoding, no structured outputs"
        assert json.loads(tools_asked(req)) == {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": None}
    forced = parse_request(_chat(tools=[WEATHER], tool_choice="required"), ChatCompletionRequest,
                           {"tool_parser": "hermes"})
    assert "tool_parser" not in _args(forced, "hermes"), "a forced call is decoded under its schema, not parsed"
    assert tools_asked(parse_request(_chat(), ChatCompletionRequest)) == ""
    none = parse_request(_chat(tools=[WEATHER], tool_choice="none"), ChatCompletionRequest)
    assert tools_asked(none) == "" and not none.uses_tools, "tool_choice none: a plain request, tools not shown"
    single = parse_request(_chat(tools=[WEATHER], parallel_tool_calls=False), ChatCompletionRequest,
                           {"tool_parser": "hermes"})
    assert "tool_parser" not in _args(single) and "parallel_tool_calls" not in _args(single), "no parser: none asked"
    assert _args(single, "hermes")["parallel_tool_calls"] is False


CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}


def test_an_agents_tool_turns_replay_to_the_template_as_vllm_passes_them():
    from loop.serving.engine import template_messages

    msgs = [{"role": "user", "content": "weather in Oslo?"}, CALLED, RESULT]
    req = parse_request(json.dumps({"model": "m", "messages": msgs, "tools": [WEATHER], "tool_choice": "none"}).encode(),
                        ChatCompletionRequest)
    assert req.uses_tools and not req.offers_tools, "tools: none, but a tool turn: still a tool conversation"
    sent = _args(req)["messages"]
    assert sent == [msgs[0], {k: v for k, v in CALLED.items() if v is not None}, RESULT], "the trace keeps OpenAI's form"
    shown = template_messages(sent)
    assert shown[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"} and shown[1]["content"] == ""
    # What a model wrote as arguments replays as given (the server may have returned it); the template
    # sees {} for what is not a JSON object, as vLLM's server renders it.
    odd = [{**CALLED, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "weather.now",
                                                                                      "arguments": a}}]}
           for i, a in enumerate(['"Oslo"', "null", "{x", "  ", "[" * 5000])]
    req = parse_request(json.dumps({"model": "m", "messages": [msgs[0], *odd]}).encode(), ChatCompletionRequest)
    assert [m["tool_calls"][0]["function"]["arguments"] for m in template_messages(_args(req)["messages"][1:])] == \
        [{}] * 5
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}', "the request is not changed"
    plain = parse_request(json.dumps({"model": "m", "messages": [*msgs[:1], {**CALLED, "content": "ok",
                                                                               "tool_calls": []}]}).encode(),
                          ChatCompletionRequest)
    assert not plain.uses_tools and "tool_calls" not in plain.messages[1].as_dict(), "replayed []: nothing asked"


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "tool", "content": "x"}], "messages.0", "tool_call_id"),
    ([{"role": "user", "content": "x", "tool_call_id": "c"}], "messages.0", "only a tool message"),
    ([{"role": "user", "content": None}], "messages.0", "content: required"),
    ([{**CALLED, "role": "user"}], "messages.0", "only an assistant"),
    ([{**CALLED, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "", "arguments": "{}"}}]}],
     "messages.0.tool_calls.0.function.name", "at least 1"),
    ([{**CALLED, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}],
     "messages.0.tool_calls.0.function.arguments", "required"),
])
def test_bad_tool_turns_name_the_field(messages, param, words):
    err = _refusal(json.dumps({"model": "m", "messages": messages}).encode())
    assert err.param == param and words in err.message, err.message


def test_tool_traffic_is_neither_labelled_nor_graded():
    from loop.control.judged import unrated

    live = {"tenant": "t", "request_id": "a", "status": 200, "completion": "x", "prompt": json.dumps([RESULT])}
    offered = {**live, "request_id": "b", "prompt": "[]", "tools": '{"tools": []}'}
    plain = {**live, "request_id": "c", "prompt": json.dumps([{"role": "user", "content": "the tool is broken"}])}
    assert [tool_traffic(r) for r in (live, offered, plain, {"prompt": "not json \"tool"})] == [True, True, False, False]
    assert [r["request_id"] for r in unrated([live, offered, plain], [], 1.0)] == ["c"]


def test_the_choice_of_an_auto_answer_is_what_the_parser_read():
    from loop.serving.engine import Generation
    from loop.serving.gateway import Gateway

    req = parse_request(_chat(tools=[WEATHER]), ChatCompletionRequest, {"tool_parser": "hermes"})
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    raw = 'Checking.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>'
    gen = Generation(raw, 3, 9, 1.0, "stop", tool_calls=[call], content="Checking.")
    choice = Gateway._choice(req, gen, {"completion": raw})
    assert choice.finish_reason == "tool_calls" and choice.message() == {
        "role": "assistant", "content": "Checking.", "tool_calls": [call]}
    said = Gateway._choice(req, Generation("It is sunny.", 3, 4, 1.0, "stop"), {"completion": "It is sunny."})
    assert said.finish_reason == "stop" and said.message() == {"role": "assistant", "content": "It is sunny."}


def test_vllms_tool_call_parser_reads_the_calls_on_the_models_tokenizer(tiny_model_dir):
    """The real vLLM parsers on a real tokenizer: Hermes' tags read into OpenAI's tool_calls; a parser
    whose tokens the tokenizer lacks, or one vLLM does not have, is a config error naming the field."""
    from transformers import AutoTokenizer

    from loop.serving.engine import Generation, ToolCallReader, tool_parser_problem

    msgs = [{"role": "user", "content": "weather in Oslo?"}]
    reader = ToolCallReader("hermes", AutoTokenizer.from_pretrained(tiny_model_dir), msgs, [WEATHER])
    assert reader.sampling() == {"skip_special_tokens": False}, "Hermes keeps its tags (special in some tokenizers)"
    gen = Generation('Checking.<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>', 3, 9, 1.0,
                     "stop")
    reader.read(gen)
    ((call),) = gen.tool_calls
    assert call["type"] == "function" and call["id"] and gen.content == "Checking."
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    plain = Generation("It is sunny.", 3, 4, 1.0, "stop")
    reader.read(plain)
    assert plain.tool_calls is None and plain.content is None, "no call read: the text is the answer"
    two = '\n<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>\n' \
          '<tool_call>{"name": "weather", "arguments": {"city": "B"}}</tool_call>'
    both, first = Generation(two, 3, 9, 1.0, "stop"), Generation(two, 3, 9, 1.0, "stop")
    reader.read(both)
    ToolCallReader("hermes", reader.parser.model_tokenizer, msgs, [WEATHER], parallel=False).read(first)
    assert [json.loads(c["function"]["arguments"])["city"] for c in both.tool_calls] == ["A", "B"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in first.tool_calls] == ["A"]
    assert both.content is None, "only whitespace beside the calls: no content, as vLLM's server"
    assert tool_parser_problem("hermes", tiny_model_dir) is None
    assert "<|python_tag|>" in tool_parser_problem("llama3_json", tiny_model_dir)
    problem = tool_parser_problem("nope", tiny_model_dir)
    assert problem.startswith("student.tool_call_parser: 'nope' is not a vLLM tool-call parser") and "hermes" in problem
