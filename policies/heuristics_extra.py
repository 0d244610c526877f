"""Threshold heuristics for deflection: the baselines the proactive deflector is compared against.

Every policy here looks only at the :class:`~envs.view.ClusterView` and the request's prompt length
(``request.input_tokens``); none reads the output length, which a router does not know. Each class cites
where its rule comes from. Parameters are plain constructor arguments, so each policy can be built from a
registry spec such as ``"dynamo_isl:isl_bound=1024,veto_busy=0.9"``.

Shared choices, so the rules differ only in *when* they deflect:

* prefill node: the one with the fewest waiting prompt tokens (join the shortest queue), ties broken by the
  earliest end of the running step, then by index;
* decode node of a prefill-path request: left to the cluster's decode balancer (``None``), as vLLM's and
  Dynamo's P/D proxies leave it to their decode router;
* decode node of a deflection: the one with the least deflected prefill work waiting, ties broken by the
  smaller decode batch, then by the most free KV; nodes without KV room for the prompt are skipped.
"""

from __future__ import annotations

from typing import Any

from deflectlab.envs.config import check_number
from deflectlab.envs.view import (
    ClusterView,
    Decision,
    DecodeNodeView,
    Policy,
    PrefillNodeView,
    RequestLike,
    decode_load,
)


def least_loaded_prefill(view: ClusterView) -> int:
    """Index of the prefill node with the fewest waiting prompt tokens (ties: earliest free, then lowest)."""
    best = -1
    best_key: tuple[int, float] = (1 << 62, 0.0)
    for p in view.prefill:
        key = (p.waiting_tokens, p.busy_until_s)
        if key < best_key:
            best, best_key = p.index, key
    return best


def most_kv_free_decode(view: ClusterView) -> int:
    """Index of the decode node with the most free KV tokens (ties: lowest index)."""
    best, best_free = 0, -1
    for d in view.decode:
        if d.kv_free_tokens > best_free:
            best, best_free = d.index, d.kv_free_tokens
    return best


def kv_use_fraction(d: DecodeNodeView) -> float:
    """Share of ``d``'s KV capacity that is reserved (0 = empty, 1 = full)."""
    cap = d.profile.kv_capacity_tokens
    return 1.0 - d.kv_free_tokens / cap if cap > 0 else 1.0


def decode_busy(d: DecodeNodeView, threshold: float) -> bool:
    """Dynamo's decode-busy line, extended to the batch: KV use or batch share above ``threshold``.

    Dynamo marks a decode worker busy when its projected decode KV blocks exceed ``decode_busy_threshold x
    total_kv_blocks`` (ai-dynamo/dynamo ``lib/kv-router/src/conditional_disagg.rs``,
    ``decode_chosen_worker_busy``). The batch share (running plus admitted-but-prefilling sequences over
    ``max_num_seqs``) is the same test on the sequence limit, which binds first for short prompts.
    """
    if kv_use_fraction(d) > threshold:
        return True
    return decode_load(d) > threshold * d.max_num_seqs


def deflect_target(view: ClusterView, prompt_tokens: int, veto_busy: float | None = None) -> int | None:
    """Decode node for a deflection: least deflected work waiting, then smallest batch, then most KV free.

    Nodes without KV room for the prompt, and (with ``veto_busy``) busy nodes, are skipped; ``None`` when
    no node qualifies.
    """
    best = None
    best_key: tuple[int, int, int] = (1 << 62, 0, 0)
    for d in view.decode:
        if d.kv_free_tokens < prompt_tokens:
            continue
        if veto_busy is not None and decode_busy(d, veto_busy):
            continue
        key = (d.deflected_waiting_tokens, d.batch_size, -d.kv_free_tokens)
        if key < best_key:
            best, best_key = d.index, key
    return best


class LeastLoaded(Policy):
    """Never deflect; prefill on the node with the fewest waiting prompt tokens.

    Source: join-the-shortest-queue (Winston, "Optimality of the shortest line discipline", J. Appl. Prob.
    1977), measured in work (tokens) rather than requests, as vLLM's production-stack and Dynamo's
    routers weigh prefill load by tokens. The decode node is the one with the most free KV (``decode=kv``),
    or left to the cluster's balancer (``decode=balancer``).

    :param decode: ``"kv"`` (most free KV tokens) or ``"balancer"`` (the cluster's decode balancer).
    """

    name = "least_loaded"

    def __init__(self, decode: str = "kv") -> None:
        if decode not in ("kv", "balancer"):
            raise ValueError(f"policy 'least_loaded': decode must be 'kv' or 'balancer', got {decode!r}")
        self.decode = decode

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        p = least_loaded_prefill(view)
        return Decision.prefill(p, most_kv_free_decode(view) if self.decode == "kv" else None)

    def params(self) -> dict[str, Any]:
        return {"decode": self.decode}


class LengthThreshold(Policy):
    """Deflect prompts shorter than ``max_len`` tokens; prefill the rest on the least-loaded prefill node.

    Source: the short-prompt bypass of P/D routers: a short prefill costs little inside a decode batch and
    saves the KV hand-off (NVIDIA Dynamo disaggregation design, "if the prefill is short ... it is more
    efficient to prefill locally in the decode engine", docs.nvidia.com/dynamo ``disagg_serving``; vLLM-style
    simulators' ``direct-to-decode`` decider, inference-sim PR #650). The decode node is the one with the
    least deflected work waiting.

    :param max_len: deflect when ``input_tokens < max_len``, tokens.
    :param chunk: chunk cap of a deflected prefill, tokens (``None``: the decode node's token budget).
    """

    name = "length_threshold"

    def __init__(self, max_len: int = 512, chunk: int | None = None) -> None:
        check_number(max_len, "max_len", lo=0, integer=True, what=f"policy {self.name!r}")
        if chunk is not None:
            check_number(chunk, "chunk", lo=1, integer=True, what=f"policy {self.name!r}")
        self.max_len = int(max_len)
        self.chunk = chunk

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        L = request.input_tokens
        if L < self.max_len:
            d = deflect_target(view, L)
            if d is not None:
                return Decision.deflect(d, self.chunk)
        return Decision.prefill(least_loaded_prefill(view))

    def params(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "chunk": self.chunk}


class QueueThreshold(Policy):
    """Deflect when even the least-loaded prefill node has more than ``max_waiting_tokens`` waiting.

    Source: queue-length-triggered offloading (Dynamo's disaggregated router sends prefill remote only
    while the prefill queue is below ``max_prefill_queue_size``, docs.nvidia.com/dynamo 0.2 ``disagg_serving``;
    the classic threshold offloading rule of load sharing, Eager, Lazowska and Zahorjan, "Adaptive load
    sharing in homogeneous distributed systems", IEEE TSE 1986).

    :param max_waiting_tokens: deflect when the best prefill node's waiting prompt tokens exceed this, tokens.
    :param chunk: chunk cap of a deflected prefill, tokens (``None``: the decode node's token budget).
    """

    name = "queue_threshold"

    def __init__(self, max_waiting_tokens: int = 16384, chunk: int | None = None) -> None:
        check_number(max_waiting_tokens, "max_waiting_tokens", lo=0, integer=True, what=f"policy {self.name!r}")
        if chunk is not None:
            check_number(chunk, "chunk", lo=1, integer=True, what=f"policy {self.name!r}")
        self.max_waiting_tokens = int(max_waiting_tokens)
        self.chunk = chunk

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        p = least_loaded_prefill(view)
        if view.prefill[p].waiting_tokens > self.max_waiting_tokens:
            d = deflect_target(view, request.input_tokens)
            if d is not None:
                return Decision.deflect(d, self.chunk)
        return Decision.prefill(p)

    def params(self) -> dict[str, Any]:
        return {"max_waiting_tokens": self.max_waiting_tokens, "chunk": self.chunk}


class DynamoConditional(Policy):
    """NVIDIA Dynamo's conditional disaggregation: bypass remote prefill (= deflect) by ISL and/or load.

    Source: ai-dynamo/dynamo ``lib/kv-router/src/conditional_disagg.rs`` (policies ``isl_bounding``,
    ``prefill_load``, ``isl_or_load``) and the "Conditional Disaggregation" page of the Dynamo docs:

    * ``isl_bounding``: bypass when the effective input length ``eff = L - cached`` (the prompt less the
      prefix the cache-hot decode node holds, the view's ``cached_tokens``) is below ``isl_bound`` (Dynamo's
      ``eff_isl_threshold``, default 2048) *and* ``eff / L`` is below ``isl_ratio`` (Dynamo's
      ``eff_isl_ratio_threshold``, default 0.7: the decode node's cache must cover enough of the prompt). As in
      Dynamo, without prefix-cache hits the ratio is 1 and this gate never passes; ``isl_ratio`` above 1 turns
      the ratio gate off (a bypass by prompt length alone, this policy's behaviour before the cache existed).
    * ``prefill_load``: bypass when the prefill worker the router would pick is busy, ``active_tokens >
      load_frac x max_num_batched_tokens`` (Dynamo's ``router_queue_threshold``, default 2.0). Active tokens
      are the node's waiting prompt tokens (the running step's included).
    * ``isl_or_load``: bypass when either says so.

    Decode-busy veto (Dynamo's ``decode_busy_threshold``, an AND gate over the verdict): with ``veto_busy``
    set, a bypass goes only to a decode node whose KV use and batch share are at most ``veto_busy``; if no
    node qualifies the request takes the prefill path. The bypass target is the cache-hot decode node (the most
    cached tokens, as Dynamo's KV-overlap router picks it) when it holds any of the prompt and qualifies, else the
    decode node with the least deflected work waiting.

    :param mode: ``"isl_bounding"``, ``"prefill_load"`` or ``"isl_or_load"``.
    :param isl_bound: bypass prompts whose uncached part is shorter than this, tokens.
    :param isl_ratio: ... and whose uncached share of the prompt is below this (> 1: no ratio gate).
    :param load_frac: prefill worker busy above ``load_frac x`` its token budget of waiting tokens.
    :param veto_busy: decode-busy threshold as a fraction of KV capacity and of ``max_num_seqs`` (``None``: off).
    :param chunk: chunk cap of a deflected prefill, tokens (``None``: the decode node's token budget).
    """

    MODES = ("isl_bounding", "prefill_load", "isl_or_load")

    def __init__(self, mode: str = "isl_or_load", isl_bound: int = 2048, load_frac: float = 2.0,
                 veto_busy: float | None = None, chunk: int | None = None, isl_ratio: float = 0.7) -> None:
        if mode not in self.MODES:
            raise ValueError(f"policy 'dynamo': mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.name = {"isl_bounding": "dynamo_isl", "prefill_load": "dynamo_load",
                     "isl_or_load": "dynamo_isl_or_load"}[mode]
        check_number(isl_bound, "isl_bound", lo=0, integer=True, what=f"policy {self.name!r}")
        check_number(load_frac, "load_frac", lo=0, what=f"policy {self.name!r}")
        check_number(isl_ratio, "isl_ratio", lo=0, what=f"policy {self.name!r}")
        self.isl_ratio = float(isl_ratio)
        if veto_busy is not None:
            check_number(veto_busy, "veto_busy", lo=0, hi=1, what=f"policy {self.name!r}")
        if chunk is not None:
            check_number(chunk, "chunk", lo=1, integer=True, what=f"policy {self.name!r}")
        self.mode = mode
        self.isl_bound = int(isl_bound)
        self.load_frac = float(load_frac)
        self.veto_busy = None if veto_busy is None else float(veto_busy)
        self.chunk = chunk

    def _prefill_busy(self, p: PrefillNodeView) -> bool:
        return p.waiting_tokens > self.load_frac * p.max_batched_tokens

    def _isl_bypass(self, L: int, hot: DecodeNodeView) -> bool:
        eff = L - hot.cached_tokens
        return eff < self.isl_bound and eff / max(L, 1) < self.isl_ratio

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        L = request.input_tokens
        p = least_loaded_prefill(view)
        hot = max(view.decode, key=lambda d: d.cached_tokens)  # the cache-hot decode node (first of equals)
        if self.mode == "isl_bounding":
            bypass = self._isl_bypass(L, hot)
        elif self.mode == "prefill_load":
            bypass = self._prefill_busy(view.prefill[p])
        else:
            bypass = self._isl_bypass(L, hot) or self._prefill_busy(view.prefill[p])
        if bypass:
            if hot.cached_tokens and hot.kv_free_tokens >= L and not (
                    self.veto_busy is not None and decode_busy(hot, self.veto_busy)):
                return Decision.deflect(hot.index, self.chunk)
            d = deflect_target(view, L, self.veto_busy)
            if d is not None:
                return Decision.deflect(d, self.chunk)
        return Decision.prefill(p)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode}
        if self.mode != "prefill_load":
            out["isl_bound"] = self.isl_bound
            out["isl_ratio"] = self.isl_ratio
        if self.mode != "isl_bounding":
            out["load_frac"] = self.load_frac
        out["veto_busy"] = self.veto_busy
        out["chunk"] = self.chunk
        return out


def _dynamo(mode: str):
    def factory(**kw: Any) -> DynamoConditional:
        if kw.pop("mode", mode) != mode:  # params() reports the mode; a different one is a mistake
            raise ValueError(f"policy {DynamoConditional(mode).name!r}: the mode is fixed by the name ({mode}); "
                             "drop mode=")
        return DynamoConditional(mode=mode, **kw)

    return factory


def register_policies(register) -> None:
    """Add this module's policies to the registry (called by :mod:`policies.registry`)."""
    register("least_loaded", LeastLoaded)
    register("length_threshold", LengthThreshold)
    register("queue_threshold", QueueThreshold)
    register("dynamo_isl", _dynamo("isl_bounding"))
    register("dynamo_load", _dynamo("prefill_load"))
    register("dynamo_isl_or_load", _dynamo("isl_or_load"))
