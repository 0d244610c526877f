"""Which instances are in rotation, and how fresh their metrics are.

Two background loops per instance, so a slow instance never delays the others:

* ``/health`` (vLLM's liveness endpoint: 200 while the engine runs): every ``health_interval_s`` while in
  rotation, every ``dead_probe_interval_s`` while out. A refused connection takes an instance out at once;
  ``health_failures`` consecutive failed probes (non-200 or slower than ``health_timeout_s``) take it out too.
  An instance out of rotation comes back at its first good probe (after its suspect hold, if it timed out).
* ``/metrics`` every ``scrape_interval_s`` while in rotation: a failed or slow scrape marks its metrics stale
  (the view then uses the router's own counters) and never takes the instance out.

The request path reports what it sees: a refused or dropped connection or a 5xx answer takes the instance out
at once (:meth:`Liveness.out`), a timeout makes it suspect (:meth:`Liveness.timed_out`): out for
``suspect_hold_s`` doubled per consecutive timeout (at most 8x), then back at its first good probe.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from deflectlab.serving.load_view import Instance, parse_vllm_metrics
from deflectlab.serving.router_config import RouterConfig
from deflectlab.serving.router_metrics import RouterMetrics


class Liveness:
    """Rotation and metrics freshness of a router's instances.

    :param config: the router's settings (intervals and timeouts).
    :param instances: every configured instance, prefill and decode.
    :param metrics: the router's counters (instance gauges, out-of-rotation and scrape-failure counters).
    """

    def __init__(self, config: RouterConfig, instances: list[Instance], metrics: RouterMetrics) -> None:
        self.cfg = config
        self.instances = instances
        self.m = metrics
        self.session: aiohttp.ClientSession | None = None
        self._wake: dict[int, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        for inst in instances:
            self.m.up.labels(role=inst.role, instance=inst.label).set(1)
            self.m.stale.labels(role=inst.role, instance=inst.label).set(0)

    # -- what the request path reports ---------------------------------------------------------------------
    def out(self, inst: Instance, reason: str, why: str) -> None:
        """Take ``inst`` out of rotation (``reason`` one of ``OUT_REASONS``); its health probe brings it back."""
        if not inst.alive:
            return
        inst.alive = False
        inst.out_since = time.monotonic()
        self._set_stale(inst, True, "left rotation", quiet=True)
        self.m.up.labels(role=inst.role, instance=inst.label).set(0)
        self.m.out_of_rotation.labels(role=inst.role, instance=inst.label, reason=reason).inc()
        self.m.states.set(f"rotation {inst.label}", "out",
                          f"{inst.role} instance {inst.label} out of rotation ({reason}): {why}")
        ev = self._wake.get(id(inst))
        if ev is not None:
            ev.set()

    def timed_out(self, inst: Instance, hop: str, why: str) -> None:
        """A wait on ``inst`` ran out: suspect, out of rotation for a growing hold."""
        inst.timeouts += 1
        hold = self.cfg.suspect_hold_s * 2 ** min(inst.timeouts - 1, 3)
        inst.suspect_until = time.monotonic() + hold
        self.m.timeouts.labels(hop=hop, instance=inst.label).inc()
        self.out(inst, "timeout", f"{why}; suspect for at least {hold:g} s")

    def back(self, inst: Instance) -> None:
        if inst.alive:
            return
        inst.alive = True
        inst.health_failures = 0
        self.m.up.labels(role=inst.role, instance=inst.label).set(1)
        self.m.states.set(f"rotation {inst.label}", "ok", f"{inst.role} instance {inst.label} back in rotation "
                          f"after {time.monotonic() - inst.out_since:.2f} s")

    # -- probes ----------------------------------------------------------------------------------------------
    async def probe(self, inst: Instance) -> tuple[bool, bool, str]:
        """One ``/health`` probe: (ok, connection refused, what failed)."""
        assert self.session is not None
        try:
            async with self.session.get(inst.base_url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)) as r:
                await r.read()
                return r.status == 200, False, f"/health answered HTTP {r.status}"
        except TimeoutError:
            return False, False, f"/health took over {self.cfg.health_timeout_s:g} s"
        except (aiohttp.ClientConnectorError, ConnectionRefusedError):
            return False, True, "connection refused"
        except (aiohttp.ClientError, OSError) as e:
            return False, False, f"/health failed ({type(e).__name__})"

    async def health_loop(self, inst: Instance) -> None:
        ev = self._wake[id(inst)] = asyncio.Event()
        while True:
            ok, refused, why = await self.probe(inst)
            if ok:
                inst.health_failures = 0
                if not inst.alive and time.monotonic() >= inst.suspect_until:
                    self.back(inst)
            else:
                inst.health_failures += 1
                if refused or inst.health_failures >= self.cfg.health_failures:
                    self.out(inst, "health", why)
            ev.clear()
            wait = self.cfg.health_interval_s if inst.alive else self.cfg.dead_probe_interval_s
            try:
                await asyncio.wait_for(ev.wait(), wait)
            except TimeoutError:
                pass

    async def scrape(self, inst: Instance) -> None:
        """One ``/metrics`` scrape: fresh gauges, or stale metrics (never out of rotation)."""
        assert self.session is not None
        try:
            async with self.session.get(inst.base_url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.metrics_stale_s)) as r:
                text = await r.text() if r.status == 200 else None
                status = r.status
            if text is None:
                return self._scrape_failed(inst, "http_status", f"/metrics answered HTTP {status}")
            m = parse_vllm_metrics(text)
        except TimeoutError:
            return self._scrape_failed(inst, "timeout", f"/metrics took over {self.cfg.metrics_stale_s:g} s")
        except (aiohttp.ClientError, OSError) as e:
            return self._scrape_failed(inst, "connection", f"/metrics failed ({type(e).__name__})")
        except ValueError as e:
            return self._scrape_failed(inst, "parse", f"/metrics unreadable ({e})")
        inst.scraped_waiting = m.get("vllm:num_requests_waiting", 0.0)
        inst.scraped_running = m.get("vllm:num_requests_running", 0.0)
        inst.kv_usage = m.get("vllm:kv_cache_usage_perc", 0.0)
        inst.scraped_at = time.monotonic()
        if inst.alive:
            self._set_stale(inst, False, "fresh again")

    def _scrape_failed(self, inst: Instance, reason: str, why: str) -> None:
        self.m.scrape_failures.labels(role=inst.role, instance=inst.label, reason=reason).inc()
        self._set_stale(inst, True, why)

    def _set_stale(self, inst: Instance, stale: bool, why: str, quiet: bool = False) -> None:
        if inst.stale == stale:
            return
        inst.stale = stale
        self.m.stale.labels(role=inst.role, instance=inst.label).set(int(stale))
        if quiet:  # said by the out-of-rotation message
            self.m.states.states[f"metrics {inst.label}"] = "stale"
            return
        msg = (f"{inst.role} instance {inst.label} metrics stale ({why}); its view uses the router's own counters"
               if stale else f"{inst.role} instance {inst.label} metrics fresh again")
        self.m.states.set(f"metrics {inst.label}", "stale" if stale else "ok", msg)

    async def scrape_loop(self, inst: Instance) -> None:
        while True:
            if inst.alive:
                await self.scrape(inst)
                if time.monotonic() - inst.scraped_at > self.cfg.metrics_stale_s and inst.scraped_at >= 0:
                    self._set_stale(inst, True, f"no good scrape for over {self.cfg.metrics_stale_s:g} s")
            await asyncio.sleep(self.cfg.scrape_interval_s)

    # -- life cycle ------------------------------------------------------------------------------------------
    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        loop = asyncio.get_running_loop()
        for inst in self.instances:
            self._tasks.append(loop.create_task(self.health_loop(inst)))
            self._tasks.append(loop.create_task(self.scrape_loop(inst)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"role": i.role, "instance": i.label, "alive": i.alive, "metrics_stale": i.stale,
                 "in_flight": i.inflight if i.role == "prefill" else i.active,
                 "suspect_for_s": max(0.0, round(i.suspect_until - time.monotonic(), 3)),
                 "waiting": i.scraped_waiting, "running": i.scraped_running, "kv_cache_usage_perc": i.kv_usage}
                for i in self.instances]
