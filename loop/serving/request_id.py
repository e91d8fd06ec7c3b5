"""The one `x-request-id` a response carries: the gateway's own (`ServerRequestId`, the gateway app's
middleware), and only it (`GatewayRequestId`, installed in Ray Serve's HTTP proxy).
"""
from __future__ import annotations

REQUEST_ID_HEADER = "x-request-id"
PROXY_CALLBACK = "loop.serving.request_id.proxy_middlewares"
"""What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names, in the environment of Serve's proxies."""


class ServerRequestId:
    """Every request gets the gateway's own id, `new_request_id()`, read by the routes as
    `request.state.request_id` and sent back in `x-request-id` on every response (refusals too).
    The client's `x-request-id` is only recorded (`client_request_id`), never a trace's id: were it
    one, a tenant could give its request another tenant's id. Serve's proxy appends the id the
    request arrived with after ours; `GatewayRequestId`, in the proxy, keeps ours only."""

    def __init__(self, app):
        from loop.traces.log import new_request_id

        self.app, self.new_id = app, new_request_id

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import MutableHeaders

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = self.new_id()
        scope["state"] = {**scope.get("state", {}), "request_id": request_id}

        async def stamped(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, stamped)


class GatewayRequestId:
    """A response names its request by one `x-request-id`: the first, which is the gateway's own.

    Ray Serve's proxy appends the id the request arrived with (the client's, or one it made up) to
    every response, whatever the response already says (`RequestIdMiddleware` in
    ray/serve/_private/http_util.py: `headers.append("X-Request-ID", request_id)`). The gateway sets
    its own id, so a client would get two; this ASGI middleware, outside Serve's, drops the later
    ones. A response Serve makes itself (no route, no replica) keeps Serve's id, its only one."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def first_id_only(message):
            if message["type"] == "http.response.start":
                name, seen, kept = REQUEST_ID_HEADER.encode(), False, []
                for k, v in message.get("headers", []):
                    if k.lower() == name:
                        if seen:
                            continue
                        seen = True
                    kept.append((k, v))
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, first_id_only)


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=PROXY_CALLBACK, set
    where Serve starts, e.g. `serve.start(controller_options={"runtime_env": {"env_vars": ...}})`:
    the proxies inherit the controller's environment)."""
    from starlette.middleware import Middleware

    return [Middleware(GatewayRequestId)]
