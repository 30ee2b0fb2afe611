"""What a rollout's start pays to ask its live engine servers which weights they hold.

A rollout worker's `Router.readmit` asks every live server, at once, for the weights version it
holds (vLLM `GET /weight_info`, SGLang `GET /get_model_info`), so that one restarted unnoticed
is not sampled as the current policy. Here 1, 2 and 4 local HTTP servers answer with the
recorded vLLM and SGLang responses (tests/fixtures/engines); the same router's `readmit` runs
ROUNDS times with the probe (version 3 stamped) and without it (version 0: nothing to ask),
taking turns, on kept-alive connections as a worker's are. Reports each side's median and p99
in ms and the probe's added median. Prints one JSON object and writes
bench/results/version_probe.json.

    python -m bench.version_probe
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.report import save_result
from forge.rollout.engines.router import Router
from forge.rollout.engines.sglang_client import SGLangClient
from forge.rollout.engines.vllm_client import VLLMClient

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "engines"


def fixture_server(path: str, response: Any) -> ThreadingHTTPServer:
    """A local server answering GET `path` with the recorded `response` (JSON), on a free port."""
    body = json.dumps(response).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's and SGLang's uvicorn servers
        disable_nagle_algorithm = True  # headers and body leave at once, as uvicorn sends them

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            status = 200 if self.path == path else 404
            payload = body if status == 200 else b'{"detail": "Not Found"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def measure(kind: str, count: int, rounds: int) -> dict[str, float]:
    vllm = json.loads((FIXTURES / "vllm.json").read_text())["weight_info"]
    sglang = json.loads((FIXTURES / "sglang.json").read_text())["get_model_info"]
    recorded = vllm if kind == "vllm" else sglang
    response = {**recorded["response"], "weight_version": "3"}
    servers = [fixture_server(recorded["path"], response) for _ in range(count)]
    urls = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    clients = [
        VLLMClient(url, "/models/qwen", None) if kind == "vllm" else SGLangClient(url, None) for url in urls
    ]
    router = Router(clients)
    times: dict[str, list[float]] = {"probe": [], "none": []}
    try:
        for index in range(rounds * 2 + 10):
            side = "probe" if index % 2 == 0 else "none"
            router.stamp_version(3 if side == "probe" else 0)
            started = time.perf_counter()
            await router.readmit()
            if index >= 10:  # the first rounds open the connections
                times[side].append((time.perf_counter() - started) * 1000)
        assert router.live == count, "a fixture server was dropped"
    finally:
        for client in clients:
            await client.close()
        for server in servers:
            server.shutdown()

    def p99(values: list[float]) -> float:
        return sorted(values)[int(0.99 * (len(values) - 1))]

    probe, none = statistics.median(times["probe"]), statistics.median(times["none"])
    return {
        "servers": count,
        "kind": kind,
        "probe_median_ms": round(probe, 3),
        "probe_p99_ms": round(p99(times["probe"]), 3),
        "without_median_ms": round(none, 3),
        "added_median_ms": round(probe - none, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--output", default="bench/results/version_probe.json")
    args = parser.parse_args()
    cases = [
        asyncio.run(measure(kind, count, args.rounds)) for kind in ("vllm", "sglang") for count in (1, 2, 4)
    ]
    # The fixture servers run as threads of this process: their work shares its GIL and cores,
    # which real servers (their own processes) do not, so these are upper bounds.
    result = {
        "bench": "version_probe",
        "rounds": args.rounds,
        "load_average": os.getloadavg()[0],
        "cases": cases,
    }
    print(json.dumps(result))
    save_result(result, Path(args.output))


if __name__ == "__main__":
    main()
