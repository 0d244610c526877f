"""The router's settings in one place: what belongs to the cluster comes from :class:`envs.config.ClusterConfig`
(profiles, SLOs, step budgets, ``max_num_seqs``, the decode balancer); the rest is the router's own (instances,
policy, time scale, liveness and timeouts).

Every time here is in wall seconds (the emulators' time scale does not stretch timeouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from deflectlab.envs.config import ClusterConfig

#: What the router does when every configured prefill instance is out of rotation.
NO_PREFILL_MODES = ("deflect", "reject")


@dataclass
class RouterConfig:
    """Settings of one router.

    :param prefill: ``(host, port)`` of each prefill instance (may be empty: aggregated serving, everything
        deflected by design).
    :param decode: ``(host, port)`` of each decode instance (at least one).
    :param policy: a registry spec (``proactive:margin=0.1``), an exported policy's path, or a ``Policy``.
    :param cluster: the cluster's settings the policy's view needs (its ``num_prefill``/``num_decode`` are
        ignored: the instance lists count).
    :param time_scale: wall seconds per model second of the instances (1 for vLLM; the emulators' setting).
    :param no_prefill: with every prefill instance out of rotation, ``deflect`` every request to a decode
        instance, or ``reject`` it with 503 (see docs/serving.md for why ``deflect`` is the default).
    :param scrape_interval_s: period of the ``/metrics`` scrape of instances in rotation.
    :param metrics_stale_s: scraped metrics older than this are stale (the view falls back on the router's
        own counters); a failed scrape makes them stale at once.
    :param health_interval_s: period of the ``/health`` probe of instances in rotation.
    :param dead_probe_interval_s: period of the ``/health`` probe of instances out of rotation.
    :param health_timeout_s: a ``/health`` probe slower than this fails.
    :param health_failures: consecutive failed probes (timeouts or non-200) that take an instance out of
        rotation; a refused connection takes it out at once.
    :param connect_timeout_s: TCP connect timeout of every upstream call.
    :param prefill_timeout_s: the whole prefill hop (queueing, prefill, answer) must end within this.
    :param decode_first_byte_timeout_s: the decode hop's first byte of body must arrive within this
        (for a deflected request: its whole prefill).
    :param stream_idle_timeout_s: the longest gap between two chunks of the decode hop's answer.
    :param suspect_hold_s: an instance that timed out stays out of rotation at least this long (doubled per
        consecutive timeout, at most 8 times), then comes back when ``/health`` answers.
    :param max_body_bytes: largest client body accepted (bigger: 413 with a JSON error).
    """

    prefill: list[tuple[str, int]]
    decode: list[tuple[str, int]]
    policy: Any = "round_robin"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    time_scale: float = 1.0
    no_prefill: str = "deflect"
    scrape_interval_s: float = 0.075
    metrics_stale_s: float = 1.0
    health_interval_s: float = 1.0
    dead_probe_interval_s: float = 0.25
    health_timeout_s: float = 2.0
    health_failures: int = 2
    connect_timeout_s: float = 2.0
    prefill_timeout_s: float = 60.0
    decode_first_byte_timeout_s: float = 60.0
    stream_idle_timeout_s: float = 30.0
    suspect_hold_s: float = 2.0
    max_body_bytes: int = 64 * 1024 * 1024

    @classmethod
    def of(cls, prefill: list[tuple[str, int]], decode: list[tuple[str, int]], policy: Any = "round_robin",
           **settings: Any) -> RouterConfig:
        """A config from flat keyword settings: :class:`ClusterConfig`'s field names (``decode_balancer``,
        ``ttft_slo_s``, ...) go to ``cluster``, the rest to the router. An unknown name raises ``TypeError``."""
        names = {f.name for f in fields(ClusterConfig)}
        ck = {k: settings.pop(k) for k in list(settings) if k in names}
        ck.setdefault("num_prefill", len(prefill))
        ck.setdefault("num_decode", max(len(decode), 1))
        return cls(list(prefill), list(decode), policy, ClusterConfig(**ck), **settings)

    def __post_init__(self) -> None:
        if not self.decode:
            raise ValueError("the router needs at least one decode instance")
        if self.no_prefill not in NO_PREFILL_MODES:
            raise ValueError(f"no_prefill must be one of {', '.join(NO_PREFILL_MODES)}, got {self.no_prefill!r}")
        if not isinstance(self.cluster, ClusterConfig):
            raise ValueError(f"cluster must be a ClusterConfig, got {type(self.cluster).__name__}")
        if not 0 < self.scrape_interval_s <= 10:
            raise ValueError(f"scrape_interval_s must be in (0, 10] seconds, got {self.scrape_interval_s!r}")
        for name in ("time_scale", "metrics_stale_s", "health_interval_s", "dead_probe_interval_s",
                     "health_timeout_s", "connect_timeout_s", "prefill_timeout_s", "decode_first_byte_timeout_s",
                     "stream_idle_timeout_s", "suspect_hold_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("health_failures", "max_body_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for role in ("prefill", "decode"):
            for hp in getattr(self, role):
                if not (isinstance(hp, tuple) and len(hp) == 2 and isinstance(hp[1], int) and 0 < hp[1] < 65536):
                    raise ValueError(f"{role} instance {hp!r} must be (host, port) with a port in 1..65535")
