"""The README as a newcomer follows it: its Python blocks run as written, and every ``deflectlab ...`` command it
names parses with that command's own parser (nothing is run: ``scripts.cli.build_parser(command)``)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from deflectlab.scripts.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(README) if kind == lang]


def shell_commands(text: str) -> list[list[str]]:
    """Shell lines of a bash block with continuations joined, comments dropped, split at ``&&``/``;``."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in [*words, "&&"]:
            if w not in ("&&", ";", "||"):
                cmd.append(w)
            elif cmd:
                out.append(cmd)
                cmd = []
    return out


def deflectlab_commands() -> list[list[str]]:
    """Every ``deflectlab`` invocation of the README: in bash blocks, and in inline code with arguments."""
    found = [c for b in blocks("bash") for c in shell_commands(b)]
    found += [shlex.split(span) for span in re.findall(r"`(deflectlab [^`]+)`", README)]
    cmds = []
    for words in found:
        if words and Path(words[0]).name == "deflectlab":
            cmds.append(words[1:])
    return cmds


def test_the_readme_names_commands():
    cmds = deflectlab_commands()
    assert len(cmds) >= 10
    assert {c[0] for c in cmds} >= {"main", "simulate", "compare", "train", "evaluate", "sweep", "export",
                                    "vllm-commands"}


@pytest.mark.parametrize("argv", deflectlab_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    command = argv[0]
    assert command in COMMANDS, f"the README names an unknown command: deflectlab {' '.join(argv)}"
    if len(argv) == 1:
        return  # a bare name in prose (`deflectlab main`), which may need arguments to run
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as e:  # argparse printed the error; fail with the command line
        pytest.fail(f"deflectlab {' '.join(argv)}: does not parse (exit {e.code})")
    assert args.command == command and callable(args.func)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.strip().splitlines()[0][:40])
def test_readme_python_blocks_run_as_written(code, tmp_path):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_gymnasium_snippet_masks_through_the_wrappers():
    """What the snippet relies on: gym.make's wrappers hide action_masks, get_wrapper_attr and sb3-contrib reach
    it, and it is the environment's own mask."""
    import gymnasium as gym
    import numpy as np

    import deflectlab.envs  # noqa: F401

    env = gym.make("deflectlab/Deflection-v0")
    env.reset(seed=3)
    assert not hasattr(env, "action_masks")  # the issue: OrderEnforcing does not forward it
    mask = env.get_wrapper_attr("action_masks")()
    np.testing.assert_array_equal(mask, env.unwrapped.action_masks())
    assert mask.dtype == bool and mask.shape == (env.action_space.n,)
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from sb3_contrib.common.maskable.utils import get_action_masks

    np.testing.assert_array_equal(get_action_masks(env), mask)
    assert sb3_contrib is not None


def test_readme_refers_to_nothing_outside_the_repo():
    assert "shared/" not in README and "/work/" not in README
