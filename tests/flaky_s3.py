"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests (its own process, 127.0.0.1 only).

    python tests/flaky_s3.py --upstream http://127.0.0.1:PORT --port P --fail-rate 0.1 --seed 0

Each request is forwarded to the upstream unchanged, except a share ``--fail-rate`` of them (drawn from a
seeded RNG, so a run is repeatable): half of those are answered ``503 SlowDown`` with S3's XML error body,
half have their connection dropped without an answer. ``GET /__faults`` (never forwarded, never failed)
returns the counts as JSON: {"requests", "forwarded", "slowdown", "dropped", "by_method": {...}}.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter

from aiohttp import ClientSession, ClientTimeout, web

SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>flaky</RequestId></Error>"
)
# Not forwarded: per-connection headers, and lengths aiohttp recomputes (bodies pass through byte for
# byte, content-encoding included, so aws-chunked uploads and their checksums arrive intact).
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


def make_app(upstream: str, fail_rate: float, seed: int) -> web.Application:
    rng = random.Random(seed)
    counts: Counter = Counter()
    by_method: Counter = Counter()

    async def faults(request: web.Request) -> web.Response:
        return web.json_response({**counts, "by_method": dict(by_method)})

    async def proxy(request: web.Request) -> web.StreamResponse:
        counts["requests"] += 1
        body = await request.read()
        if rng.random() < fail_rate:
            by_method[request.method] += 1
            if rng.random() < 0.5:
                counts["slowdown"] += 1
                return web.Response(status=503, body=SLOWDOWN_BODY.encode(), content_type="application/xml")
            counts["dropped"] += 1
            request.transport.close()  # no status line at all: the client sees the connection die
            return web.Response(status=500)  # never delivered
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        session: ClientSession = request.app["session"]
        async with session.request(request.method, upstream + request.path_qs, headers=headers, data=body,
                                   allow_redirects=False) as upstream_response:
            payload = await upstream_response.read()
            out_headers = {k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP}
        counts["forwarded"] += 1
        if request.method == "HEAD":  # no body: the object's size travels in Content-Length alone
            response = web.StreamResponse(status=upstream_response.status, headers=out_headers)
            response.content_length = int(upstream_response.headers.get("Content-Length", 0))
            await response.prepare(request)
            return response
        return web.Response(status=upstream_response.status, body=payload, headers=out_headers)

    async def start(app: web.Application) -> None:
        app["session"] = ClientSession(timeout=ClientTimeout(total=120), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application(client_max_size=1024**3)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/__faults", faults)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream.rstrip("/"), args.fail_rate, args.seed), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
