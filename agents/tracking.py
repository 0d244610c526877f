"""Weights & Biases tracking: offline by default, online only when credentials exist.

Metric namespaces (CleanRL's): ``charts/`` (episode returns, lengths, speed), ``losses/`` (the algorithm's
training losses), ``eval/`` (periodic evaluation on the fixed evaluation seeds, baselines included) and ``slo/``
(SLO metrics of the training episodes). SB3 records into its own logger; :class:`WandbWriter` is one more output
of that logger, and :class:`Namespaced` wraps the CSV and console outputs; both rename SB3's ``train/``,
``rollout/`` and ``time/`` keys into these namespaces, so ``progress.csv`` and W&B get the same names and numbers.

W&B 0.31 still made a network request at exit with only ``mode="offline"``; setting ``WANDB_MODE=offline`` in the
environment does not (docs/design.md), so :func:`resolve_mode` decides and :func:`init_run` sets the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.logger import KVWriter

_RENAME = {"train/": "losses/", "rollout/": "charts/", "time/": "charts/"}


def resolve_mode(mode: str) -> str:
    """``offline``, ``online`` or ``disabled`` for a configured mode (``auto``: online only with WANDB_API_KEY
    set and WANDB_MODE not ``offline``/``disabled``)."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled" or env == "disabled":
        return "disabled"
    if mode == "offline" or env in ("offline", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    return "offline"


def quiet_wandb_env(mode: str) -> None:
    """Set W&B's mode in the environment (see the module docstring) and keep it quiet on the console."""
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")


def namespaced(key: str) -> str:
    for old, new in _RENAME.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


class Namespaced(KVWriter):
    """Wrap another SB3 logger output so it sees the keys renamed into the namespaces above."""

    def __init__(self, inner: KVWriter) -> None:
        self.inner = inner

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        self.inner.write({namespaced(k): v for k, v in key_values.items()},
                         {namespaced(k): v for k, v in key_excluded.items()}, step)

    def close(self) -> None:
        self.inner.close()


class WandbWriter(KVWriter):
    """An SB3 logger output that logs every numeric value to a W&B run, under the namespaces above."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        data = {}
        for k, v in key_values.items():
            excl = key_excluded.get(k)
            if excl is not None and "wandb" in excl:
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                data[namespaced(k)] = float(v)
        if data:
            self.run.log(data, step=int(step))

    def close(self) -> None:
        pass


def init_run(cfg: Any, run_name: str, run_dir: Path) -> Any | None:
    """Start the W&B run of a training run (``None`` when disabled). Files go under ``run_dir/wandb``."""
    wc = cfg.wandb
    if not wc.enabled:
        return None
    mode = resolve_mode(wc.mode)
    if mode == "disabled":
        return None
    quiet_wandb_env(mode)
    os.environ["WANDB_DIR"] = str(run_dir)
    import wandb

    return wandb.init(project=wc.project, entity=wc.entity, group=wc.group, tags=list(wc.tags) or None,
                      name=run_name, dir=str(run_dir), config=cfg.to_dict(), mode=mode,  # type: ignore[arg-type]
                      reinit="finish_previous")


def start_run(name: str, out: Path, config: dict[str, Any]) -> Any | None:
    """A W&B run for a command's ``--wandb`` (DAgger, ES): offline unless WANDB_API_KEY is set (``None`` when
    W&B is disabled by WANDB_MODE); its files go under ``out``."""
    mode = resolve_mode("auto")
    if mode == "disabled":
        return None
    quiet_wandb_env(mode)
    out.mkdir(parents=True, exist_ok=True)
    import wandb

    return wandb.init(project="deflectlab", name=name, dir=str(out), mode=mode, config=config,
                      reinit="finish_previous")


class Progress:
    """A tracker that prints one line per logged step to ``stream`` (stderr by default), for long CLI runs, and
    forwards everything to ``inner`` (a W&B run, or None).

    :param keys: the metrics to print (others are forwarded only); a step with none of them prints nothing.
    """

    def __init__(self, prefix: str, keys: tuple[str, ...], inner: Any = None, stream: Any = None) -> None:
        self.prefix, self.keys, self.inner, self.stream = prefix, keys, inner, stream

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        shown = [f"{k.rpartition('/')[2]}={_fmt(data[k])}" for k in self.keys if k in data]
        if shown:
            import sys

            at = "" if step is None else f" {step}"
            print(f"[{self.prefix}{at}] " + " ".join(shown), file=self.stream or sys.stderr, flush=True)
        if self.inner is not None:
            self.inner.log(data, step=step)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
