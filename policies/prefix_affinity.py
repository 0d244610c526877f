"""Cache affinity against load, with deflection: a router in the spirit of llm-d's inference scheduler.

Source: llm-d's endpoint picker (llm-d.ai, "Request Scheduler": filter, score, pick) scores every candidate with
a weighted sum of scorers; its default profile weighs the prefix-cache scorer 3 and the queue scorer 2 (Red Hat
OpenShift AI documentation of llm-d's scheduler configuration). The prefix-cache scorer is the share of the
prompt's blocks the endpoint holds; the queue scorer maps the endpoints' queue depths linearly onto ``[0, 1]``,
1 for the shortest. For P/D, llm-d's profile handler runs the prefill stage only when the prompt's uncached part
is long enough (its ``threshold`` on non-cached tokens); otherwise the decode endpoint prefills locally, which in
this project's terms is a deflection.

Here, for a prompt of ``L`` tokens and each node's ``cached_tokens`` (the view's expected hit):

* the decode node ``d*`` maximises ``prefix_weight x cached_d / L + queue_weight x queue_score(load_d)`` over
  nodes with KV room for the prompt (load: :func:`envs.view.decode_load`, requests on or bound for the node);
* if ``L - cached_{d*} < pd_threshold`` (or there are no prefill nodes) the request is deflected to ``d*``, its
  prefill chunks capped at ``chunk`` tokens per step;
* otherwise the prefill node ``p*`` maximises the same score with ``waiting_tokens`` as its queue, and the
  request goes ``p* -> d*`` (the hand-off then moves only what ``d*`` lacks).

Without prefix caching every ``cached`` is 0 and this is load balancing with deflection of short prompts.
"""

from __future__ import annotations

from typing import Any

from deflectlab.envs.config import check_number
from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike, decode_load


def queue_scores(loads: list[float]) -> list[float]:
    """llm-d's queue scorer: ``(max - q) / (max - min)``, 1 for the shortest queue; all 1 when they are equal."""
    lo, hi = min(loads), max(loads)
    if hi <= lo:
        return [1.0] * len(loads)
    return [(hi - q) / (hi - lo) for q in loads]


class PrefixAffinity(Policy):
    """Weighted prefix-cache and queue scores, deflecting prompts whose uncached part is short (module docstring).

    :param prefix_weight: weight of the cached share of the prompt (llm-d default profile: 3).
    :param queue_weight: weight of the queue score (llm-d default profile: 2).
    :param pd_threshold: deflect when the chosen decode node leaves fewer uncached tokens than this, tokens.
    :param chunk: chunk cap of a deflected prefill, tokens (``None``: the decode node's token budget).
    """

    name = "prefix_affinity"
    needs_prefill_nodes = False

    def __init__(self, prefix_weight: float = 3.0, queue_weight: float = 2.0, pd_threshold: int = 2048,
                 chunk: int | None = None) -> None:
        what = f"policy {self.name!r}"
        self.prefix_weight = check_number(prefix_weight, "prefix_weight", lo=0, what=what)
        self.queue_weight = check_number(queue_weight, "queue_weight", lo=0, what=what)
        self.pd_threshold = check_number(pd_threshold, "pd_threshold", lo=0, integer=True, unit="tokens", what=what)
        self.chunk = None if chunk is None else check_number(chunk, "chunk", lo=1, integer=True, what=what)

    def _pick(self, L: int, cached: list[int], loads: list[float]) -> int:
        """Position of the best score (ties: the first)."""
        best, best_s = 0, -1.0
        for i, q in enumerate(queue_scores(loads)):
            s = self.prefix_weight * cached[i] / L + self.queue_weight * q
            if s > best_s:
                best, best_s = i, s
        return best

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        L = max(int(request.input_tokens), 1)
        roomy = [d for d in view.decode if d.kv_free_tokens >= L] or list(view.decode)
        d = roomy[self._pick(L, [x.cached_tokens for x in roomy], [float(decode_load(x)) for x in roomy])]
        if not view.prefill or (L - d.cached_tokens < self.pd_threshold and d.kv_free_tokens >= L):
            return Decision.deflect(d.index, self.chunk)
        pv = view.prefill
        p = pv[self._pick(L, [x.cached_tokens for x in pv], [float(x.waiting_tokens) for x in pv])]
        return Decision.prefill(p.index, d.index)

    def params(self) -> dict[str, Any]:
        return {"prefix_weight": self.prefix_weight, "queue_weight": self.queue_weight,
                "pd_threshold": self.pd_threshold, "chunk": self.chunk}


def register_policies(register) -> None:
    register("prefix_affinity", PrefixAffinity)
