"""E2B's sandbox logs (`GET /sandboxes/{id}/logs`, `GET /v2/sandboxes/{id}/logs`) as the sandbox's console log
(ReadConsoleLog): the guest's boot and system output, the nearest we keep to E2B's envd logs.

Our console keeps bytes, not timed entries: each line is answered with the time of the request, at level `info`,
newest last. `limit` bounds the lines (the newest ones; default 1000) and only the newest TAIL_BYTES are read.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.gateway.e2b.shapes import PREFIX, E2bError

TAIL_BYTES = 1 << 20
DEFAULT_LINES = 1000


async def logs(plane, request: web.Request, v2: bool) -> web.Response:
    metadata = plane.metadata(request)
    try:
        limit = int(request.query.get("limit", DEFAULT_LINES))
    except ValueError:
        raise E2bError(400, "limit must be a number") from None
    if limit < 0:
        raise E2bError(400, "limit must be at least 0")
    read = api.ReadConsoleLogRequest(sandbox=PREFIX + request.match_info["id"], tail_bytes=TAIL_BYTES)
    data = b"".join([chunk.data async for chunk in plane.stub().ReadConsoleLog(read, metadata=metadata, timeout=30)])
    lines = data.decode(errors="replace").splitlines()[-limit:] if limit else []
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    entries = [{"timestamp": now, "level": "info", "message": line, "fields": {}} for line in lines]
    if v2:
        return web.json_response({"logs": entries})
    return web.json_response({"logs": [{"timestamp": now, "line": line} for line in lines], "logEntries": entries})
