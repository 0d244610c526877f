"""Stable-baselines3 callbacks of a training run (:func:`agents.train.train`): episode SLO metrics, periodic
evaluation on the fixed evaluation seeds, and a progress bar that counts the steps that will actually run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback

from deflectlab.agents.config import TrainConfig


class EpisodeMetrics(BaseCallback):
    """``slo/`` metrics of finished training episodes, from ``info["metrics"]``."""

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            m = info.get("metrics")
            if m:
                rec = self.logger.record_mean
                rec("slo/attainment", m["slo_attainment"])
                rec("slo/ttft_attainment", m["ttft_slo_attainment"])
                rec("slo/tbt_attainment", m["tbt_slo_attainment"])
                rec("slo/ttft_p95_s", m["ttft_s"]["p95"])
                rec("slo/deflection_rate", m["deflection_rate"])
                ep = info.get("episode")
                if ep:
                    rec("charts/episode_return", ep["r"])
                    rec("charts/episode_length", ep["l"])
        return True


class PeriodicEval(BaseCallback):
    """Evaluate the current policy on the evaluation seeds every ``eval.every_steps`` steps; keeps the best
    model, the history (``evaluations.json``) and the wall time spent evaluating (``eval_s``)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_dir = run_dir
        self.history: list[dict[str, Any]] = []
        self.best = -1.0
        self.eval_s = 0.0
        self.next_at = cfg.eval.every_steps if cfg.eval.every_steps > 0 else None

    def _on_step(self) -> bool:
        if self.next_at is not None and self.num_timesteps >= self.next_at:
            self.next_at += self.cfg.eval.every_steps
            self.run_eval()
        return True

    def run_eval(self) -> dict[str, Any]:
        from deflectlab.agents.evaluation import NetPolicy, evaluate
        from deflectlab.agents.policy_io import make_policy_net

        t0 = time.perf_counter()
        net = make_policy_net(self.cfg)  # a snapshot of the current weights, apart from the training copy
        net.load_state_dict(self.model.policy.state_dict())
        pol = NetPolicy(net, feature_schema=self.cfg.env.feature_schema, actions=self.cfg.env.actions)
        rep = evaluate({"learned": pol}, self.cfg.eval_env_kwargs(), self.cfg.eval_seeds()).to_json()
        r = rep["policies"]["learned"]
        slo = r["pooled"]["slo_attainment"]
        if slo > self.best:
            self.best = slo
            self.model.save(self.run_dir / "best_model.zip")
        row = {"timesteps": self.num_timesteps, **dict(r["pooled"]), **{f"mean_{k}": v for k, v in r["mean"].items()}}
        self.history.append(row)
        (self.run_dir / "evaluations.json").write_text(json.dumps(self.history, indent=2))
        self._log(r, slo)
        self.eval_s += time.perf_counter() - t0
        return rep

    def _log(self, r: dict[str, Any], slo: float) -> None:
        lg = self.logger
        lg.record("eval/slo_attainment", slo)
        lg.record("eval/ttft_p95_s", r["pooled"]["ttft_p95_s"])
        lg.record("eval/ttft_p50_s", r["pooled"]["ttft_p50_s"])
        lg.record("eval/ttft_slo_attainment", r["mean"]["ttft_slo_attainment"])
        lg.record("eval/tbt_slo_attainment", r["mean"]["tbt_slo_attainment"])
        lg.record("eval/deflection_rate", r["mean"]["deflection_rate"])
        lg.record("eval/best_slo_attainment", self.best)
        lg.dump(self.num_timesteps)


class Progress(BaseCallback):
    """A tqdm bar on stderr over the steps that will run (``total``: see :func:`agents.train.planned_timesteps`)."""

    def __init__(self, total: int, desc: str) -> None:
        super().__init__()
        self.total, self.desc = total, desc

    def _on_training_start(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="step", desc=self.desc, file=sys.stderr)

    def _on_step(self) -> bool:
        self.bar.update(self.num_timesteps - self.bar.n)
        return True

    def _on_training_end(self) -> None:
        self.bar.close()
