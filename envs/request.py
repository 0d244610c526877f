"""One request's life in the cluster model, with every timestamp needed to break its TTFT down exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deflectlab.envs.prefix_cache import Holding

NOT_YET = -1.0


class Request:
    """A request and its timeline. Times are absolute simulation seconds (``-1.0`` = not reached).

    Prefill path: arrival -> ``t_p_start`` (first chunk on the prefill node) -> ``t_p_end`` (prefill done, KV
    held on P) -> ``t_dispatch`` (P's response and the router's second hop done: the request reaches the decode
    node) -> ``t_admit`` (decode node allocated the prompt's blocks) -> ``t_read`` (read issued, at a decode step
    boundary) -> ``t_xfer_end`` (KV arrived, set-up included) -> ``t_join``
    (joined the decode batch at a step boundary) -> ``t_first_token`` (end of the step that recomputed the last
    prompt token) -> ``t_finish``.
    Deflect path: arrival -> ``t_admit`` -> ``t_d_start`` (first chunk inside a decode step) ->
    ``t_first_token`` (end of the step with the last chunk) -> ``t_finish``.

    ``first_step``/``last_step`` index the decode node's steps that produced the first and last token; the
    steps in between are this request's time-between-tokens samples (see :mod:`envs.metrics`).

    Decode memory is not clairvoyant: ``output_tokens`` is the workload's truth, read by the decode node only
    to know at which step the request stops. A preempted request (pool out of blocks, vLLM V1 recompute) keeps
    ``generated`` tokens, recomputes prompt plus generated tokens as a chunked prefill on its decode node and
    goes on; ``tbt_runs`` holds its token steps before each preemption and ``stalls`` each preemption's gap.
    """

    __slots__ = (
        "rid", "arrival_s", "input_tokens", "output_tokens",
        "deflected", "p_node", "d_node", "chunk_cap", "estimates",
        "p_remaining", "p_done", "t_p_start", "t_p_end",
        "t_dispatch", "t_admit", "t_read", "xfer_ideal_s", "t_xfer_end", "t_join",
        "d_remaining", "d_done", "t_d_start",
        "t_first_token", "t_finish", "first_step", "last_step", "ctx_offset", "kv_blocks",
        "generated", "preemptions", "tbt_runs", "stalls", "t_preempt", "reject_reason",
        "hashes", "n_full", "p_cached", "d_cached", "p_held", "d_held",
    )

    def __init__(self, rid: int, arrival_s: float, input_tokens: int, output_tokens: int) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.deflected = False
        self.p_node = -1
        self.d_node = -1
        self.chunk_cap = 0
        self.estimates: dict[str, float] | None = None
        self.p_remaining = input_tokens
        self.p_done = 0
        self.t_p_start = NOT_YET
        self.t_p_end = NOT_YET
        self.t_dispatch = NOT_YET
        self.t_admit = NOT_YET
        self.t_read = NOT_YET
        self.xfer_ideal_s = 0.0
        self.t_xfer_end = NOT_YET
        self.t_join = NOT_YET
        self.d_remaining = input_tokens
        self.d_done = 0
        self.t_d_start = NOT_YET
        self.t_first_token = NOT_YET
        self.t_finish = NOT_YET
        self.first_step = -1
        self.last_step = -1
        self.ctx_offset = 0
        self.kv_blocks = 0  # KV blocks the decode node allocated at admission (prompt, + generated on resume)
        self.generated = 0  # output tokens produced before the last preemption
        self.preemptions = 0
        self.tbt_runs: list[tuple[int, int]] | None = None  # (first step, last step) of each pre-emption run
        self.stalls: list[float] | None = None  # token gap across each preemption, seconds
        self.t_preempt = NOT_YET
        self.reject_reason: str | None = None
        # prefix caching (envs/prefix_cache.py): the prompt's chained block hashes (None: no cache lookups), its full
        # blocks with a hash (the most a node caches; 0: the nodes' caches have nothing to do with it, neither
        # lookups that may hit nor blocks to register), the prompt tokens found cached on its prefill node and at its
        # first admission on its decode node, and the cached blocks it holds on each
        self.hashes: list[int] | None = None
        self.n_full = 0
        self.p_cached = 0
        self.d_cached = 0
        self.p_held: Holding | None = None
        self.d_held: Holding | None = None

    @property
    def ttft_s(self) -> float:
        return self.t_first_token - self.arrival_s

    @property
    def finished(self) -> bool:
        return self.t_finish >= 0.0

    def __repr__(self) -> str:
        path = "deflect" if self.deflected else "prefill"
        return f"Request(rid={self.rid}, L={self.input_tokens}, O={self.output_tokens}, {path})"
