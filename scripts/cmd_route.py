"""``deflectlab route``: the deflection router, a drop-in for vLLM's disaggregated-serving proxy."""

from __future__ import annotations

import argparse

from deflectlab.envs.config import ClusterConfig

#: (flag, RouterConfig field, help) of the router's own timing settings, wall seconds.
_TIMING_FLAGS = (
    ("--scrape-interval", "scrape_interval_s", "/metrics scrape period"),
    ("--metrics-stale", "metrics_stale_s", "scraped metrics older than this are stale (view from own counters)"),
    ("--health-interval", "health_interval_s", "/health probe period of instances in rotation"),
    ("--dead-probe-interval", "dead_probe_interval_s", "/health probe period of instances out of rotation"),
    ("--health-timeout", "health_timeout_s", "a slower /health probe fails"),
    ("--connect-timeout", "connect_timeout_s", "TCP connect timeout of every upstream call"),
    ("--prefill-timeout", "prefill_timeout_s", "the whole prefill hop must end within this"),
    ("--decode-first-byte-timeout", "decode_first_byte_timeout_s",
     "the decode hop's first byte must arrive within this (a non-streamed answer: all of it)"),
    ("--stream-idle-timeout", "stream_idle_timeout_s", "longest gap between two chunks of a streamed answer"),
    ("--suspect-hold", "suspect_hold_s", "an instance that timed out stays out at least this long"),
)


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    from deflectlab.serving.router_config import NO_PREFILL_MODES, RouterConfig

    d = ClusterConfig()
    r = RouterConfig([], [("127.0.0.1", 1)])
    p = sub.add_parser("route", help=help_text,
                       description="OpenAI-compatible router speaking vLLM's P/D protocol (NixlConnector "
                                   "kv_transfer_params); a policy picks prefill-then-hand-off or deflection "
                                   "per request. See docs/serving.md.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--prefiller-hosts", "--prefiller-host", nargs="+", default=["127.0.0.1"],
                   help="prefill instance hosts (one host is used for every port)")
    p.add_argument("--prefiller-ports", "--prefiller-port", type=int, nargs="*", default=[8100],
                   help="prefill instance ports (none: aggregated serving, everything deflected)")
    p.add_argument("--decoder-hosts", "--decoder-host", nargs="+", default=["127.0.0.1"])
    p.add_argument("--decoder-ports", "--decoder-port", type=int, nargs="+", default=[8200])
    p.add_argument("--policy", default="round_robin",
                   help="registry spec (round_robin, always_deflect, proactive:margin=0.1, ...) or the path of "
                        "an exported policy (.onnx or its .json manifest)")
    p.add_argument("--no-prefill", choices=NO_PREFILL_MODES, default=r.no_prefill,
                   help="with every prefill instance out of rotation: deflect requests to decode instances "
                        "(default) or reject them with 503")
    p.add_argument("--profile", default=d.prefill_profile, help="latency profile of the prefill instances "
                   "(and of the decode ones unless --decode-profile)")
    p.add_argument("--decode-profile", default=None)
    p.add_argument("--ttft-slo", type=float, default=d.ttft_slo_s, help="TTFT SLO given to the policy, seconds")
    p.add_argument("--tbt-slo", type=float, default=d.tbt_slo_s, help="TBT SLO given to the policy, seconds")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per model second of the instances (1 for vLLM; the emulators' value)")
    for flag, field, text in _TIMING_FLAGS:
        p.add_argument(flag, type=float, default=getattr(r, field), help=f"{text}, wall seconds (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=r.max_body_bytes, help="largest request body accepted")
    p.add_argument("--event-loop", choices=["asyncio", "uvloop", "auto"], default="asyncio",
                   help="the router's event loop (uvloop: pip install uvloop; auto: uvloop when installed)")
    p.add_argument("--decode-balancer", choices=["least_loaded", "round_robin"], default=d.decode_balancer)
    p.add_argument("--prefill-max-batched-tokens", type=int, default=d.prefill_max_batched_tokens)
    p.add_argument("--decode-max-batched-tokens", type=int, default=d.decode_max_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.set_defaults(func=run)


def config_from_args(a: argparse.Namespace) -> RouterConfig:  # noqa: F821 - imported lazily
    from deflectlab.serving.router import pair_instances
    from deflectlab.serving.router_config import RouterConfig

    prefill = pair_instances(a.prefiller_hosts, a.prefiller_ports, "prefiller") if a.prefiller_ports else []
    decode = pair_instances(a.decoder_hosts, a.decoder_ports, "decoder")
    cluster = ClusterConfig(num_prefill=len(prefill), num_decode=len(decode), prefill_profile=a.profile,
                            decode_profile=a.decode_profile or a.profile, ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo,
                            decode_balancer=a.decode_balancer, prefill_max_batched_tokens=a.prefill_max_batched_tokens,
                            decode_max_batched_tokens=a.decode_max_batched_tokens, max_num_seqs=a.max_num_seqs)
    timing = {field: getattr(a, flag[2:].replace("-", "_")) for flag, field, _ in _TIMING_FLAGS}
    return RouterConfig(prefill, decode, a.policy, cluster, time_scale=a.time_scale, no_prefill=a.no_prefill,
                        max_body_bytes=a.max_body_bytes, **timing)


def run(a: argparse.Namespace) -> int:
    from deflectlab.serving.router import Router, serve

    serve(Router(config_from_args(a)), a.host, a.port, a.event_loop)
    return 0
