"""Who is served: tenants (their API key hashes) and their endpoints, each with its own model
versions, backend and optional cascade to the teacher."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from loop.config.base import ID_PATTERN, KEY_HASH_PATTERN, Section


class CascadeConfig(Section):
    min_mean_logprob: float = Field(le=0)
    """Escalate to the teacher when the student's mean token log-probability is below this
    (e.g. -1.0). A streamed request on such an endpoint is judged whole, then sent as one chunk."""


class EndpointConfig(Section):
    id: str
    """Served as model name `model-{id}`; also names the registered model `student-{id}`."""
    backend: Literal["multi_lora", "merged"] = "multi_lora"
    """`multi_lora`: one vLLM engine per base model, each version a hot-loaded adapter (a new version
    is live in seconds). `merged`: one engine deployment per version, serving its merged weights with
    its matched draft for speculative decoding (a new version costs an engine start)."""
    cascade: CascadeConfig | None = None
    """Low-confidence answers are replaced by the teacher's (and become training data)."""

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            raise ValueError("must be lowercase letters, digits and '-', starting with a letter or digit")
        return v

    @property
    def model_name(self) -> str:
        return f"model-{self.id}"


class TenantConfig(Section):
    id: str
    api_key_hashes: list[str] = Field(min_length=1)
    """`sha256:<hex>` of each key (`loopctl keys hash KEY`); keys are never stored in plaintext."""
    endpoints: list[EndpointConfig] = Field(min_length=1)
    sim_api_key_env: str | None = None
    """Environment variable with a plaintext key of this tenant for the simulated users (demo and
    tests only); the config itself never holds a key."""

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not KEY_HASH_PATTERN.match(h):
                raise ValueError("each entry must be 'sha256:<64 hex>' (make one with `loopctl keys hash KEY`)")
        return v
