"""Gymnasium registration of the deflection environment.

``import deflectlab.envs`` registers ``deflectlab/Deflection-v0`` (so does gymnasium's ``gymnasium.envs`` entry
point), after which ``gymnasium.make("deflectlab/Deflection-v0", **kwargs)`` builds
:class:`deflectlab.envs.gym_env.DeflectionEnv`; ``gymnasium.make("deflectlab.envs:deflectlab/Deflection-v0")``
imports the package itself first. Only gymnasium's registry is touched here: the environment module (and the
simulator) load when an environment is made.

``gymnasium.make`` wraps the environment (``OrderEnforcing``, ``PassiveEnvChecker``), and Gymnasium 1.x wrappers
do not forward attributes: reach the action mask with ``env.get_wrapper_attr("action_masks")()``, which is also
what sb3-contrib's ``get_action_masks(env)`` calls, or through ``env.unwrapped``. The wrappers are kept: they
check the API at every step.
"""

from __future__ import annotations

ENV_ID = "deflectlab/Deflection-v0"


def register_envs() -> None:
    """Register ``deflectlab/Deflection-v0`` with gymnasium (idempotent)."""
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point="deflectlab.envs.gym_env:DeflectionEnv")
