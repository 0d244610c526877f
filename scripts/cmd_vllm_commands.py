"""``deflectlab vllm-commands``: print the shell commands that start an xPyD vLLM cluster with the
NixlConnector (prefill: ``kv_producer``; decode: ``kv_both``, so it can also prefill deflected requests) on one
host, and this router in front of it. See docs/serving.md."""

from __future__ import annotations

import argparse
import json
import math
import shlex

from deflectlab.envs.config import ClusterConfig, parse_shape


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    d = ClusterConfig()
    p = sub.add_parser("vllm-commands", help=help_text,
                       description=__doc__)
    p.add_argument("--shape", default="2p2d", help="cluster shape <x>p<y>d")
    p.add_argument("--model", default="deepseek-ai/DeepSeek-V2-Lite", help="Hugging Face model id")
    p.add_argument("--base-port", type=int, default=8100,
                   help="HTTP port of prefill instance 0; prefill i gets base+i, decode j base+100+j")
    p.add_argument("--router-port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1",
                   help="address the instances are reached at (and the router binds, unless --router-host)")
    p.add_argument("--router-host", default=None)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per instance")
    p.add_argument("--side-channel-port", type=int, default=5600,
                   help="VLLM_NIXL_SIDE_CHANNEL_PORT of instance 0; each instance gets its own range of --tp")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--prefill-max-batched-tokens", type=int, default=d.prefill_max_batched_tokens)
    p.add_argument("--decode-max-batched-tokens", type=int, default=d.decode_max_batched_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--policy", default="proactive", help="router policy spec or exported policy file")
    p.add_argument("--profile", default=d.prefill_profile, help="latency profile the router's policy uses")
    p.add_argument("--ucx-tls", default="all", help="UCX_TLS (e.g. rc,cuda_copy,cuda_ipc)")
    p.add_argument("--ucx-net-devices", default="all", help="UCX_NET_DEVICES (e.g. mlx5_0:1)")
    p.add_argument("--extra-vllm-args", default="", help="appended to every vllm serve line")
    p.add_argument("--health-timeout", type=float, default=900.0, metavar="SECONDS",
                   help="seconds the script waits for every instance's /health before it gives up (default 900: "
                        "time to download and load the model)")
    p.set_defaults(func=run)


def vllm_commands(a: argparse.Namespace) -> str:
    """The whole script as text."""
    n_p, n_d = parse_shape(a.shape)
    if a.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {a.tp}")
    if not (math.isfinite(a.health_timeout) and a.health_timeout >= 0):
        raise ValueError(f"--health-timeout must be >= 0 seconds, got {a.health_timeout:g}")
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# deflectlab: {n_p}P{n_d}D disaggregated vLLM with the NixlConnector on one host, "
        f"{a.tp} GPU(s) per instance ({(n_p + n_d) * a.tp} GPUs).",
        "# Needs vLLM with NIXL (pip install vllm nixl). Logs go to ./vllm-<role>-<i>.log.",
        "set -euo pipefail",
        f"export UCX_TLS={q(a.ucx_tls)}          # UCX transports NIXL may use",
        f"export UCX_NET_DEVICES={q(a.ucx_net_devices)}  # RDMA NICs for the KV transfer",
        "",
    ]
    p_ports = [a.base_port + i for i in range(n_p)]
    d_ports = [a.base_port + 100 + j for j in range(n_d)]
    extra = f" {a.extra_vllm_args}" if a.extra_vllm_args else ""
    inst = 0
    for role, ports in (("prefill", p_ports), ("decode", d_ports)):
        kv_role = "kv_producer" if role == "prefill" else "kv_both"
        cfg = json.dumps({"kv_connector": "NixlConnector", "kv_role": kv_role}, separators=(",", ":"))
        budget = a.prefill_max_batched_tokens if role == "prefill" else a.decode_max_batched_tokens
        for i, port in enumerate(ports):
            gpus = ",".join(str(inst * a.tp + k) for k in range(a.tp))
            side = a.side_channel_port + inst * a.tp
            lines.append(f"# {role} instance {i}")
            lines.append(
                f"CUDA_VISIBLE_DEVICES={gpus} VLLM_NIXL_SIDE_CHANNEL_HOST={q(a.host)} "
                f"VLLM_NIXL_SIDE_CHANNEL_PORT={side} \\\n  vllm serve {q(a.model)} --host {q(a.host)} --port {port} "
                f"--tensor-parallel-size {a.tp} \\\n  --kv-transfer-config '{cfg}' \\\n"
                f"  --max-num-batched-tokens {budget} --max-num-seqs {a.max_num_seqs} "
                f"--gpu-memory-utilization {a.gpu_memory_utilization}{extra} \\\n"
                f"  > vllm-{role}-{i}.log 2>&1 &")
            inst += 1
    all_ports = " ".join(map(str, p_ports + d_ports))
    lines += [
        "",
        f"# wait until every instance answers /health; give up after {a.health_timeout:g} s (a model download, an",
        "# out-of-memory or a bad flag shows in vllm-*.log), and start the router only when all are up",
        "wait_healthy() {",
        f"  local deadline=$((SECONDS + {math.ceil(a.health_timeout)}))",
        f"  for port in {all_ports}; do",
        f"    until curl -sf --max-time 5 http://{a.host}:$port/health > /dev/null; do",
        '      if [ "$SECONDS" -ge "$deadline" ]; then',
        f'        echo "no /health answer on port $port after {a.health_timeout:g} s; see vllm-*.log" >&2; return 1',
        "      fi",
        "      sleep 5",
        "    done",
        "  done",
        "}",
        "",
        "# the deflection router (a drop-in for vLLM's disaggregated proxy) on the front port",
        f"wait_healthy && deflectlab route --host {q(a.router_host or a.host)} --port {a.router_port} \\\n"
        f"  --prefiller-hosts {q(a.host)} --prefiller-ports {' '.join(map(str, p_ports))} \\\n"
        f"  --decoder-hosts {q(a.host)} --decoder-ports {' '.join(map(str, d_ports))} \\\n"
        f"  --policy {q(a.policy)} --profile {q(a.profile)} \\\n"
        f"  --prefill-max-batched-tokens {a.prefill_max_batched_tokens} "
        f"--decode-max-batched-tokens {a.decode_max_batched_tokens} --max-num-seqs {a.max_num_seqs}",
    ]
    return "\n".join(lines) + "\n"


def run(a: argparse.Namespace) -> int:
    print(vllm_commands(a), end="")
    return 0
