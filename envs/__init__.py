"""The cluster model, workloads, metrics and the Gymnasium environment (``deflectlab/Deflection-v0``)."""

from deflectlab.envs.registration import register_envs

register_envs()
