"""Replay a trace window against an OpenAI-compatible endpoint (the router, an emulator, or vLLM) and measure
TTFT and TBT at the client.

Open loop: request ``i`` is sent at ``t0 + arrival_s[i] * time_scale`` whatever happened to the others (the
workload comes from :func:`envs.workloads.make_workload`, so the same arguments give the same requests as the
simulator replays). Each request is a streaming ``/v1/completions`` call whose prompt is a list of
``input_tokens`` token ids (so the prompt length is exact on vLLM and the emulator alike), with
``max_tokens`` = the trace's output length, ``ignore_eos: true`` and ``stream_options.include_usage``.

Times are measured on the wall clock and divided by ``time_scale``, so against emulators run at time scale
``s`` they are model seconds, comparable with the simulator's. TTFT is from sending the request to the first
SSE event carrying text. TBT is counted per token, as the simulator counts it: a chunk of ``k`` text events
arriving ``G`` after the previous chunk gives ``k`` samples of ``G / k`` (see :class:`_TokenClock`); with one
event per chunk, as vLLM streams, the samples are the gaps between text events.

The run is bounded: requests are sent only for the window, then outstanding ones get ``drain_timeout_s`` wall
seconds; whatever is still running is cancelled and counted ``unfinished``. Every request is accounted for:
``completed``, ``rejected`` (HTTP or stream error, the reason counted by kind) or ``unfinished``.

Summary keys and percentile conventions are the simulator's (:mod:`envs.metrics`): ``ttft_s``/``e2e_s``
percentiles by ``numpy.percentile`` over completed requests; ``tbt_s`` nearest-rank percentiles over every
gap of every request; a request meets the SLO when TTFT <= ``ttft_slo_s`` and its own nearest-rank P95 TBT <=
``tbt_slo_s`` (no gaps: met); ``slo_attainment`` is over all requests, rejected and unfinished ones missing.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from deflectlab.envs.metrics import PERCENTILES, percentiles
from deflectlab.envs.workloads import Workload

#: Token ids of replayed prompts cycle through this range (any id a real vocabulary has).
_TOKEN_ID_BASE = 1000
_TOKEN_ID_SPAN = 20000


def prompt_token_ids(rid: int, n: int) -> list[int]:
    """The deterministic prompt of request ``rid``: ``n`` token ids (distinct per request, so no prefix caching
    on a real vLLM shortens it)."""
    start = (rid * 7919) % _TOKEN_ID_SPAN
    return [_TOKEN_ID_BASE + (start + i) % _TOKEN_ID_SPAN for i in range(n)]


def _nearest_rank(sorted_x: np.ndarray, q: float) -> float:
    n = len(sorted_x)
    return float(sorted_x[max(math.ceil(q * n - 1e-9), 1) - 1])


@dataclass
class RequestRecord:
    """What the client saw of one request; times in model seconds (wall / time_scale)."""

    rid: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    status: str = "unfinished"  # completed | rejected | unfinished
    reason: str = ""
    http_status: int = 0
    send_s: float = math.nan
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tokens: int = 0
    usage_completion_tokens: int = -1
    gaps: list[float] = field(default_factory=list)


@dataclass
class ReplayResult:
    records: list[RequestRecord]
    summary: dict[str, Any]

    def save(self, out_dir: str | Path, plots: bool = True) -> Path:
        """Write ``requests.csv``, ``summary.json`` and (``plots``) ``ttft_cdf.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "requests.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rid", "arrival_s", "input_tokens", "output_tokens", "status", "reason", "http_status",
                        "ttft_s", "e2e_s", "tokens_received", "tbt_mean_s", "tbt_p95_s", "tbt_max_s", "slo_met"])
            s = self.summary["slo"]
            for r in self.records:
                g = np.sort(np.asarray(r.gaps, float))
                w.writerow([r.rid, f"{r.arrival_s:.6f}", r.input_tokens, r.output_tokens, r.status, r.reason,
                            r.http_status, _f(r.ttft_s), _f(r.e2e_s), r.tokens,
                            _f(float(g.mean()) if len(g) else math.nan),
                            _f(_nearest_rank(g, 0.95) if len(g) else math.nan),
                            _f(float(g[-1]) if len(g) else math.nan),
                            int(_slo_met(r, s["ttft_slo_s"], s["tbt_slo_s"]))])
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=float))
        if plots:
            from deflectlab.experiments.plots import plot_ttft_cdf

            ttft = np.array([r.ttft_s for r in self.records if r.status == "completed"], float)
            plot_ttft_cdf({self.summary.get("label") or "replay": ttft}, out / "ttft_cdf.png",
                          title="TTFT CDF (client side)", slo_s=self.summary["slo"]["ttft_slo_s"])
        return out


def _f(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6g}"


def _slo_met(r: RequestRecord, ttft_slo_s: float, tbt_slo_s: float) -> bool:
    if r.status != "completed" or not r.ttft_s <= ttft_slo_s:
        return False
    if not r.gaps:
        return True
    within = sum(1 for g in r.gaps if g <= tbt_slo_s)
    return within >= math.ceil(0.95 * len(r.gaps) - 1e-9)


def summarize(records: list[RequestRecord], ttft_slo_s: float, tbt_slo_s: float, **extra: Any) -> dict[str, Any]:
    """The run summary, with the simulator's keys and conventions (see the module docstring)."""
    n = len(records)
    done = [r for r in records if r.status == "completed"]
    rejected = [r for r in records if r.status == "rejected"]
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    ttft = np.array([r.ttft_s for r in done], float)
    e2e = np.array([r.e2e_s for r in done], float)
    all_gaps = np.sort(np.concatenate([np.asarray(r.gaps, float) for r in done] or [np.zeros(0)]))
    if len(all_gaps):
        tbt = {f"p{p}": _nearest_rank(all_gaps, p / 100) for p in PERCENTILES} | {"mean": float(all_gaps.mean())}
    else:
        tbt = {f"p{p}": math.nan for p in PERCENTILES} | {"mean": math.nan}
    per_req_p95 = np.array([_nearest_rank(np.sort(np.asarray(r.gaps, float)), 0.95) for r in done if r.gaps])
    ttft_ok = sum(1 for r in done if r.ttft_s <= ttft_slo_s)
    tbt_ok = sum(1 for r in done if _slo_met(r, math.inf, tbt_slo_s))
    slo_ok = sum(1 for r in done if _slo_met(r, ttft_slo_s, tbt_slo_s))
    arrivals = np.array([r.arrival_s for r in records], float)
    ends = [r.arrival_s + r.e2e_s for r in done]
    t0 = float(arrivals.min()) if n else 0.0
    t_end = max(ends) if ends else (float(arrivals.max()) if n else 0.0)
    makespan = max(t_end - t0, 1e-9)
    mismatched = sum(1 for r in done if r.tokens != r.output_tokens)
    return {
        **extra,
        "requests": n,
        "completed": len(done),
        "rejected": len(rejected),
        "unfinished": n - len(done) - len(rejected),
        "rejected_reasons": reasons,
        "duration_s": makespan,
        "offered_rate_rps": n / max(float(arrivals.max() - t0), 1e-9) if n > 1 else 0.0,
        "ttft_s": percentiles(ttft),
        "tbt_s": tbt,
        "tbt_p95_per_request_s": percentiles(per_req_p95),
        "e2e_s": percentiles(e2e),
        "slo": {"ttft_slo_s": ttft_slo_s, "tbt_slo_s": tbt_slo_s},
        "slo_attainment": slo_ok / n if n else math.nan,
        "ttft_slo_attainment": ttft_ok / n if n else math.nan,
        "tbt_slo_attainment": tbt_ok / n if n else math.nan,
        "goodput_rps": slo_ok / makespan,
        "throughput_rps": len(done) / makespan,
        "output_token_mismatches": mismatched,
    }


class _TokenClock:
    """Turns the arrival times of SSE chunks into per-token samples, as the simulator counts them.

    A chunk carrying ``k`` text tokens that arrives ``G`` seconds after the previous one counts as ``k`` gaps of
    ``G / k``: its tokens were made in ``k`` steps over that time, and reached the client together only because
    the sender or the client batched them (an emulator at a small time scale runs steps faster than the event
    loop wakes; a busy client reads late). Tokens that came with the first one are carried into the next
    chunk's split. With one token per chunk (vLLM's default stream) this is exactly the client-side gap.
    """

    __slots__ = ("r", "scale", "t_send", "last", "carried")

    def __init__(self, r: RequestRecord, scale: float, t_send: float) -> None:
        self.r = r
        self.scale = scale
        self.t_send = t_send
        self.last = 0.0
        self.carried = 0

    def tokens(self, k: int, now: float) -> None:
        if k <= 0:
            return
        r = self.r
        if r.tokens == 0:
            r.ttft_s = (now - self.t_send) / self.scale
            self.carried = k - 1
        else:
            n = k + self.carried
            gap = (now - self.last) / self.scale / n
            r.gaps.extend([gap] * n)
            self.carried = 0
        r.tokens += k
        self.last = now


def _event_tokens(payload: bytes, r: RequestRecord) -> int | None:
    """Text tokens in one SSE event (None: the event ends the request as rejected)."""
    try:
        ev = json.loads(payload)
    except ValueError:
        r.status, r.reason = "rejected", "malformed SSE event"
        return None
    if "error" in ev:
        r.status, r.reason = "rejected", f"stream error {ev['error'].get('code', '')}".strip()
        return None
    if ev.get("usage"):
        r.usage_completion_tokens = int(ev["usage"].get("completion_tokens", -1))
    k = 0
    for ch in ev.get("choices") or ():
        text = ch.get("text")
        if text is None:
            text = (ch.get("delta") or {}).get("content")
        k += bool(text)
    return k


async def _read_stream(resp: aiohttp.ClientResponse, r: RequestRecord, clock: _TokenClock) -> bool:
    """Read the SSE body into ``r``; True when it ended with ``[DONE]``."""
    buf = b""
    finished = False
    async for chunk in resp.content.iter_any():
        now = time.perf_counter()
        buf += chunk
        *events, buf = buf.split(b"\n\n")
        k = 0
        for ev in events:
            ev = ev.strip()
            if not ev.startswith(b"data:"):
                continue
            payload = ev[5:].strip()
            if payload == b"[DONE]":
                finished = True  # read on to the end of the body so the connection is reused
                continue
            n = _event_tokens(payload, r)
            if n is None:
                clock.tokens(k, now)
                return False
            k += n
        clock.tokens(k, now)
    return finished


async def _one(session: aiohttp.ClientSession, url: str, model: str | None, r: RequestRecord, scale: float,
               t0: float) -> None:
    body: dict[str, Any] = {"prompt": prompt_token_ids(r.rid, r.input_tokens), "max_tokens": r.output_tokens,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t_send = time.perf_counter()
    r.send_s = (t_send - t0) / scale
    try:
        async with session.post(url, json=body) as resp:
            r.http_status = resp.status
            if resp.status != 200:
                r.status, r.reason = "rejected", f"http {resp.status}"
                await resp.read()
                return
            finished = await _read_stream(resp, r, _TokenClock(r, scale, t_send))
            if r.status == "rejected":
                return
            if not finished:
                r.status, r.reason = "rejected", "stream ended without [DONE]"
                return
            r.e2e_s = (time.perf_counter() - t_send) / scale
            r.status = "completed"
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        r.status, r.reason = "rejected", f"connection: {type(e).__name__}"


async def replay_async(url: str, workload: Workload, *, time_scale: float = 1.0, model: str | None = None,
                       ttft_slo_s: float = 1.0, tbt_slo_s: float = 0.1, drain_timeout_s: float = 60.0,
                       label: str = "", progress: bool = False) -> ReplayResult:
    """Replay ``workload`` against ``url`` (``http://host:port``; ``/v1/completions`` is appended).

    :param time_scale: wall seconds per model second (the emulators'; 1 for vLLM).
    :param model: ``model`` field of every request (None: omitted).
    :param drain_timeout_s: wall seconds to wait for outstanding requests after the last is sent.
    :param label: name of the run in the summary and plots.
    """
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
    endpoint = url.rstrip("/") + "/v1/completions"
    records = [RequestRecord(i, float(a), int(li), int(lo)) for i, (a, li, lo) in
               enumerate(zip(workload.arrival_s, workload.input_tokens, workload.output_tokens))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="req", desc="replay", leave=False)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        tasks = []
        for r in records:
            delay = t0 + (r.arrival_s - records[0].arrival_s) * time_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t = loop.create_task(_one(session, endpoint, model, r, time_scale, t0))
            if bar is not None:
                t.add_done_callback(lambda _: bar.update(1))
            tasks.append(t)
        done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    if bar is not None:
        bar.close()
    for r in records:
        if r.status == "unfinished":
            r.reason = "unfinished"
    extra = {"label": label, "url": url, "time_scale": time_scale,
             "workload": dict(getattr(workload, "meta", {}) or {})}
    return ReplayResult(records, summarize(records, ttft_slo_s, tbt_slo_s, **extra))


def replay(url: str, workload: Workload, **kw: Any) -> ReplayResult:
    """Blocking :func:`replay_async`."""
    return asyncio.run(replay_async(url, workload, **kw))
