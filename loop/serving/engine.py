"""The student engine: one vLLM `AsyncLLM` per base model, each model version a LoRA adapter on it.

An adapter is hot-loaded on its first request (`LoRARequest`), so a new checkpoint goes live without
starting an engine. This class knows nothing about tenants, rollouts or traces; the gateway does.
vLLM is imported only when an engine is built, so `import loop` works without it.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field

from loop.config import EngineConfig


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    finish_reason: str
    mean_logprob: float | None = None
    """Mean log-probability of the generated tokens, when asked for (the cascade's confidence)."""
    token_ids: list[int] = field(default_factory=list)
    """The generated token ids (of this step, for a stream's delta)."""
    index: int = 0
    """Which of the request's `n` choices this is."""
    logprobs: list[dict] | None = None
    """Per generated token, when asked for (`sampling["logprobs"]`): {"token", "logprob", "top":
    [[token, logprob], ...]}, `top` in vLLM's order (the sampled token first, then the likeliest)."""
    others: list[Generation] = field(default_factory=list)
    """The other choices of a request with n > 1 (whole answers, indexes 1..n-1)."""
    tool_calls: list[dict] | None = None
    """The calls the tool-call parser read in `text` (asked with `tool_parser`), in OpenAI's shape;
    `content` is then what the model said beside them (None: nothing)."""
    content: str | None = None


class EngineRequestError(ValueError):
    """A request that is the caller's to fix (a prompt over the context, a token id outside the
    vocabulary, a schema vLLM cannot compile): the gateway answers it with a 400 naming `param`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self):  # Ray pickles it to the gateway: keep param and code
        return type(self), (str(self), self.param, self.code)


def _replayed_arguments(text: str) -> dict:
    """A replayed call's arguments as the template sees them: the JSON object, or `{}` for anything
    else (not JSON, not an object), as vLLM's server renders them so the conversation can go on."""
    try:
        decoded = json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as chat templates take them: an assistant's tool-call arguments decoded from their
    JSON string to an object, as vLLM's server passes them (Transformers' tool-use templates expect it),
    and its missing content empty (templates without tool support concatenate it)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "content": m.get("content") or "", "tool_calls": [
                {**c, "function": {**c["function"], "arguments": _replayed_arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]]}
        out.append(m)
    return out


class ToolCallReader:
    """vLLM's tool-call parser `name` (ToolParserManager: `hermes`, `llama3_json`, `pythonic`, ...) on
    the answers of one request with tools and tool_choice auto, as vLLM's server applies it: the
    parser may adjust the request (keep special tokens), then reads each finished answer."""

    def __init__(self, name: str, tokenizer, messages: list[dict], tools: list[dict], parallel: bool = True):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        request = ChatCompletionRequest(model="student", messages=messages, tools=tools, tool_choice="auto")
        self.parser = ToolParserManager.get_tool_parser(name)(tokenizer, request.tools)
        self.request = self.parser.adjust_request(request)
        self.parallel = parallel

    def sampling(self) -> dict:
        """What the parser needs of the sampling (Hermes' tags are special tokens in some tokenizers)."""
        return {} if self.request.skip_special_tokens else {"skip_special_tokens": False}

    def read(self, gen: Generation) -> None:
        """The calls in `gen.text` into `gen.tool_calls` (the first only when parallel_tool_calls is
        false, as vLLM's server keeps it), what the model said beside them into `gen.content` (None
        when only whitespace, as vLLM's server)."""
        info = self.parser.extract_tool_calls(gen.text, self.request)
        if info.tools_called and info.tool_calls:
            calls = info.tool_calls if self.parallel else info.tool_calls[:1]
            gen.tool_calls = [c.model_dump(include={"id", "type", "function"}) for c in calls]
            gen.content = info.content if info.content and info.content.strip() else None


def tool_parser_problem(name: str, model_dir) -> str | None:
    """Why vLLM's tool-call parser `name` cannot read the calls of the model at `model_dir` (None: it
    can, or this machine cannot tell: no vLLM, or the model is not fetched yet). A parser that needs
    tokens the tokenizer lacks (Llama 3's `<|python_tag|>`) fails here, not on a user's request."""
    from pathlib import Path

    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:
        return None
    known = ToolParserManager.list_registered()
    if name not in known:
        return f"student.tool_call_parser: {name!r} is not a vLLM tool-call parser (one of {', '.join(known)})"
    if not (Path(model_dir) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    try:
        ToolCallReader(name, AutoTokenizer.from_pretrained(model_dir), [{"role": "user", "content": "hi"}],
                       [{"type": "function", "function": {"name": "probe"}}])
    except Exception as e:  # noqa: BLE001 - whatever the parser says is the config's problem
        return f"student.tool_call_parser: {name!r} cannot read {model_dir}'s calls: {e}"
    return None


class StudentEngine:
    def __init__(self, model_dir: str, engine: EngineConfig, dtype: str = "float32", seed: int = 0,
                 lora: bool = True, draft_dir: str | None = None):
        """`lora`: serve versions as hot-loaded adapters (the multi_lora backend). `draft_dir`: a draft
        model with the student's tokenizer for speculative decoding (the merged backend), proposing
        `engine.num_speculative_tokens` tokens per step."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extra = {}
        if lora:
            extra.update(enable_lora=True, max_loras=engine.max_loras, max_cpu_loras=engine.max_cpu_loras,
                         max_lora_rank=engine.max_lora_rank)
        if draft_dir and engine.num_speculative_tokens:
            extra["speculative_config"] = {"model": draft_dir, "method": "draft_model",
                                           "num_speculative_tokens": engine.num_speculative_tokens}
        args = AsyncEngineArgs(
            model=model_dir, dtype=dtype, seed=seed,
            gpu_memory_utilization=engine.gpu_memory_utilization, max_model_len=engine.max_model_len,
            enforce_eager=engine.enforce_eager, disable_log_stats=True, **extra)
        self.engine = AsyncLLM.from_engine_args(args)
        self.lora_enabled = lora
        self.spec = extra.get("speculative_config")
        self.model_dir = model_dir
        self.settings = {"engine": engine.model_dump(mode="json"), "dtype": dtype}
        self.tokenizer = self.engine.get_tokenizer()
        self.max_model_len = engine.max_model_len
        self._lora_ids: dict[str, int] = {}

    def _lora(self, adapter_path: str | None):
        if not adapter_path:
            return None
        if not self.lora_enabled:
            raise ValueError("this engine serves one merged version and takes no adapter")
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(adapter_path, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, adapter_path)

    def _prompt_ids(self, messages: list[dict] | None, prompt: str | None,
                    tools: list[dict] | None = None) -> list[int]:
        if messages is not None:
            try:
                ids = self.tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True,
                                                         tokenize=True, **({"tools": tools} if tools else {}))
            except Exception as e:  # noqa: BLE001 - jinja's errors: the conversation is the caller's
                raise EngineRequestError(f"the base model's chat template cannot render these messages: "
                                         f"{type(e).__name__}: {e}", param="messages") from None
            if hasattr(ids, "input_ids") or isinstance(ids, dict):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_model_len:
            raise EngineRequestError(f"prompt is {len(ids)} tokens; this endpoint's context is {self.max_model_len}",
                                     param="messages" if messages is not None else "prompt",
                                     code="context_length_exceeded")
        return list(ids)

    def _params(self, max_tokens: int, temperature, top_p, seed, delta: bool, confidence: bool, sampling: dict):
        """vLLM's SamplingParams for one request: the request's own fields (`sampling`: stop strings,
        penalties, n, logprobs, logit_bias, structured outputs), with vLLM's refusals as the caller's."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        sampling = dict(sampling)
        if sampling.get("structured_outputs"):
            sampling["structured_outputs"] = StructuredOutputsParams(**sampling["structured_outputs"])
        if confidence:  # the cascade's mean log-probability needs the sampled tokens' log-probabilities
            sampling["logprobs"] = sampling.get("logprobs") or 0
        # n > 1 without deltas: the n whole answers at the end (vLLM aggregates them only then).
        kind = (RequestOutputKind.DELTA if delta else
                RequestOutputKind.FINAL_ONLY if sampling.get("n", 1) > 1 else RequestOutputKind.CUMULATIVE)
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                  output_kind=kind, **sampling)
        except (VLLMValidationError, ValueError) as e:
            raise EngineRequestError(str(e), param=getattr(e, "parameter", None)) from None

    def _token(self, token_id: int, logprob) -> str:
        """A token as vLLM's OpenAI server names it: the detokenizer's text, else the decoded id."""
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode(token_id)

    def _logprobs(self, choice, asked: bool) -> list[dict] | None:
        """The choice's per-token log-probabilities (-9999 for minus infinity, as vLLM's server)."""
        if not asked or choice.logprobs is None:
            return None
        out = []
        for token_id, step in zip(choice.token_ids, choice.logprobs):
            chosen = step.get(token_id)
            out.append({"token": self._token(token_id, chosen),
                        "logprob": None if chosen is None else max(chosen.logprob, -9999.0),
                        "top": [[self._token(t, lp), max(lp.logprob, -9999.0)] for t, lp in step.items()]})
        return out

    async def _outputs(self, messages, prompt, max_tokens, temperature, top_p, seed, adapter_path, request_id,
                       delta: bool, confidence: bool = False, sampling: dict | None = None,
                       tools: list[dict] | None = None):
        """Lists of generations as the engine makes them, one per choice it has news of: deltas
        (`delta`) or the text so far. `sampling`: more of vLLM's SamplingParams, only what the request
        set (stop strings, penalties, n, logprobs, logit_bias, structured outputs). `tools`: the
        functions the chat template shows the model."""
        from vllm.exceptions import VLLMClientError

        ids = self._prompt_ids(messages, prompt, tools)
        sampling = sampling or {}
        params = self._params(min(max_tokens, self.max_model_len - len(ids)), temperature, top_p, seed, delta,
                              confidence, sampling)
        asked = sampling.get("logprobs") is not None
        start, first = time.perf_counter(), None
        outputs = self.engine.generate({"prompt_token_ids": ids}, params, request_id,
                                       lora_request=self._lora(adapter_path))
        try:
            while True:
                try:
                    out = await outputs.__anext__()
                except StopAsyncIteration:
                    return
                except (VLLMClientError, ValueError) as e:
                    # A plain ValueError is the caller's only as a schema the grammar compiler refused.
                    if first is not None or not (isinstance(e, VLLMClientError) or params.structured_outputs):
                        raise
                    # vLLM checks a request as it adds it (token ids in logit_bias, a schema it cannot
                    # compile): before any token, the caller's to fix
                    param = getattr(e, "parameter", None) or ("structured_outputs" if params.structured_outputs
                                                              else None)
                    raise EngineRequestError(str(e), param=param) from None
                if first is None and any(c.token_ids for c in out.outputs):
                    first = (time.perf_counter() - start) * 1000
                # Cumulative outputs: the log-probabilities once, of the finished answer (not at every step).
                yield [self._generation(c, len(ids), first or 0.0, confidence, asked and (delta or c.finished()))
                       for c in out.outputs]
        finally:
            await outputs.aclose()  # a client that hung up: vLLM aborts the request

    def _generation(self, choice, n_prompt: int, ttft_ms: float, confidence: bool, asked: bool) -> Generation:
        mean = None
        if confidence and choice.cumulative_logprob is not None and choice.token_ids:
            mean = choice.cumulative_logprob / len(choice.token_ids)
        return Generation(text=choice.text, prompt_tokens=n_prompt, completion_tokens=len(choice.token_ids),
                          ttft_ms=ttft_ms, finish_reason=choice.finish_reason or "", mean_logprob=mean,
                          token_ids=list(choice.token_ids), index=choice.index,
                          logprobs=self._logprobs(choice, asked))

    async def generate(self, messages: list[dict] | None = None, *, prompt: str | None = None, max_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       adapter_path: str | None = None, request_id: str, confidence: bool = False,
                       sampling: dict | None = None, tools: list[dict] | None = None,
                       tool_parser: str | None = None, parallel_tool_calls: bool = True) -> Generation:
        """The whole answer at once (with n > 1, the first choice, the others in its `others`).
        `messages` (chat) or `prompt` (text completion); `confidence` also returns the mean token
        log-probability. `tool_parser`: the `tools` are the model's to call or not (tool_choice auto),
        and this vLLM tool-call parser reads each answer's calls into its `tool_calls` (the first only,
        with `parallel_tool_calls` false)."""
        reader = None
        if tool_parser:
            try:
                reader = ToolCallReader(tool_parser, self.tokenizer, messages, tools, parallel_tool_calls)
            except ValueError as e:  # vLLM's own request model refusing the conversation or its tools
                raise EngineRequestError(f"the tool-call parser cannot take this request: {e}", param="tools") from None
        if reader:
            sampling = {**(sampling or {}), **reader.sampling()}
        latest: dict[int, Generation] = {}
        async for gens in self._outputs(messages, prompt, max_tokens, temperature, top_p, seed, adapter_path,
                                        request_id, delta=False, confidence=confidence, sampling=sampling,
                                        tools=tools):
            latest.update((g.index, g) for g in gens)
        first, *others = [latest[i] for i in sorted(latest)]
        for gen in latest.values():
            gen.finish_reason = gen.finish_reason or "stop"
            if reader:
                reader.read(gen)
        first.others = others
        return first

    async def generate_stream(self, messages: list[dict] | None = None, *, prompt: str | None = None,
                              max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                              seed: int | None = None, adapter_path: str | None = None, request_id: str,
                              sampling: dict | None = None, tools: list[dict] | None = None):
        """Yields Generation deltas as tokens are produced (text and token count of each step, and the
        choice it belongs to: with n > 1 the choices' deltas interleave)."""
        async for gens in self._outputs(messages, prompt, max_tokens, temperature, top_p, seed, adapter_path,
                                        request_id, delta=True, sampling=sampling, tools=tools):
            for gen in gens:
                yield gen

    def info(self) -> dict:
        """What this engine serves: its model, whether it takes adapters, its speculative decoding, and
        the engine settings and dtype it was started with."""
        return {"model": self.model_dir, "lora": self.lora_enabled, "speculative": self.spec, **self.settings}

    async def check_health(self) -> None:
        """Serve's health probe: a dead engine core fails it, so Serve replaces the replica."""
        await self.engine.check_health()

    def shutdown(self) -> None:
        # Drop the last reference now: AsyncLLM.__del__ would otherwise run at interpreter exit,
        # when the modules it needs are already gone.
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()
            del engine
            gc.collect()

    def __del__(self):
        # Serve calls this when it stops the replica; without it the engine's worker processes
        # outlive the replica and keep their KV-cache memory.
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001 - best effort at interpreter teardown
                pass


def answer_with_engine(model_dir: str, engine_cfg: dict, conversations: list[list[dict]], max_tokens: int,
                       draft_dir: str | None = None) -> dict:
    """Start an engine on `model_dir` (merged weights; with `draft_dir`, speculative decoding), answer
    each conversation greedily one at a time (batch 1), and shut the engine down. Returns the texts,
    their token ids, the token count and the answering time (the engine start is not timed). For the validation gate's
    serving parity and the draft benchmark; run it in a Ray task so the engine has its own process."""
    import asyncio

    engine = StudentEngine(model_dir, EngineConfig.model_validate(engine_cfg), lora=False, draft_dir=draft_dir)

    async def answer_all():
        texts, ids = [], []
        await engine.generate(conversations[0], max_tokens=4, request_id="warmup")
        t0 = time.perf_counter()
        for i, c in enumerate(conversations):
            gen = await engine.generate(c, max_tokens=max_tokens, request_id=f"q{i}")
            texts.append(gen.text)
            ids.append(gen.token_ids)
        return {"seconds": time.perf_counter() - t0, "texts": texts, "tokens": sum(map(len, ids)), "token_ids": ids}

    try:
        return asyncio.run(answer_all())
    finally:
        engine.shutdown()


def kill_orphaned_engines() -> int:
    """vLLM engine processes whose replica was killed are re-parented to init: end those only.
    Returns how many."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,ppid=,comm="], capture_output=True, text=True).stdout
    killed = 0
    for line in out.splitlines():
        pid, ppid, comm = line.split(None, 2)
        if comm.startswith("VLLM::") and ppid == "1":
            killed += subprocess.run(["kill", "-9", pid], capture_output=True).returncode == 0
    return killed
