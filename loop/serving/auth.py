"""Who is calling: a tenant's API key or the admin key, from the `Authorization: Bearer` header.

Keys are never stored, only their hashes (`loopctl keys hash`). A refusal is a `BadRequest` in
OpenAI's error shape (401: no or unknown key; 403: a tenant key on an admin route).
"""
from __future__ import annotations

from loop.config import hash_api_key
from loop.serving.errors import BadRequest


def bearer_key(headers, what: str = "API key") -> str:
    """The key of `Authorization: Bearer <key>`; 401 naming what to send when there is none."""
    auth = headers.get("authorization", "")
    if not auth.lower().startswith("bearer ") or not auth[7:].strip():
        raise BadRequest(f"missing {what}: send 'Authorization: Bearer <{what}>'", status=401,
                         code="invalid_api_key", type_="authentication_error")
    return auth[7:].strip()


def tenant_of(headers, key_to_tenant: dict[str, str]) -> str:
    """The tenant whose key hash the request's bearer key has; 401 for an unknown key."""
    tenant = key_to_tenant.get(hash_api_key(bearer_key(headers)))
    if tenant is None:
        raise BadRequest("invalid API key", status=401, code="invalid_api_key", type_="authentication_error")
    return tenant


def require_admin(headers, admin_key_hash: str | None) -> None:
    """The request carries the admin key (a gateway without one refuses every admin call)."""
    key = bearer_key(headers, "admin key")
    if not admin_key_hash or hash_api_key(key) != admin_key_hash:
        raise BadRequest("admin key required for /admin routes", status=403, code="forbidden",
                         type_="permission_error")
