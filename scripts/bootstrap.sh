#!/usr/bin/env bash
# Create .venv and install deflectlab with everything it uses (RL, serving), plus dev tools with --dev.
# Needs only Python >= 3.11 and pip. torch is installed first, pinned to the CPU build this kind of machine
# carries (a bare `torch` from stable-baselines3 would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="all"
[[ "${1:-}" == "--dev" ]] && extras="all,dev"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "deflectlab installed in .venv (extras: ${extras})" >&2
