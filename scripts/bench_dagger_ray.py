"""Benchmark DAgger's labelling: one process against Ray tasks; prints numbers (nothing is asserted).

    python scripts/bench_dagger_ray.py                      # 2x2, azure_code, 2 iterations x 4 episodes, 150 decisions
    python scripts/bench_dagger_ray.py --cpus 2 --episodes 4 --max-decisions 150 --repeats 1

Runs the same small DAgger configuration twice, first with the episodes one after another in this process,
then with each iteration's episodes as Ray tasks on a local Ray of ``--cpus`` CPUs (Ray's start-up is timed
apart and is not in the labelling time). Prints, per iteration and in total, the labelling wall time and the
labelled states per second of each, the speed-up, the driver's CPU seconds (``time.process_time``; with Ray the
work is in the workers, so this is the driver's own overhead), whether both runs built the same data set and
the same network, and the load average before and after (the machine may be shared: wall times move with it).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("WANDB_MODE", "offline")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (its parallel tasks)")
    ap.add_argument("--shapes", default="2x2")
    ap.add_argument("--traces", default="azure_code")
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=4, help="episodes per iteration")
    ap.add_argument("--max-decisions", type=int, default=150)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch

    from deflectlab.agents.dagger import DaggerConfig, RayLabeller, train_dagger
    from deflectlab.scripts.cmd_dagger import parse_shapes

    torch.set_num_threads(1)
    cfg = DaggerConfig(shapes=parse_shapes(a.shapes), traces=a.traces.split(","), iterations=a.iterations,
                       episodes_per_iteration=a.episodes, max_decisions=a.max_decisions, window_s=a.window,
                       window_start_s=(0.0, 1200.0 - a.window), epochs=a.epochs, seed=a.seed)
    load0 = os.getloadavg()
    c0 = time.process_time()
    net_s, log_s = train_dagger(cfg)
    seq_cpu = time.process_time() - c0
    t0 = time.perf_counter()
    lab = RayLabeller(num_cpus=a.cpus)
    start_s = time.perf_counter() - t0
    try:
        c0 = time.process_time()
        net_r, log_r = train_dagger(cfg, labeller=lab)
        ray_cpu = time.process_time() - c0
    finally:
        lab.close()
    load1 = os.getloadavg()
    same_net = all(torch.equal(v, net_r.state_dict()[k]) for k, v in net_s.state_dict().items())
    same_eps = [i["episodes"] for i in log_s["iterations"]] == [i["episodes"] for i in log_r["iterations"]]
    for name, log in (("sequential", log_s), (f"ray ({a.cpus} CPUs)", log_r)):
        for it in log["iterations"]:
            print(f"{name:16s} iteration {it['iteration']}: {it['labelled']:5d} states labelled in "
                  f"{it['label_wall_s']:6.1f} s wall ({it['labelled_per_s']:6.1f} states/s); "
                  f"fit {it['fit_wall_s']:.1f} s")
    lab_s = sum(i["label_wall_s"] for i in log_s["iterations"])
    lab_r = sum(i["label_wall_s"] for i in log_r["iterations"])
    n = sum(i["labelled"] for i in log_s["iterations"])
    print(json.dumps({"config": {"shapes": a.shapes, "traces": a.traces, "iterations": a.iterations,
                                 "episodes": a.episodes, "max_decisions": a.max_decisions, "cpus": a.cpus},
                      "states_labelled": n, "sequential_label_wall_s": round(lab_s, 2),
                      "ray_label_wall_s": round(lab_r, 2), "sequential_states_per_s": round(n / lab_s, 1),
                      "ray_states_per_s": round(n / lab_r, 1), "labelling_speedup": round(lab_s / lab_r, 2),
                      "sequential_run_wall_s": round(log_s["wall_s"], 1), "ray_run_wall_s": round(log_r["wall_s"], 1),
                      "ray_start_s": round(start_s, 1), "sequential_driver_cpu_s": round(seq_cpu, 1),
                      "ray_driver_cpu_s": round(ray_cpu, 1), "same_episodes": same_eps, "same_network": same_net,
                      "load_average_before": [round(x, 2) for x in load0],
                      "load_average_after": [round(x, 2) for x in load1]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
