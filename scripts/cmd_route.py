"""``deflectlab route``: the deflection router, a drop-in for vLLM's disaggregated-serving proxy."""

from __future__ import annotations

import argparse

from deflectlab.envs.config import ClusterConfig


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    d = ClusterConfig()
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
    p.add_argument("--profile", default=d.prefill_profile, help="latency profile of the prefill instances "
                   "(and of the decode ones unless --decode-profile)")
    p.add_argument("--decode-profile", default=None)
    p.add_argument("--ttft-slo", type=float, default=d.ttft_slo_s, help="TTFT SLO given to the policy, seconds")
    p.add_argument("--tbt-slo", type=float, default=d.tbt_slo_s, help="TBT SLO given to the policy, seconds")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per model second of the instances (1 for vLLM; the emulators' value)")
    p.add_argument("--scrape-interval", type=float, default=0.075, help="/metrics scrape period, seconds")
    p.add_argument("--decode-balancer", choices=["least_loaded", "round_robin"], default=d.decode_balancer)
    p.add_argument("--prefill-max-batched-tokens", type=int, default=d.prefill_max_batched_tokens)
    p.add_argument("--decode-max-batched-tokens", type=int, default=d.decode_max_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from deflectlab.serving.router import Router, pair_instances, serve

    prefill = pair_instances(a.prefiller_hosts, a.prefiller_ports, "prefiller") if a.prefiller_ports else []
    decode = pair_instances(a.decoder_hosts, a.decoder_ports, "decoder")
    router = Router(prefill, decode, a.policy, prefill_profile=a.profile, decode_profile=a.decode_profile,
                    ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo, time_scale=a.time_scale,
                    scrape_interval_s=a.scrape_interval, decode_balancer=a.decode_balancer,
                    prefill_max_batched_tokens=a.prefill_max_batched_tokens,
                    decode_max_batched_tokens=a.decode_max_batched_tokens, max_num_seqs=a.max_num_seqs)
    serve(router, a.host, a.port)
    return 0
