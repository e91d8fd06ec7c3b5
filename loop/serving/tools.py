"""Tools as OpenAI's chat API takes them: the functions offered, a `tool_choice` naming one, the
calls an earlier assistant turn made (replayed), and the JSON schema `tool_choice: required` decodes
under (as vLLM's server builds it)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loop.serving.errors import BadRequest


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1 << 16)
    """The arguments as the response gave them: a JSON object in a string. Replayed as given, whatever a
    model wrote there (the template sees `{}` for what is not an object, as vLLM's server renders it),
    so a conversation with one malformed call can go on."""


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant turn, replayed as OpenAI's response gave it."""
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    """A JSON schema of the arguments (none: any JSON object)."""
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


def arguments_schema(params: dict | None) -> dict:
    """A function's `parameters`, or any JSON object when it names none."""
    return params or {"type": "object", "properties": {}}


def tool_calls_schema(tools: list[Tool], parallel: bool | None) -> dict:
    """`tool_choice: required` as vLLM's server decodes it: a JSON array of at least one
    {name, parameters} of the given tools (at most one when `parallel_tool_calls` is false)."""
    defs, items = {}, []
    for t in tools:
        params = dict(arguments_schema(t.function.parameters))
        for name, sub in params.pop("$defs", {}).items():  # hoisted, so `#/$defs/...` still resolves
            if defs.setdefault(name, sub) != sub:
                raise BadRequest(f"tools: $defs {name!r} has two different schemas", param="tools")
        items.append({"properties": {"name": {"type": "string", "enum": [t.function.name]}, "parameters": params},
                      "required": ["name", "parameters"]})
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
