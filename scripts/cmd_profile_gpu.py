"""``deflectlab profile-gpu``: time a random-weight transformer of a model's shape on this GPU (or CPU).

    deflectlab profile-gpu --shape llama-3-8b --device cuda --out h100_llama-3-8b.csv
    deflectlab calibrate --data h100_llama-3-8b.csv --base h100-80gb_llama-3-8b --name my-h100 \\
        --out my-h100.yaml

Writes the measurement CSV that ``deflectlab calibrate`` fits: prefill steps over chunk sizes (with and
without prior context), decode steps over batch sizes and context lengths, mixed steps, and KV-sized
device -> host -> device copies. What is built and how it is timed: ``envs/gpu_profiler.py`` and
``docs/calibration.md``. Needs PyTorch (the ``rl`` extra).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

SHAPE_NAMES = ("llama-3-8b", "deepseek-v2-lite", "tiny", "tiny-mla-moe")


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "profile-gpu",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", required=True, choices=SHAPE_NAMES, help="model shape to build")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda (bf16) or cpu (fp32)")
    p.add_argument("--out", required=True, type=Path, help="measurement CSV to write")
    p.add_argument("--quick", action="store_true", help="fewer and smaller steps, fewer repeats (smoke run)")
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="layers of each kind built and timed, scaled to the model's layer count (default 4)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row, the median is kept")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before each row")
    p.add_argument("--no-cuda-graph", action="store_true", help="time steps eagerly instead of as CUDA graphs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and activations")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of PyTorch (default: PyTorch's choice; 1 is steadier on a busy machine)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from deflectlab.envs.gpu_profiler import SHAPES, profile
    except ImportError as e:
        raise ValueError(f"profile-gpu needs PyTorch (pip install 'deflectlab[rl]'): {e}") from None
    from deflectlab.envs.calibration import write_measurements

    if args.layers is not None and args.layers < 1:
        raise ValueError("--layers must be >= 1")
    t0 = time.perf_counter()
    rows = profile(
        args.shape,
        device=args.device,
        quick=args.quick,
        timed_layers=args.layers,
        warmup=args.warmup,
        repeats=args.repeats,
        cuda_graph=not args.no_cuda_graph,
        seed=args.seed,
        threads=args.threads,
    )
    out = write_measurements(args.out, rows)
    shape = SHAPES[args.shape]
    elapsed = time.perf_counter() - t0
    print(f"wrote {len(rows)} rows to {out} in {elapsed:.1f} s")
    print(
        f"{args.shape}: KV cache {shape.kv_bytes_per_token(2):,} bytes per token at 16 bits "
        f"(--set kv_bytes_per_token={shape.kv_bytes_per_token(2)} when calibrating without a base profile)"
    )
    return 0
