"""One simulation from a typed spec: workload + cluster + policy -> RunResult. The CLI and the main job use it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deflectlab.envs.config import ClusterConfig, ConfigError, cli_field, from_mapping, read_yaml
from deflectlab.envs.metrics import RunResult
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import ARRIVALS, make_workload
from deflectlab.policies.registry import make_policy


@dataclass(frozen=True)
class WorkloadSpec:
    """Which requests to replay; a pure function of these fields (see :func:`envs.workloads.make_workload`).
    Each field's meaning and unit are in its ``cli_field`` (also the command-line flags' help)."""

    trace: str = cli_field("azure_code", "bundled trace (azure_code, azure_conv) or a trace file path")
    rate: float | None = cli_field(None, "target mean arrival rate; unset: as recorded", unit="requests/s")
    start_s: float = cli_field(0.0, "window start in the trace", unit="seconds", aliases=("--start",))
    duration_s: float | None = cli_field(None, "window length; unset: to the end (flag: --window)", unit="seconds",
                                         flag=None)
    num_requests: int | None = cli_field(None, "at most this many requests of the window; unset: all", unit="requests")
    arrival: str = cli_field("trace", "recorded arrival times (rescaled to the rate) or a synthetic process",
                             choices=ARRIVALS)
    cv: float = cli_field(1.0, "coefficient of variation of gamma inter-arrival gaps")
    seed: int = cli_field(0, "workload seed (synthetic arrivals, length sampling)")

    def build(self):
        return make_workload(self.trace, start_s=self.start_s, duration_s=self.duration_s,
                             num_requests=self.num_requests, rate=self.rate, arrival=self.arrival, cv=self.cv,
                             seed=self.seed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadSpec:
        return from_mapping(cls, d, "workload")


@dataclass(frozen=True)
class SimulationSpec:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policy: str = "round_robin"

    def to_dict(self) -> dict[str, Any]:
        return {"workload": asdict(self.workload), "cluster": self.cluster.to_dict(), "policy": self.policy}

    @classmethod
    def from_dict(cls, d: Any, origin: str = "config") -> SimulationSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"{origin}: expected a mapping with workload, cluster, policy")
        extra = set(d) - {"workload", "cluster", "policy"}
        if extra:
            raise ConfigError(f"{origin}: unknown key(s) {sorted(extra)}; known: cluster, policy, workload")
        try:
            return cls(workload=WorkloadSpec.from_dict(d.get("workload") or {}),
                       cluster=ClusterConfig.from_dict(d.get("cluster") or {}),
                       policy=str(d.get("policy", "round_robin")))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{origin}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationSpec:
        return cls.from_dict(read_yaml(path, "config file"), origin=str(path))


def run_simulation(spec: SimulationSpec, progress: bool = False, workload=None) -> RunResult:
    """Build the workload (unless given), the cluster and the policy, and replay."""
    wl = workload if workload is not None else spec.workload.build()
    sim = ClusterSim(spec.cluster, wl)
    result = sim.run(make_policy(spec.policy), progress=progress)
    result.summary["policy"] = spec.policy
    result.config = {**spec.to_dict(), "workload_meta": dict(wl.meta)}
    return result
