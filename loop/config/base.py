"""What every config section shares: unknown fields are errors; ids and key hashes have one shape."""
from __future__ import annotations

import hashlib
import re

from pydantic import BaseModel, ConfigDict


ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


KEY_HASH_PATTERN = re.compile(r"^sha256:[0-9a-f]{64}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def hash_api_key(key: str) -> str:
    """The only form in which an API key is stored: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
