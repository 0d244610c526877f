"""KV hand-off transport presets: the stages between a prefill's end and the decode's first token.

The hand-off of a prefill-path request, stage by stage, as vLLM's NixlConnector performs it (vLLM RFC
https://github.com/vllm-project/vllm/issues/50913 and PR https://github.com/vllm-project/vllm/pull/51919):

1. **dispatch** (``dispatch_s``, a fixed delay): the prefill instance's response goes back to the router,
   which then sends the request (with the KV transfer parameters) to the decode instance: the second hop.
2. **admission**: the decode engine allocates blocks for the whole prompt; it waits FCFS while the pool or
   ``max_num_seqs`` is full (an explicit event in :mod:`envs.decode_node`).
3. **read issued at a step boundary** (``read_at_step``): the scheduler that allocated the blocks issues the
   read at the start of its next step, so the read waits for the decode step in progress to end.
4. **transfer**: a per-transfer set-up (``setup_s``), then the bytes at the per-transfer rate
   (``transfer_Bps``), capped further by each NIC's link capacity (``link_Bps``) shared max-min between the
   concurrent transfers of that NIC (:mod:`envs.network`).
5. **completion seen at a step boundary**: the finished read is reported with the output of the step in
   progress, so the request joins the batch at the next step boundary (always modelled).
6. **first step**: that step recomputes the last prompt token to sample the first output token (always).

``rdma`` with ``transfer_Bps``/``setup_s`` left unset takes both from the latency profile
(``nic_bandwidth_Bps``, ``kv_transfer_overhead_s``): the behaviour of the model before the presets existed.

A preset is named on the command line or in a config as ``NAME`` or ``NAME:term=value,term=value``
(``vllm-nixl:dispatch_s=0.2``); a wrong name or term raises :class:`HandoffError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from deflectlab.envs.parsing import ConfigError, parse_value


class HandoffError(ConfigError):
    """An unknown transport preset, an unknown term, or a bad term value; the message names it."""


@dataclass(frozen=True)
class Handoff:
    """One transport preset (see the module docstring for the stages).

    :param name: preset name.
    :param dispatch_s: P response plus the router's second hop, seconds.
    :param read_at_step: the decode engine issues the read at its next step boundary (else at once).
    :param setup_s: per-transfer set-up (posting the read), seconds; ``None``: the profile's value.
    :param transfer_Bps: one transfer's rate, bytes/s; ``None``: the profile's ``nic_bandwidth_Bps``.
    :param link_Bps: one NIC's link capacity shared max-min by its concurrent transfers, bytes/s.
    :param sources: term -> where its value comes from and whether it is measured, fitted or assumed.
    """

    name: str
    dispatch_s: float
    read_at_step: bool
    setup_s: float | None
    transfer_Bps: float | None
    link_Bps: float
    sources: dict[str, str]

    def __post_init__(self) -> None:
        for term in ("dispatch_s", "setup_s", "transfer_Bps", "link_Bps"):
            v = getattr(self, term)
            if v is None and term in ("setup_s", "transfer_Bps"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise HandoffError(f"hand-off {self.name!r}: {term} must be a number >= 0, got {v!r}")
        for term in ("transfer_Bps", "link_Bps"):
            if getattr(self, term) == 0:
                raise HandoffError(f"hand-off {self.name!r}: {term} must be > 0")
        if not isinstance(self.read_at_step, bool):
            raise HandoffError(f"hand-off {self.name!r}: read_at_step must be true or false, got "
                               f"{self.read_at_step!r}")

    def with_terms(self, **terms: object) -> Handoff:
        """This preset with some terms replaced; an unknown term is a :class:`HandoffError` naming it."""
        known = {f.name for f in fields(self)} - {"name", "sources"}
        bad = sorted(set(terms) - known)
        if bad:
            raise HandoffError(f"hand-off {self.name!r}: unknown term(s) {bad}; known: {sorted(known)}")
        srcs = dict(self.sources) | {k: "set by the user" for k in terms}
        return replace(self, sources=srcs, **terms)  # type: ignore[arg-type]


# -- figures and their sources ------------------------------------------------------------------------------
_RFC = "vLLM RFC #50913 / PR #51919 (3P1D NixlConnector, block size 64, 1000 requests)"
#: line rate of one 200 Gb/s HDR InfiniBand NIC per GPU (Azure ND A100 v4) at 70 % efficiency.
_IB_LINK_BPS = 25e9 * 0.7

VLLM_NIXL = Handoff(
    name="vllm-nixl",
    dispatch_s=0.12,
    read_at_step=True,
    setup_s=6.7e-3,
    transfer_Bps=7.5e9,
    link_Bps=_IB_LINK_BPS,
    sources={
        "dispatch_s": f"fitted: {_RFC} measures ~197 ms p50 from P's first token to the client's, of which ~29 ms "
                      "is the KV read and ~58 ms p50 the first-token recompute with its step alignment; 120 ms "
                      "for the P response and the router's serial second hop makes the reproduction scenario "
                      "(experiments/sensitivity.py reproduce_3p1d, checked in tests/test_handoff.py) land on "
                      "the 197 ms median",
        "read_at_step": f"measured behaviour: {_RFC} names waiting for engine-step boundaries as a cost; the "
                        "decode scheduler allocates the prompt's blocks and the workers start the read in the "
                        "next step",
        "setup_s": f"measured: {_RFC} KV-connector metrics, average post duration 6.7 ms per transfer",
        "transfer_Bps": f"fitted: {_RFC} reads of ~167 MB take ~29 ms p50: 167e6 B / (29 - 6.7) ms = 7.5e9 B/s "
                        "(the mean transfer, 38.7 ms, carries a tail the model does not reproduce)",
        "link_Bps": "assumed: 200 Gb/s HDR InfiniBand per GPU (Azure ND A100 v4 documentation) = 25 GB/s line "
                    "rate, at 70 % (middle of the 60-80 % typical efficiency)",
    },
)

RDMA = Handoff(
    name="rdma",
    dispatch_s=0.0,
    read_at_step=False,
    setup_s=None,
    transfer_Bps=None,
    link_Bps=_IB_LINK_BPS,
    sources={
        "dispatch_s": "assumed: an ideal hand-off with no orchestration delay (the model before the presets)",
        "read_at_step": "assumed: the read starts as soon as the blocks are allocated",
        "setup_s": "the profile's kv_transfer_overhead_s (0.5-2 ms GPUDirect RDMA set-up, upper end)",
        "transfer_Bps": "the profile's nic_bandwidth_Bps (NixlConnector average 167 MB in 38.7 ms, vLLM RFC "
                        "#50913)",
        "link_Bps": VLLM_NIXL.sources["link_Bps"],
    },
)

TCP = Handoff(
    name="tcp",
    dispatch_s=VLLM_NIXL.dispatch_s,
    read_at_step=True,
    setup_s=VLLM_NIXL.setup_s,
    transfer_Bps=0.5e9,
    link_Bps=25e9 / 8,
    sources={
        "dispatch_s": "as vllm-nixl (same router and engine orchestration)",
        "read_at_step": "as vllm-nixl",
        "setup_s": "as vllm-nixl (measured post duration; TCP set-up assumed no cheaper)",
        "transfer_Bps": "measured: NixlConnector reading over the UCX TCP fallback moves KV at 0.5 GB/s (vLLM "
                        "issue #52607); nixlbench over UCX TCP measured 0.59 GB/s inter-node (openucx/ucx "
                        "issue #10854)",
        "link_Bps": "assumed: a 25 Gb/s Ethernet port (3.125 GB/s line rate)",
    },
)

PRESETS: dict[str, Handoff] = {h.name: h for h in (VLLM_NIXL, RDMA, TCP)}


def handoff_estimate_s(handoff: Handoff | None, profile, tokens: float, queued_bytes: float = 0.0) -> float:
    """The one uncontended hand-off estimate every policy and feature shares, seconds: the dispatch delay, the
    per-transfer set-up, and ``tokens`` of KV plus ``queued_bytes`` already waiting on the NIC at the
    per-transfer rate. ``handoff`` None (or a preset leaving set-up and rate unset) takes them from the latency
    ``profile`` (``kv_transfer_overhead_s``, ``nic_bandwidth_Bps``): the estimate before the presets existed, which
    schema-1 features keep. The step alignment and the first decode step are estimated by the callers."""
    if handoff is None:
        return profile.transfer_s(tokens) + queued_bytes / profile.nic_bandwidth_Bps
    setup = profile.kv_transfer_overhead_s if handoff.setup_s is None else handoff.setup_s
    rate = handoff.transfer_Bps or profile.nic_bandwidth_Bps
    return handoff.dispatch_s + setup + (tokens * profile.kv_bytes_per_token + queued_bytes) / rate
DEFAULT = "vllm-nixl"


def parse_handoff(spec: str | Handoff) -> Handoff:
    """``NAME`` or ``NAME:term=value,...`` -> :class:`Handoff`; errors name the bad preset or term."""
    if isinstance(spec, Handoff):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise HandoffError(f"hand-off must be a preset name, one of {sorted(PRESETS)}, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    base = PRESETS.get(name.strip())
    if base is None:
        raise HandoffError(f"unknown hand-off preset {name.strip()!r}; known: {sorted(PRESETS)}")
    terms: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise HandoffError(f"hand-off {spec!r}: {item!r} is not term=value")
        terms[key.strip()] = parse_value(val)
    return base.with_terms(**terms) if terms else base
