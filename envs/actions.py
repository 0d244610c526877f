"""Action spaces of the deflection environment over the observation of ``envs.features`` (either schema).

``nodes`` (the default) is ``Discrete(P + D)``: prefill on prefill node ``i`` or deflect to decode node ``j``.
With symmetric nodes most of those actions are equivalent (two idle prefill nodes), and a learner has to find
that out for itself. ``two_way`` is ``Discrete(2)``: 0 = prefill, 1 = deflect, with the node picked by the
lowest estimated TTFT (the observation's ``est_ttft`` of each node, ``path_ttft`` in schema 3: the proactive
deflector's per-path estimate, squashed), so the agent learns only *whether* to deflect. The deflect action is
valid when some decode node is (KV room for the prompt); ties go to the lowest index.
"""

from __future__ import annotations

import numpy as np

from deflectlab.envs.features import schema

ACTION_SPACES = ("nodes", "two_way")


def est_ttft_columns(num_prefill: int, num_decode: int, feature_schema: int = 1) -> tuple[list[int], list[int]]:
    """Observation columns of each prefill node's and each decode node's TTFT estimate (squashed, 0.5 = one TTFT
    SLO; 1 = deflection infeasible) under feature schema ``feature_schema``: ``est_ttft`` in schemas 1 and 2,
    ``path_ttft`` (the proactive deflector's own estimate, whose chunk caps schema 3 deflects with) in schema 3."""
    names = schema(feature_schema).names(num_prefill, num_decode)
    key = "path_ttft" if feature_schema >= 3 else "est_ttft"
    return ([names.index(f"prefill[{i}].{key}") for i in range(num_prefill)],
            [names.index(f"decode[{j}].{key}") for j in range(num_decode)])


class TwoWay:
    """Maps ``Discrete(2)`` (0 prefill, 1 deflect) to a node action of ``Discrete(P + D)``.

    :param num_prefill: prefill nodes ``P``.
    :param num_decode: decode nodes ``D``.
    :param feature_schema: the observation's feature schema version.
    """

    def __init__(self, num_prefill: int, num_decode: int, feature_schema: int = 1) -> None:
        if num_prefill < 1:
            raise ValueError(f"the two_way action space needs at least one prefill node, got {num_prefill}")
        self.num_prefill, self.num_decode = num_prefill, num_decode
        self.p_cols, self.d_cols = est_ttft_columns(num_prefill, num_decode, feature_schema)

    def mask(self, node_mask: np.ndarray) -> np.ndarray:
        """``[prefill valid, deflect valid]``: prefill always, deflect when some decode node is valid."""
        return np.array([True, bool(np.any(node_mask[self.num_prefill:]))], dtype=bool)

    def node_action(self, action: int, obs: np.ndarray, node_mask: np.ndarray) -> int:
        """The node action of ``action`` for the request ``obs`` describes (prefill when no decode node is
        valid)."""
        if action not in (0, 1):
            raise ValueError(f"two_way action must be 0 (prefill) or 1 (deflect), got {action!r}")
        P = self.num_prefill
        if action == 1:
            ok = [j for j in range(self.num_decode) if node_mask[P + j]]
            if ok:
                return P + min(ok, key=lambda j: (float(obs[self.d_cols[j]]), j))
        return min(range(P), key=lambda i: (float(obs[self.p_cols[i]]), i))

    def of_node_action(self, node_action: int) -> int:
        """The two-way action of a node action (what an expert's decision means here)."""
        return 0 if node_action < self.num_prefill else 1
