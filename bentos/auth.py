"""API-key check for write endpoints, as ASGI middleware: it answers 401 before the request body
is read, so an unauthenticated client cannot make the server parse (or buffer) anything."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

HEADER = b"x-api-key"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, protected: Sequence[str], api_key: str | None = None) -> None:
        self.app = app
        self.protected = tuple(protected)
        self._key = api_key

    @property
    def key(self) -> bytes:
        if self._key is None:  # read once, in the worker, from the same settings as everything else
            from recsys.config import load_settings

            self._key = load_settings().api_key.get_secret_value()
        return self._key.encode()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] == "http" and scope.get("path", "").rstrip("/") in self.protected:
            given = dict(scope.get("headers") or []).get(HEADER, b"")
            if not given or not hmac.compare_digest(given, self.key):
                body = json.dumps({"error": "missing or wrong API key: send it in the X-API-Key header"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"ApiKey")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
