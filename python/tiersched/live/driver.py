"""Open-loop streaming driver for /generate: sends each request at its arrival time, records what came back.

Why not `sglang.benchmark.serving` itself: its request function (`async_request_sglang_generate`) can carry
`priority` (through `extra_request_body`) and reads `meta_info.cached_tokens` (with `--cache-report`), but its
`RequestFuncOutput` drops the rest of `meta_info`, and our replay and fault test need `meta_info.dp_rank` per
request; it also reads its sampling settings from a module-global `args`. So this driver mirrors that function's
timing rules exactly (TTFT = first chunk carrying text; each later chunk's gap is split evenly over the tokens it
adds, as upstream does for ITL; `ignore_eos` so every request generates its planned length) and additionally keeps
`dp_rank`, `cached_tokens`, `priority` and the request's class. Arrivals come from the request set (the same
times in every arm), not from upstream's `get_request` Poisson sampler, so A and B runs see identical load.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import aiohttp

from tiersched.live.requests import LiveRequest


@dataclass
class RequestResult:
    rid: str
    cls: str
    priority: int
    prompt_len: int
    output_len: int  # planned
    sent_s: float = 0.0  # when it was sent, relative to the run start
    success: bool = False
    finished: bool = False  # a final answer (success or an error status) came back: False = lost
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    dp_rank: int | None = None

    @property
    def tpot(self) -> float | None:
        """Upstream's definition: (latency - ttft) / (output tokens - 1), only for multi-token outputs."""
        if self.completion_tokens > 1:
            return (self.latency - self.ttft) / (self.completion_tokens - 1)
        return None


def generate_payload(req: LiveRequest, send_priority: bool = True) -> dict:
    body = {
        "input_ids": list(req.input_ids),
        "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True},
        "stream": True,
    }
    if send_priority:
        body["priority"] = req.priority
    return body


async def _send(session: aiohttp.ClientSession, url: str, req: LiveRequest, result: RequestResult,
                send_priority: bool) -> None:
    start = time.perf_counter()
    last_time, last_len = start, 0
    try:
        async with session.post(url + "/generate", json=generate_payload(req, send_priority)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                result.finished = True
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                data = line[6:] if line.startswith(b"data: ") else line
                if data == b"[DONE]":
                    result.finished = True
                    continue
                chunk = json.loads(data)
                meta = chunk.get("meta_info") or {}
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                now = time.perf_counter()
                tokens = int(meta.get("completion_tokens", last_len))
                if tokens > 0 and result.ttft == 0.0:
                    result.ttft = now - start
                elif tokens > last_len:
                    gap = (now - last_time) / (tokens - last_len)
                    result.itl.extend([gap] * (tokens - last_len))
                if tokens > last_len:
                    last_time, last_len = now, tokens
                result.completion_tokens = tokens
                result.cached_tokens = int(meta.get("cached_tokens", result.cached_tokens) or 0)
                if meta.get("dp_rank") is not None:
                    result.dp_rank = int(meta["dp_rank"])
                finish = meta.get("finish_reason")
                if finish and finish.get("type") == "abort":
                    result.error = f"aborted: {finish.get('message', '')}"[:300]
            result.latency = time.perf_counter() - start
            result.success = result.finished and not result.error and result.completion_tokens == req.output_len
            if result.finished and not result.success and not result.error:
                result.error = f"generated {result.completion_tokens} of {req.output_len} tokens"
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_requests(url: str, requests: Sequence[LiveRequest], send_priority: bool = True,
                       timeout_s: float = 600.0, on_sent=None) -> list[RequestResult]:
    """Send every request at its `arrival_s` (open loop) and wait for all; one result per request, in order.

    `on_sent(index, elapsed_s, results)` (optional) runs right after each send is scheduled, with the live result
    list (a result with `dp_rank` set and `finished` False is running on that rank); the fault test uses it to act
    mid-run. Requests still running at `timeout_s` are cancelled and count as lost (finished=False).
    """
    results = [RequestResult(r.rid, r.cls, r.priority, len(r.input_ids), r.output_len) for r in requests]
    # One connection per request, as upstream's bench_serving client (a new session per request): a pooled
    # keep-alive connection can be reused just as the server closes it idle, and the request fails with
    # "Connection reset by peer" (3 of 2880 requests in each 5-minute load run, docs/live-results.md).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=10 * 1024**2) as session:
        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            delay = req.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            results[i].sent_s = time.perf_counter() - start
            tasks.append(asyncio.create_task(_send(session, url, req, results[i], send_priority)))
            if on_sent is not None:
                on_sent(i, results[i].sent_s, results)
        remaining = timeout_s - (time.perf_counter() - start)
        done, pending = await asyncio.wait(tasks, timeout=max(1.0, remaining))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return results


def drive(url: str, requests: Sequence[LiveRequest], send_priority: bool = True, timeout_s: float = 600.0,
          on_sent=None) -> list[RequestResult]:
    return asyncio.run(run_requests(url, requests, send_priority, timeout_s, on_sent))


def flush_cache(url: str) -> bool:
    """Upstream's /flush_cache (what bench_serving's --flush-cache calls) so each run starts from a cold cache."""
    import urllib.request

    for _ in range(30):
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"), timeout=30) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)  # upstream refuses to flush while requests are still running
    return False


def write_results(path: str | Path, results: Iterable[RequestResult], extra: dict | None = None) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps({**asdict(r), **(extra or {})}) + "\n")
