"""``deflectlab emulate``: run one emulated vLLM instance (prefill, decode or both) for tests and demos."""

from __future__ import annotations

import argparse

from deflectlab.serving.emulator import KV_LOAD_FAILURE_POLICIES, ROLES, EmulatorConfig


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    d = EmulatorConfig()
    p = sub.add_parser("emulate", help=help_text,
                       description="An OpenAI-compatible vLLM stand-in (completions, chat, SSE, /metrics, "
                                   "kv_transfer_params) whose step times come from a latency profile. "
                                   "See docs/serving.md.")
    p.add_argument("--role", choices=ROLES, default=d.role,
                   help="prefill (a kv_producer), decode or both (kv_both: can also prefill deflected requests)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--profile", default=d.profile, help="latency profile, bundled name or YAML path")
    p.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="wall seconds per model second (0.1 runs 10x faster than the modelled GPU)")
    p.add_argument("--model-name", default=d.model_name, help="served model name")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="longest prompt + output, tokens")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="step token budget (default 8192 for prefill, 2048 for decode/both)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="output tokens of a chat request without max_tokens")
    p.add_argument("--kv-hold-timeout", type=float, default=d.kv_hold_timeout_s,
                   help="free a prefilled request's KV after this many model seconds if never pulled")
    p.add_argument("--kv-load-failure-policy", choices=KV_LOAD_FAILURE_POLICIES, default=d.kv_load_failure_policy,
                   help="when the KV read from a vanished prefill instance fails: recompute the prompt here "
                        "(vLLM's default) or fail the request (vLLM kv_transfer_config kv_load_failure_policy)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from prometheus_client import disable_created_metrics

    from deflectlab.serving.emulator import serve

    cfg = EmulatorConfig(role=a.role, profile=a.profile, model_name=a.model_name, time_scale=a.time_scale,
                         max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
                         max_num_seqs=a.max_num_seqs, default_max_tokens=a.default_max_tokens,
                         kv_hold_timeout_s=a.kv_hold_timeout,
                         kv_load_failure_policy=a.kv_load_failure_policy)
    disable_created_metrics()  # as vLLM: no *_created series
    serve(cfg, a.host, a.port)
    return 0
