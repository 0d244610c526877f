"""Gymnasium registration of the deflection environment.

``import envs`` registers ``deflectlab/Deflection-v0``, after which ``gymnasium.make("deflectlab/Deflection-v0",
**kwargs)`` builds :class:`envs.gym_env.DeflectionEnv`; ``gymnasium.make("envs:deflectlab/Deflection-v0")``
imports ``envs`` itself first. Only gymnasium's registry is touched here: the environment module (and the
simulator) load when an environment is made.
"""

from __future__ import annotations

ENV_ID = "deflectlab/Deflection-v0"


def register_envs() -> None:
    """Register ``deflectlab/Deflection-v0`` with gymnasium (idempotent)."""
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point="deflectlab.envs.gym_env:DeflectionEnv")
