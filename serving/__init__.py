"""Serving: the deflection router (vLLM's P/D proxy protocol plus a policy), the vLLM engine emulator timed by
the cluster model, and the open-loop trace replayer. See docs/serving.md."""
