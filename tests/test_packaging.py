"""Packaging: one ``deflectlab`` namespace, a lazy CLI, and optional extras that stay optional."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("envs", "policies", "agents", "serving", "experiments", "scripts")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_installed_package_lives_under_deflectlab():
    st = _pyproject()["tool"]["setuptools"]
    assert st["packages"], "no packages listed"
    assert all(p.startswith("deflectlab.") for p in st["packages"]), st["packages"]
    assert st["package-dir"] == {f"deflectlab.{f}": f for f in FOLDERS}
    assert all(k.startswith("deflectlab.") for k in st["package-data"])
    proj = _pyproject()["project"]
    assert proj["scripts"]["deflectlab"].startswith("deflectlab.")
    assert all(v.startswith("deflectlab.") for v in proj["entry-points"]["gymnasium.envs"].values())


def test_bare_folder_names_are_not_importable_from_an_installed_checkout(tmp_path):
    # Run from a folder that is not the repo root: only the installed names exist there.
    code = f"import importlib.util as u; print([n for n in {FOLDERS!r} if u.find_spec(n) is not None])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _run_blocking(modules: tuple[str, ...], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess where importing any of ``modules`` fails as if it were not installed."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {modules!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None
        sys.meta_path.insert(0, Block())
        from deflectlab.scripts.cli import main
        try:
            rc = main({argv!r})
        except SystemExit as e:  # --help exits inside argparse
            rc = e.code
        print("LOADED", sorted(m for m in sys.modules if m.startswith("deflectlab.scripts.cmd_")))
        sys.exit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)


SERVE = ("aiohttp", "prometheus_client", "onnxruntime")
RL = ("torch", "stable_baselines3", "sb3_contrib", "wandb", "optuna", "ray", "onnx")


def test_help_imports_no_command_module(tmp_path):
    p = _run_blocking((), ["--help"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "simulate" in p.stdout and "route" in p.stdout
    assert "LOADED []" in p.stdout


def test_route_without_the_serve_extra_exits_2_naming_it(tmp_path):
    p = _run_blocking(SERVE, ["route"], tmp_path)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "'serve' extra" in lines[0] and "pip install 'deflectlab[serve]'" in lines[0]


def test_train_without_the_rl_extra_exits_2_naming_it(tmp_path):
    p = _run_blocking(RL, ["train", "--config", str(ROOT / "experiments" / "train_code_maskppo.yaml")], tmp_path)
    assert p.returncode == 2, p.stderr
    assert "'rl' extra" in p.stderr


def test_simulate_runs_with_no_extra_and_imports_only_its_own_command(tmp_path):
    p = _run_blocking(SERVE + RL, ["simulate", "--json", "--duration", "60"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert '"completed"' in p.stdout
    assert "LOADED ['deflectlab.scripts.cmd_simulate']" in p.stdout
