"""A webhook endpoint for tests: a real aiohttp server on 127.0.0.1 that records every POST and verifies signatures.

Paths choose how it answers: `/ok` 200, `/flaky` 500 to the first two attempts of each delivery and then 200,
`/hang` never (the gateway's attempt times out), `/gone` 410.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections import Counter
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def delivery(self) -> str:
        return self.headers["X-Mvm-Delivery"]

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        timestamp = self.headers["X-Mvm-Timestamp"]
        expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers["X-Mvm-Signature"], f"sha256={expected}")


class Receiver:
    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.attempts: Counter[str] = Counter()
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{path}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        post = Post(path, dict(request.headers), await request.read())
        self.attempts[post.delivery] += 1
        async with self.changed:
            self.posts.append(post)
            self.changed.notify_all()
        if path == "hang":
            await asyncio.sleep(3600)
        if path == "flaky" and self.attempts[post.delivery] <= 2:
            return web.Response(status=500, text="not yet")
        if path == "gone":
            return web.Response(status=410)
        return web.Response(text="ok")

    def on(self, path: str) -> list[Post]:
        return [post for post in self.posts if post.path == path]

    async def wait_for(self, path: str, count: int, timeout: float = 60) -> list[Post]:
        """The first `count` posts to `path`, once that many arrived."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.on(path)) >= count), timeout)
        return self.on(path)[:count]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
