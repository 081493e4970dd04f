"""How an h2c stream's headers become an HTTP/1.1 request to the door's own application, and how its answer's
headers go back (services/gateway/e2b/http2.py)."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

# HTTP/1.1 framing and connection headers, meaningless (and refused by h2) in HTTP/2, both ways.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"})
# A request's Expect would have the application answer 100 Continue to the forwarder, not to the client.
NOT_FORWARDED = HOP_BY_HOP | {"host", "expect", "http2-settings"}


class UpstreamRequestError(Exception):
    """A request that cannot be said in HTTP/1.1 (answered 400)."""


def upstream_request(h2_headers: list[tuple[bytes, bytes]]) -> tuple[str, str, CIMultiDict]:
    """Method, target and HTTP/1.1 headers of an h2 request (h2 has checked its pseudo-headers are well formed)."""
    pseudo: dict[bytes, bytes] = {}
    headers: CIMultiDict = CIMultiDict()
    cookies: list[str] = []
    try:
        for name, value in h2_headers:
            if name.startswith(b":"):
                pseudo[name] = value
            elif name == b"cookie":  # h2 may split the Cookie header; HTTP/1.1 has exactly one
                cookies.append(value.decode())
            elif name.decode() not in NOT_FORWARDED:
                headers.add(name.decode(), value.decode())
        method, target = pseudo.get(b":method", b"").decode(), pseudo.get(b":path", b"").decode()
        authority = pseudo.get(b":authority") or dict(h2_headers).get(b"host", b"")
        headers["Host"] = authority.decode()
    except UnicodeDecodeError:
        raise UpstreamRequestError("request headers must be UTF-8") from None
    if cookies:
        headers["Cookie"] = "; ".join(cookies)
    if method == "CONNECT" or not target.startswith("/"):
        raise UpstreamRequestError(f"{method} {target}: only requests for a path are served")
    return method, target, headers


def declared_length(h2_headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's content-length (h2 has checked it is a number that the body matches)."""
    for name, value in h2_headers:
        if name == b"content-length":
            return int(value)
    return None


def response_headers(response: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
    headers = [(b":status", str(response.status).encode())]
    for name, value in response.raw_headers:
        name = name.lower()
        if name.decode("latin-1") not in HOP_BY_HOP:
            headers.append((name, value))
    return headers
