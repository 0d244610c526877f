"""Fitting latency profiles to measured step times and KV transfers.

``deflectlab calibrate`` (``scripts/cmd_calibrate.py``) and ``deflectlab validate``
(``scripts/cmd_validate.py``) are thin wrappers around this module; ``deflectlab profile-gpu``
(``envs.gpu_profiler``) writes its input.

Measurement CSV
---------------
One row per measured engine step or KV transfer, with a header naming these columns (any order):

==================== ======================================================================================
column               meaning
==================== ======================================================================================
``kind``             ``prefill`` (one prefill chunk alone), ``decode`` (decodes only), ``mixed`` (decodes plus
                     one prefill chunk) or ``transfer`` (one KV transfer)
``num_tokens``       all tokens in the step: decode tokens plus chunk tokens, tokens
``decode_seqs``      running decode sequences in the step
``decode_ctx_tokens`` KV tokens the decodes read: the sum of their context lengths, tokens
``chunk_tokens``     prefill chunk tokens in the step (one chunk per step, so chunk_sq = chunk_tokens ** 2);
                     0 in a ``prefill`` row means the row times the linear operators only (no attention), as
                     Vidur's ``mlp.csv`` profiles do
``prior_tokens``     context the prefill chunk attends to beyond itself (earlier chunks of its prompt), tokens
``bytes``            bytes moved by a ``transfer`` row
``seconds``          measured time, seconds, > 0
``source``           optional: where the row came from (tool, device, date)
==================== ======================================================================================

Empty cells in the count columns read as 0; ``seconds`` must be given. Rows must be consistent with their
kind: ``prefill`` has no decodes and ``chunk_tokens`` equal to ``num_tokens`` (or 0); ``decode`` has
``decode_seqs == num_tokens`` and no chunk; ``mixed`` has ``num_tokens == decode_seqs + chunk_tokens``;
``transfer`` has ``bytes > 0``.

What ``seconds`` measures
-------------------------
The model forward of the step on the GPU, *without* the engine's fixed per-step overhead (CPU scheduling,
sampling, LM head): what ``step_s(...) - overhead_s`` of :class:`envs.profile.LatencyModel` predicts. That is
what ``profile-gpu`` and Vidur's operator profiles measure. ``overhead_s`` is therefore never fitted (it is
not separable from the flat part of the linear curve anyway): it comes from ``--set overhead_s=...`` or the
base profile. If your seconds *do* include the overhead (timed around vLLM's step loop), set it to 0 so it is
folded into the linear curve.

The fit
-------
The step rows fit, jointly and by non-negative least squares weighted by 1/seconds (so relative error is
minimised and short steps count as much as long ones), the linear curve's knot values, and
``decode_attn_s_per_token``, ``decode_attn_s_per_seq``, ``prefill_attn_sq_s`` and ``prefill_attn_cross_s``.
Transfer rows fit ``seconds = kv_transfer_overhead_s + bytes / nic_bandwidth_Bps`` the same way. A term the
rows do not determine is taken from the base profile (its source says so) or refused with an error that says
which rows are missing.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.envs.profile import SCALAR_TERMS, LatencyModel

#: Kinds of measurement rows.
KINDS: tuple[str, ...] = ("prefill", "decode", "mixed", "transfer")
STEP_KINDS: tuple[str, ...] = ("prefill", "decode", "mixed")
#: Numeric columns of the measurement CSV, in the order they are written.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "num_tokens",
    "decode_seqs",
    "decode_ctx_tokens",
    "chunk_tokens",
    "prior_tokens",
    "bytes",
    "seconds",
)
COLUMNS: tuple[str, ...] = ("kind", *NUMERIC_COLUMNS, "source")
REQUIRED_COLUMNS: tuple[str, ...] = COLUMNS[:-1]

#: Attention terms of the step model fitted besides the linear curve, with the row column each multiplies.
ATTN_TERMS: tuple[str, ...] = (
    "decode_attn_s_per_token",
    "decode_attn_s_per_seq",
    "prefill_attn_sq_s",
    "prefill_attn_cross_s",
)
TRANSFER_TERMS: tuple[str, ...] = ("kv_transfer_overhead_s", "nic_bandwidth_Bps")
#: Terms no measurement row determines; they come from ``set_terms`` or the base profile.
UNMEASURED_TERMS: tuple[str, ...] = (
    "overhead_s",
    "kv_bytes_per_token",
    "kv_capacity_tokens",
    "kv_block_tokens",
)

#: Candidate knot positions (tokens) for the linear curve when none are given: doubling, with the flat
#: region's end (about 64 tokens on an A100 in Vidur's Llama-3-8B ``mlp.csv``, microsoft/vidur @7d47513363ec,
#: bundled in ``envs/data/vidur-a100/``) among them.
DEFAULT_KNOTS: tuple[float, ...] = (
    1,
    16,
    64,
    128,
    256,
    512,
    1024,
    2048,
    4096,
    8192,
    16384,
    32768,
    65536,
    131072,
)

# (minimum distinct values, kinds, column) a term needs before it can be fitted at all.
_REQUIREMENTS: dict[str, tuple[int, tuple[str, ...], str]] = {
    "linear": (2, STEP_KINDS, "num_tokens"),
    "decode_attn_s_per_token": (2, ("decode", "mixed"), "decode_ctx_tokens"),
    "decode_attn_s_per_seq": (2, ("decode", "mixed"), "decode_seqs"),
    "prefill_attn_sq_s": (2, ("prefill", "mixed"), "chunk_tokens"),
    "prefill_attn_cross_s": (2, ("prefill", "mixed"), "prior_tokens"),
    "transfer": (2, ("transfer",), "bytes"),
}
# What to add when a term is present in the rows but not separable from the others.
_SEPARATION_HINTS: dict[str, str] = {
    "decode_attn_s_per_token": "vary decode_ctx_tokens at a fixed decode_seqs",
    "decode_attn_s_per_seq": (
        "add prefill rows at the decode rows' num_tokens, so the linear operators are pinned apart from the "
        "per-sequence cost"
    ),
    "prefill_attn_sq_s": (
        "add mixed rows that split one num_tokens between decodes and a chunk, or more chunk sizes between two knots"
    ),
    "prefill_attn_cross_s": "vary prior_tokens at a fixed chunk_tokens",
}


#: A fitted term whose standard error exceeds this share of its value is reported as poorly determined
#: (assumed: at +-50 % the rows cannot tell the value from half or one and a half times it).
STDERR_WARN_PCT = 50.0
#: Held-out rows predicted worse than this mean absolute percentage error, overall or for one kind, are
#: reported (assumed, from the bundled A100 Llama-3-8B fit to Vidur's public operator measurements: median
#: error 1.1 %, 99 % of the 456 rows within 10 %; scripts/build_profiles.py).
HOLDOUT_WARN_PCT = 10.0
#: The ``source`` that ``deflectlab profile-gpu`` writes: the model shape and the device it measured on.
_PROFILER_SOURCE = re.compile(r"^deflectlab profile-gpu --shape (?P<model>\S+) on (?P<hardware>.+?), \d{4}-\d{2}-\d{2}")


def measured_names(rows: Sequence[Measurement]) -> tuple[str | None, str | None]:
    """``(hardware, model)`` the rows' sources name (rows written by ``deflectlab profile-gpu``), several
    joined by `` + ``; ``None`` for what no row names."""
    hardware: list[str] = []
    model: list[str] = []
    for m in rows:
        hit = _PROFILER_SOURCE.match(m.source)
        if hit:
            hw, shape = hit["hardware"], f"{hit['model']} shape, random weights (deflectlab profile-gpu)"
            hardware += [hw] if hw not in hardware else []
            model += [shape] if shape not in model else []
    return (" + ".join(hardware) or None, " + ".join(model) or None)


def quality_warnings(terms: Mapping[str, TermFit], holdout: Mapping[str, Any] | None) -> list[str]:
    """Warnings for fitted terms with a standard error above :data:`STDERR_WARN_PCT` and for held-out errors
    above :data:`HOLDOUT_WARN_PCT` (overall or per kind)."""
    out = []
    for name, t in terms.items():
        if t.how == "fitted" and t.rel_stderr_pct is not None and not t.rel_stderr_pct <= STDERR_WARN_PCT:
            out.append(f"term {name} is poorly determined: standard error {t.rel_stderr_pct:.0f} % of its value "
                       f"(> {STDERR_WARN_PCT:g} %); add rows that vary what it multiplies, or fix it with --set")
    if holdout and holdout.get("rows"):
        if not holdout["mape_pct"] <= HOLDOUT_WARN_PCT:
            out.append(f"held-out MAPE {holdout['mape_pct']:.1f} % (> {HOLDOUT_WARN_PCT:g} %): the profile does "
                       "not predict rows it was not fitted to")
        for kind, st in holdout.get("by_kind", {}).items():
            if not st["mape_pct"] <= HOLDOUT_WARN_PCT:
                out.append(f"held-out {kind} rows: MAPE {st['mape_pct']:.1f} % (> {HOLDOUT_WARN_PCT:g} %)")
    return out


# --------------------------------------------------------------------------------------------------------
# Measurement rows
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measurement:
    """One measured step or transfer (a row of the measurement CSV). Counts in tokens, times in seconds.

    :param kind: ``prefill``, ``decode``, ``mixed`` or ``transfer``.
    :param num_tokens: all tokens in the step, tokens.
    :param decode_seqs: running decode sequences in the step.
    :param decode_ctx_tokens: sum of the decodes' context lengths, tokens.
    :param chunk_tokens: prefill chunk tokens in the step (0: linear operators only), tokens.
    :param prior_tokens: the chunk's prior context, tokens.
    :param bytes: bytes moved (transfer rows), bytes.
    :param seconds: measured time, seconds.
    :param source: where the row came from.
    :param origin: ``file:line`` of the row, for error messages and reports.
    """

    kind: str
    num_tokens: float = 0.0
    decode_seqs: float = 0.0
    decode_ctx_tokens: float = 0.0
    chunk_tokens: float = 0.0
    prior_tokens: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    source: str = ""
    origin: str = ""

    @property
    def chunk_sq(self) -> float:
        """Sum of squared chunk tokens in the step (one chunk per step), tokens^2."""
        return self.chunk_tokens**2

    @property
    def chunk_cross(self) -> float:
        """Chunk tokens times prior-context tokens, tokens^2."""
        return self.chunk_tokens * self.prior_tokens


def _check_row(m: Measurement) -> str | None:
    """The problem with a row's consistency, or None."""
    if m.kind == "transfer":
        return None if m.bytes > 0 else "a transfer row needs bytes > 0"
    if m.num_tokens < 1:
        return f"a {m.kind} row needs num_tokens >= 1"
    if m.kind == "prefill":
        if m.decode_seqs or m.decode_ctx_tokens:
            return "a prefill row has no decodes (decode_seqs and decode_ctx_tokens must be 0)"
        if m.chunk_tokens not in (0, m.num_tokens):
            return "a prefill row has chunk_tokens == num_tokens (or 0 for a linear-operators-only row)"
    elif m.kind == "decode":
        if m.chunk_tokens or m.prior_tokens:
            return "a decode row has no prefill chunk (chunk_tokens and prior_tokens must be 0)"
        if m.decode_seqs != m.num_tokens:
            return "a decode row has decode_seqs == num_tokens (one token per decode)"
    elif m.kind == "mixed":
        if m.decode_seqs < 1 or m.chunk_tokens < 1:
            return "a mixed row needs decode_seqs >= 1 and chunk_tokens >= 1"
        if m.num_tokens != m.decode_seqs + m.chunk_tokens:
            return "a mixed row has num_tokens == decode_seqs + chunk_tokens"
    return None


def _check_header(path: Path, fieldnames: Sequence[str] | None) -> list[str]:
    """The measurement CSV's stripped header, or a ValueError naming a missing or unknown column."""
    header = [h.strip() for h in (fieldnames or [])]
    if not header:
        raise ValueError(f"{path}: empty file; expected a header with columns {', '.join(REQUIRED_COLUMNS)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)} (source optional)"
        )
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        raise ValueError(f"{path}:1: unknown column(s) {', '.join(unknown)}; expected {', '.join(COLUMNS)}")
    return header


def _numeric_cell(where: str, col: str, cell: str) -> float:
    """One numeric cell of a measurement row (empty is 0, except ``seconds``), or a ValueError naming it."""
    if not cell:
        if col == "seconds":
            raise ValueError(f"{where}: seconds is empty; every row needs its measured time")
        return 0.0
    try:
        v = float(cell)
    except ValueError:
        raise ValueError(f"{where}: column {col} is not a number: {cell!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: column {col} is not finite: {cell!r}")
    if col == "seconds" and v <= 0:
        raise ValueError(f"{where}: seconds must be > 0, got {cell}")
    if v < 0:
        raise ValueError(f"{where}: column {col} must be >= 0, got {cell}")
    return v


def read_measurements(path: str | Path) -> list[Measurement]:
    """Read and validate a measurement CSV (format in the module docstring).

    :raises ValueError: naming the file, the line and the problem, for a missing or unknown column, a
        non-numeric or negative value, seconds <= 0, an unknown kind or a row inconsistent with its kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"measurement file not found: {path}")
    rows: list[Measurement] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = _check_header(path, reader.fieldnames)
        for raw in reader:
            line = reader.line_num
            where = f"{path}:{line}"
            if all(not (v or "").strip() for k, v in raw.items() if k is not None):
                continue  # blank line
            if None in raw:
                raise ValueError(f"{where}: more cells than header columns")
            kind = (raw["kind"] or "").strip()
            if kind not in KINDS:
                raise ValueError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            values = {col: _numeric_cell(where, col, (raw[col] or "").strip()) for col in NUMERIC_COLUMNS}
            m = Measurement(kind=kind, source=(raw.get("source") or "").strip(), origin=where, **values)
            problem = _check_row(m)
            if problem:
                raise ValueError(f"{where}: {problem}")
            rows.append(m)
    if not rows:
        raise ValueError(f"{path}: no measurement rows")
    return rows


def write_measurements(path: str | Path, rows: Sequence[Measurement]) -> Path:
    """Write rows as a measurement CSV (counts as integers where they are whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def cell(v: float) -> str:
        return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for m in rows:
            w.writerow(
                [
                    m.kind,
                    *(cell(getattr(m, c)) if c != "seconds" else repr(float(m.seconds)) for c in NUMERIC_COLUMNS),
                    m.source,
                ]
            )
    return path


# --------------------------------------------------------------------------------------------------------
# Vidur's public A100 profiles as measurement rows
# --------------------------------------------------------------------------------------------------------
#: The bundled copies of Vidur's A100 profiling CSVs (microsoft/vidur @7d47513363ec, MIT; byte-for-byte, with
#: the source paths and licence in ``envs/data/README.md``): ``Llama-2-7b-hf_mlp.csv``, ``Meta-Llama-3-8B_mlp.csv``
#: and ``a100_dgx_send_recv.csv``.
VIDUR_A100_DIR = Path(__file__).resolve().parent / "data" / "vidur-a100"
#: Vidur's Llama-2-7B A100-80GB TP1 attention rows, milliseconds per layer, as read from its attention.csv
#: (microsoft/vidur @7d47513363ec, MIT: ``data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/attention.csv``,
#: stored there with Git LFS, so only these rows are copied; measured). Prefill: (chunk tokens, ms), empty
#: cache. Decode: (batch, kv tokens per request, ms).
VIDUR_LLAMA2_7B_PREFILL_ATTN_MS: tuple[tuple[int, float], ...] = (
    (480, 0.098),
    (1920, 0.699),
    (3520, 2.062),
    (3584, 2.119),
    (3648, 2.219),
    (3712, 2.255),
    (3776, 2.372),
)
VIDUR_LLAMA2_7B_DECODE_ATTN_MS: tuple[tuple[int, int, float], ...] = (
    (1, 32, 0.009),
    (8, 32, 0.018),
    (32, 32, 0.048),
    (64, 32, 0.097),
    (1, 2176, 0.034),
    (47, 2112, 0.934),
    (64, 2112, 1.22),
    (128, 2112, 2.219),
)


def vidur_rows(mlp_csv_path: str | Path, layers: int = 32, tp: int = 1) -> list[Measurement]:
    """Linear-operator rows of one forward pass from a Vidur ``*_mlp.csv`` profile.

    Each row is a ``prefill`` row with ``chunk_tokens`` 0 (linear operators only, no attention): the sum of
    the per-layer operators' median times x ``layers`` plus the embedding's (see ``envs/data/README.md``).
    LM head, sampling and scheduling are not in these files, as ``seconds`` excludes them by definition.

    :param mlp_csv_path: a Vidur ``mlp.csv`` (times in milliseconds per layer).
    :param layers: transformer layers of the model (32 for Llama-2-7B and Llama-3-8B).
    :param tp: keep the rows of this tensor-parallel degree.
    """
    path = Path(mlp_csv_path)
    rows: list[Measurement] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        ops = [k for k in fields if k.startswith("time_stats.") and k.endswith(".median")]
        if "time_stats.emb.median" not in ops or "num_tokens" not in fields:
            raise ValueError(f"{path}: not a Vidur mlp.csv (no time_stats.emb.median / num_tokens columns)")
        for raw in reader:
            if int(raw["num_tensor_parallel_workers"]) != tp:
                continue
            layer_ms = sum(float(raw[k]) for k in ops if k != "time_stats.emb.median")
            n = float(raw["num_tokens"])
            rows.append(
                Measurement(
                    kind="prefill",
                    num_tokens=n,
                    seconds=(layer_ms * layers + float(raw["time_stats.emb.median"])) / 1e3,
                    source=f"Vidur A100 mlp profile {path.name} (TP{tp}, {layers} layers, linear operators)",
                    origin=f"{path}:{reader.line_num}",
                )
            )
    if not rows:
        raise ValueError(f"{path}: no rows with num_tensor_parallel_workers == {tp}")
    return rows


def vidur_attention_rows(mlp_csv_path: str | Path, layers: int = 32) -> list[Measurement]:
    """Whole-step rows for Llama-2-7B on an A100: Vidur's attention rows plus its linear operators.

    Each row of :data:`VIDUR_LLAMA2_7B_PREFILL_ATTN_MS` / :data:`VIDUR_LLAMA2_7B_DECODE_ATTN_MS` (ms per
    layer) times ``layers``, plus the linear-operator time of the step's tokens interpolated from
    ``mlp_csv_path`` (``Llama-2-7b-hf_mlp.csv``, TP1; see :func:`vidur_rows`).
    """
    lin = vidur_rows(mlp_csv_path, layers)
    toks = np.array([m.num_tokens for m in lin])
    secs = np.array([m.seconds for m in lin])
    order = np.argsort(toks, kind="stable")
    toks, secs = toks[order], secs[order]

    def linear(n: float) -> float:
        return float(np.interp(n, toks, secs))

    src = f"Vidur A100 Llama-2-7B TP1 attention.csv rows (microsoft/vidur @7d47513363ec) + {Path(mlp_csv_path).name}"
    rows = [
        Measurement(
            kind="prefill",
            num_tokens=c,
            chunk_tokens=c,
            seconds=linear(c) + ms * layers / 1e3,
            source=src,
            origin=f"vidur-attention:prefill c={c}",
        )
        for c, ms in VIDUR_LLAMA2_7B_PREFILL_ATTN_MS
    ]
    rows += [
        Measurement(
            kind="decode",
            num_tokens=b,
            decode_seqs=b,
            decode_ctx_tokens=b * kv,
            seconds=linear(b) + ms * layers / 1e3,
            source=src,
            origin=f"vidur-attention:decode B={b} kv={kv}",
        )
        for b, kv, ms in VIDUR_LLAMA2_7B_DECODE_ATTN_MS
    ]
    return rows


# --------------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------------
def linear_basis(tokens: Sequence[float] | np.ndarray, knots: Sequence[float] | np.ndarray) -> np.ndarray:
    """Hat-function basis of the piecewise-linear curve: row i holds the weights of each knot's value.

    Flat below the first knot, the last segment extended beyond the last knot, as
    :meth:`envs.profile.LatencyModel.linear` evaluates it. Shape ``(len(tokens), len(knots))``.
    """
    x = np.asarray(tokens, dtype=float)
    k = np.asarray(knots, dtype=float)
    if len(k) < 2 or np.any(np.diff(k) <= 0):
        raise ValueError("knots must be strictly increasing, at least two")
    xc = np.clip(x, k[0], None)
    basis = np.zeros((len(x), len(k)))
    idx = np.clip(np.searchsorted(k, xc, side="right") - 1, 0, len(k) - 2)
    w = (xc - k[idx]) / (k[idx + 1] - k[idx])
    basis[np.arange(len(x)), idx] = 1 - w
    basis[np.arange(len(x)), idx + 1] = w
    return basis


def fit_piecewise_linear(
    tokens: Sequence[float], seconds: Sequence[float], knots: Sequence[float], relative: bool = True
) -> np.ndarray:
    """Least-squares piecewise-linear curve through fixed knot positions.

    Returns the fitted value at each knot; the curve is flat below the first knot and extends the last
    segment beyond the last knot (as :meth:`envs.profile.LatencyModel.linear` evaluates it).

    :param tokens: measured token counts.
    :param seconds: measured times, seconds.
    :param knots: strictly increasing knot positions, tokens.
    :param relative: weight each row by 1/seconds, so the fit minimises relative error (small steps matter
        as much as large ones).
    """
    x = np.asarray(tokens, dtype=float)
    y = np.asarray(seconds, dtype=float)
    k = np.asarray(knots, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("tokens and seconds must be 1-D and of equal length")
    basis = linear_basis(x, k)
    used = basis.sum(axis=0) > 0
    if not used.all():
        missing = [float(v) for v in k[~used]]
        raise ValueError(f"no measurement constrains the knot(s) at {missing} tokens; add rows or move knots")
    wt = 1.0 / y if relative else np.ones_like(y)
    sol, *_ = np.linalg.lstsq(basis * wt[:, None], y * wt, rcond=None)
    return sol


def auto_knots(tokens: Sequence[float] | np.ndarray, candidates: Sequence[float] = DEFAULT_KNOTS) -> list[float]:
    """Knot positions for the measured token counts: the data's smallest and largest counts and every
    candidate between them that keeps each segment holding at least one measured count."""
    x = np.unique(np.asarray(tokens, dtype=float))
    lo, hi = float(x[0]), float(x[-1])
    if hi <= lo:
        return [lo, hi]
    knots = [lo] + [float(c) for c in candidates if lo * 1.25 < c < hi / 1.25] + [hi]
    # Drop interior knots whose two neighbouring segments hold no measured count (the knot would float).
    changed = True
    while changed and len(knots) > 2:
        changed = False
        for i in range(1, len(knots) - 1):
            if not np.any((x > knots[i - 1]) & (x < knots[i + 1]) & (x != knots[i])) and not np.any(x == knots[i]):
                del knots[i]
                changed = True
                break
    return knots


@dataclass
class TermFit:
    """How one profile term was obtained, and how well the rows it acts on are predicted.

    :param value: the term's value (the knot values, seconds, for ``linear``).
    :param how: ``fitted``, ``base`` (taken from the base profile) or ``set`` (given by the user).
    :param source: the citation written into the profile.
    :param rows: rows the term acts on (its column non-zero).
    :param mape_pct: mean absolute percentage error over those rows, percent (None when no row).
    :param rel_stderr_pct: approximate standard error of a fitted value relative to it, percent (None when
        not fitted; for ``linear``, the largest over the knots).
    """

    value: float | list[float]
    how: str
    source: str
    rows: int = 0
    mape_pct: float | None = None
    rel_stderr_pct: float | None = None


@dataclass
class FitReport:
    """Outcome of :func:`fit_profile`: fit errors overall, per kind and per term, and every row's prediction.

    Errors are absolute percentage errors of the predicted against the measured seconds, in percent.
    """

    name: str
    data: list[str]
    rows_used: int
    rows_by_kind: dict[str, int]
    mape_pct: float
    by_kind: dict[str, dict[str, float]]
    terms: dict[str, TermFit]
    knots: list[float]
    predictions: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    holdout: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON serialisable)."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format(self) -> str:
        """A human-readable summary: errors by kind and by term (and on held-out rows when present)."""
        lines = [
            f"fit of profile '{self.name}' to {self.rows_used} rows of {', '.join(self.data)}",
            f"  MAPE overall {self.mape_pct:.2f} %",
        ]
        lines.append("  by kind:      rows    MAPE %  median %   p95 %")
        for kind, s in self.by_kind.items():
            lines.append(
                f"    {kind:<10} {s['n']:>6.0f} {s['mape_pct']:>9.2f} {s['median_ape_pct']:>9.2f} "
                f"{s['p95_ape_pct']:>7.2f}"
            )
        lines.append("  by term:                        how     value          rows  MAPE %  +-stderr %")
        for term, t in self.terms.items():
            val = f"{len(t.value)} knots" if isinstance(t.value, list) else f"{t.value:.4g}"
            mape = f"{t.mape_pct:7.2f}" if t.mape_pct is not None else "      -"
            se = f"{t.rel_stderr_pct:9.2f}" if t.rel_stderr_pct is not None else "        -"
            lines.append(f"    {term:<28} {t.how:<7} {val:<13} {t.rows:>5} {mape} {se}")
        if self.holdout:
            lines.append(
                f"  held-out rows ({self.holdout['rows']}, fraction {self.holdout['fraction']}, "
                f"seed {self.holdout['seed']}): MAPE {self.holdout['mape_pct']:.2f} %"
            )
            for kind, s in self.holdout["by_kind"].items():
                lines.append(
                    f"    {kind:<10} {s['n']:>6.0f} {s['mape_pct']:>9.2f} {s['median_ape_pct']:>9.2f} "
                    f"{s['p95_ape_pct']:>7.2f}"
                )
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def predict(model: LatencyModel, rows: Sequence[Measurement], with_overhead: bool = False) -> np.ndarray:
    """Predicted seconds of each row under ``model``.

    :param with_overhead: add the profile's per-step ``overhead_s`` to step rows (for measurements that
        include the engine's overhead); by default step rows are predicted as ``step_s - overhead_s``.
    """
    out = np.empty(len(rows))
    for i, m in enumerate(rows):
        if m.kind == "transfer":
            out[i] = model.kv_transfer_overhead_s + m.bytes / model.nic_bandwidth_Bps
        else:
            s = model.step_s(m.num_tokens, int(m.decode_seqs), m.decode_ctx_tokens, m.chunk_sq, m.chunk_cross)
            out[i] = s if with_overhead else s - model.overhead_s
    return out


def error_stats(measured: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Absolute percentage errors: count, mean (MAPE), median, 95th percentile, and signed mean bias (%)."""
    measured = np.asarray(measured, float)
    predicted = np.asarray(predicted, float)
    if len(measured) == 0:
        return {
            "n": 0,
            "mape_pct": math.nan,
            "median_ape_pct": math.nan,
            "p95_ape_pct": math.nan,
            "bias_pct": math.nan,
        }
    pct = 100.0 * (predicted - measured) / measured
    ape = np.abs(pct)
    return {
        "n": len(measured),
        "mape_pct": float(ape.mean()),
        "median_ape_pct": float(np.median(ape)),
        "p95_ape_pct": float(np.percentile(ape, 95)),
        "bias_pct": float(pct.mean()),
    }


def errors_by_kind(rows: Sequence[Measurement], predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """:func:`error_stats` per row kind (kinds present only), in :data:`KINDS` order."""
    measured = np.array([m.seconds for m in rows])
    kinds = np.array([m.kind for m in rows])
    return {k: error_stats(measured[kinds == k], predicted[kinds == k]) for k in KINDS if np.any(kinds == k)}


def _term_columns(rows: Sequence[Measurement]) -> dict[str, np.ndarray]:
    """Each attention term's multiplier per row (what the term's coefficient is multiplied by)."""
    return {
        "decode_attn_s_per_token": np.array([m.decode_ctx_tokens for m in rows], float),
        "decode_attn_s_per_seq": np.array([m.decode_seqs for m in rows], float),
        "prefill_attn_sq_s": np.array([m.chunk_sq for m in rows], float),
        "prefill_attn_cross_s": np.array([m.chunk_cross for m in rows], float),
    }


def _shortfall(term: str, rows: Sequence[Measurement]) -> str | None:
    """Why ``rows`` cannot determine ``term`` at all (too few rows / no variation), or None."""
    need, kinds, col = _REQUIREMENTS[term]
    vals = {getattr(m, col) for m in rows if m.kind in kinds}
    if col in ("chunk_tokens", "decode_seqs", "bytes", "decode_ctx_tokens"):
        vals.discard(0.0)
    if len(vals) >= need and any(v > 0 for v in vals):
        return None
    return (
        f"too few rows for term {term}: need >= {need} rows of kind {' or '.join(kinds)} with varying "
        f"column {col} (found {len(vals)} distinct non-zero value(s))"
    )


def _unexplained_fraction(a: np.ndarray, j: int) -> float:
    """How much of column j of ``a`` the other columns cannot reproduce (0: an exact combination of them)."""
    col = a[:, j]
    others = np.delete(a, j, axis=1)
    if others.shape[1] == 0:
        return 1.0
    coef, *_ = np.linalg.lstsq(others, col, rcond=None)
    return float(np.linalg.norm(col - others @ coef) / max(float(np.linalg.norm(col)), 1e-300))


def _origin_files(rows: Sequence[Measurement]) -> list[str]:
    files: list[str] = []
    for m in rows:
        f = m.origin.rsplit(":", 1)[0] if m.origin else "<rows>"
        if f not in files:
            files.append(f)
    return files


class _Terms:
    """Each profile term's value, how it was obtained and its source, while a fit is assembled.

    A term is fitted, set by the user, or taken from the base profile; one that can be none of these is
    recorded as a problem, so that the error names every missing term at once.
    """

    def __init__(self, base: LatencyModel | None, set_terms: Mapping[str, float], set_source: str):
        self.base, self.set_terms, self.set_source = base, set_terms, set_source
        self.values: dict[str, Any] = {}
        self.how: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self.stderr: dict[str, float] = {}
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def fitted(self, term: str, value: Any, source: str, stderr_pct: float) -> None:
        self.values[term], self.how[term], self.sources[term] = value, "fitted", source
        self.stderr[term] = stderr_pct

    def elsewhere(self, term: str, why: str) -> None:
        """Take ``term`` from the user's values or the base profile, or record ``why`` it cannot be had."""
        if term in self.set_terms:
            self.values[term], self.how[term] = float(self.set_terms[term]), "set"
            self.sources[term] = self.set_source
        elif self.base is not None:
            b = self.base
            self.values[term] = list(b.linear_s) if term == "linear" else getattr(b, term)
            self.how[term] = "base"
            orig = b.sources.get(term, "")
            self.sources[term] = f"from base profile '{b.name}' ({why})" + (f": {orig}" if orig else "")
        else:
            problem = f"{why}; or give a base profile (--base) to take it from there"
            if problem not in self.problems:  # one line for terms that share a reason (the transfer pair)
                self.problems.append(problem)


def fit_profile(
    rows: Sequence[Measurement],
    base: LatencyModel | None = None,
    knots: Sequence[float] | None = None,
    name: str | None = None,
    hardware: str | None = None,
    model: str | None = None,
    provenance: str = "",
    tensor_parallel: int | None = None,
    set_terms: Mapping[str, float] | None = None,
    set_source: str = "set by the user of deflectlab calibrate",
) -> tuple[LatencyModel, FitReport]:
    """Fit a latency profile to measured steps and transfers.

    :param rows: validated measurements (:func:`read_measurements`, :func:`vidur_rows`).
    :param base: profile to take terms from that the rows do not determine (and name, hardware, model,
        tensor-parallel degree, ``overhead_s`` and the KV sizes); without it such terms are an error.
    :param knots: knot positions of the linear curve, tokens; default :func:`auto_knots` of the step rows.
    :param name: profile name (default: the base's).
    :param hardware: accelerator name (default: the device the rows' ``profile-gpu`` sources name, else the
        base's, with a warning).
    :param model: model name (default: the shape the rows' ``profile-gpu`` sources name, else the base's, with
        a warning).
    :param provenance: free text appended to every fitted term's source (e.g. how the data was measured).
    :param tensor_parallel: tensor-parallel degree (default: the base's, else 1).
    :param set_terms: values for scalar terms given by the user; they are not fitted and override the base.
    :param set_source: the source written for ``set_terms``.
    :returns: the fitted profile and its :class:`FitReport`.
    :raises ValueError: a term neither the rows nor the base/set values determine (naming the rows needed).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("no measurement rows to fit")
    set_terms = dict(set_terms or {})
    bad = [t for t in set_terms if t not in SCALAR_TERMS]
    if bad:
        raise ValueError(f"unknown term(s) {bad} to set; known: {', '.join(SCALAR_TERMS)}")
    name = name or (base.name if base else None)
    found_hw, found_model = measured_names(rows)
    meta_notes = [f"{what} {getattr(base, what)!r} is the base profile's: the measurements do not name theirs "
                  f"(give --{what})" for what, given, found in (("hardware", hardware, found_hw),
                                                                  ("model", model, found_model))
                  if base is not None and not given and not found]
    hardware = hardware or found_hw or (base.hardware if base else None)
    model = model or found_model or (base.model if base else None)
    missing_meta = [k for k, v in (("name", name), ("hardware", hardware), ("model", model)) if not v]
    if missing_meta:
        raise ValueError(
            f"no {', '.join(missing_meta)} for the profile: give --{' --'.join(missing_meta)} or a base "
            "profile (--base) to take them from"
        )

    files = _origin_files(rows)
    row_sources = sorted({m.source for m in rows if m.source})
    data_desc = ", ".join(files)
    if row_sources:
        data_desc += " (" + "; ".join(row_sources[:3]) + ("; ..." if len(row_sources) > 3 else "") + ")"
    fit_desc = f"fit by deflectlab calibrate on {date.today().isoformat()}"
    tail = f" of {data_desc}" + (f"; {provenance}" if provenance else "")

    terms = _Terms(base, set_terms, set_source)
    terms.warnings += meta_notes
    for t in set_terms:
        terms.elsewhere(t, "")
    knot_list = _fit_step_terms([m for m in rows if m.kind in STEP_KINDS], knots, terms, fit_desc, tail)
    _fit_transfer_terms([m for m in rows if m.kind == "transfer"], terms, fit_desc, tail)
    for t in UNMEASURED_TERMS:
        if t in set_terms:
            continue
        why = (
            "not measured: seconds exclude the engine's per-step overhead (set it to 0 if yours include it)"
            if t == "overhead_s"
            else "not measured by step or transfer rows"
        )
        if base is not None:
            terms.elsewhere(t, why)
        else:
            terms.problems.append(f"term {t} is {why}: give --set {t}=VALUE or a base profile (--base)")
    if terms.problems:
        raise ValueError("cannot fit the profile:\n  " + "\n  ".join(terms.problems))

    if terms.how["linear"] == "base":
        assert base is not None
        knot_list = list(base.linear_tokens)
    scalar = {t: terms.values[t] for t in SCALAR_TERMS}
    for t in ("kv_bytes_per_token", "kv_capacity_tokens", "kv_block_tokens"):
        scalar[t] = int(scalar[t])
    calibration = {
        "data": files,
        "rows": len(rows),
        "date": date.today().isoformat(),
        "fitted": sorted(t for t, h in terms.how.items() if h == "fitted"),
        **({"base": base.name} if base else {}),
        **({"provenance": provenance} if provenance else {}),
    }
    fitted = LatencyModel(
        name=str(name),
        hardware=str(hardware),
        model=str(model),
        tensor_parallel=int(tensor_parallel or (base.tensor_parallel if base else 1)),
        linear_tokens=tuple(knot_list),
        linear_s=tuple(terms.values["linear"]),
        sources={t: terms.sources[t] for t in (*SCALAR_TERMS, "linear")},
        meta={"calibration": calibration},
        **scalar,
    )
    return fitted, _report(fitted, rows, terms, files, knot_list)


def _fit_step_terms(
    step_rows: list[Measurement], knots: Sequence[float] | None, terms: _Terms, fit_desc: str, tail: str
) -> list[float]:
    """Fit the linear knots and the free attention terms jointly to the step rows; returns the knots.

    Attention terms the rows cannot determine (too few rows, or a column the others reproduce exactly) are
    taken from elsewhere (:meth:`_Terms.elsewhere`).
    """
    if not step_rows:
        for t in ("linear", *ATTN_TERMS):
            if t not in terms.set_terms:
                terms.elsewhere(t, "no step rows of kind prefill, decode or mixed")
        return []
    short = _shortfall("linear", step_rows)
    if short:
        raise ValueError(short)
    n_tok = np.array([m.num_tokens for m in step_rows], float)
    knot_list = [float(k) for k in knots] if knots is not None else auto_knots(n_tok)
    basis = linear_basis(n_tok, knot_list)
    unused = [knot_list[i] for i in range(len(knot_list)) if not basis[:, i].any()]
    if unused:
        raise ValueError(
            f"no step row constrains the linear knot(s) at {unused} tokens; "
            "add rows of kind prefill at those token counts or move the knots"
        )
    cols = _term_columns(step_rows)
    free = []
    for t in ATTN_TERMS:
        short = _shortfall(t, step_rows)
        if t in terms.set_terms:
            continue
        if short:
            terms.elsewhere(t, short)
        else:
            free.append(t)
    y = np.array([m.seconds for m in step_rows], float)
    w = 1.0 / y
    # Drop the attention terms the rows cannot separate from the rest (a column that is a combination of
    # the others), one at a time, the worst first.
    while free:
        a = np.column_stack([basis] + [cols[t] for t in free]) * w[:, None]
        a = a / np.maximum(np.linalg.norm(a, axis=0), 1e-300)
        frac = {t: _unexplained_fraction(a, basis.shape[1] + i) for i, t in enumerate(free)}
        worst = min(frac, key=lambda t: frac[t])
        if frac[worst] > 1e-6:
            break
        free.remove(worst)
        why = f"term {worst} is not separable from the other terms by these rows: {_SEPARATION_HINTS[worst]}"
        terms.elsewhere(worst, why)
    if terms.problems:  # no fit: carry on only to collect every missing term
        return knot_list
    # Subtract the contribution of the attention terms that are fixed (set or from the base).
    fixed = [t for t in ATTN_TERMS if t not in free]
    target = y - sum((terms.values[t] * cols[t] for t in fixed), np.zeros_like(y))
    design = np.column_stack([basis] + [cols[t] for t in free])
    wd = design * w[:, None]
    rank = int(np.linalg.matrix_rank(wd / np.maximum(np.linalg.norm(wd, axis=0), 1e-300)))
    if rank < design.shape[1]:
        raise ValueError(
            f"the linear knots are not determined by these rows (rank {rank} < {design.shape[1]} unknowns); "
            "use fewer knots (--knots) or add prefill rows between them"
        )
    coef, se = _nnls_relative(design, target, w)
    k_vals = coef[: len(knot_list)]
    if np.any(k_vals <= 0):
        zero = [knot_list[i] for i in np.flatnonzero(k_vals <= 0)]
        terms.warnings.append(
            f"linear time fitted as 0 at knot(s) {zero} tokens; set to 1e-9 s (the attention terms explain "
            "those rows entirely: check the data or the knots)"
        )
        k_vals = np.maximum(k_vals, 1e-9)
    kinds_n = Counter(m.kind for m in step_rows)
    kinds_desc = ", ".join(f"{k} {kinds_n[k]}" for k in STEP_KINDS if kinds_n[k])
    desc = f"{fit_desc}: non-negative least squares, relative error, {len(step_rows)} step rows ({kinds_desc})"
    knots_desc = f"; knots at {[_num(k) for k in knot_list]} tokens"
    terms.fitted("linear", [float(v) for v in k_vals], desc + tail + knots_desc, float(np.max(se[: len(k_vals)])))
    for i, t in enumerate(free, start=len(knot_list)):
        terms.fitted(t, float(coef[i]), f"{desc} (+-{se[i]:.1f} % std. error){tail}", float(se[i]))
    return knot_list


def _fit_transfer_terms(xfer: list[Measurement], terms: _Terms, fit_desc: str, tail: str) -> None:
    """Fit ``seconds = kv_transfer_overhead_s + bytes / nic_bandwidth_Bps`` to the transfer rows."""
    free = [t for t in TRANSFER_TERMS if t not in terms.set_terms]
    if not free:
        return
    short = _shortfall("transfer", xfer)
    if short:
        for t in free:
            terms.elsewhere(t, short.replace("term transfer", "terms nic_bandwidth_Bps and kv_transfer_overhead_s"))
        return
    y = np.array([m.seconds for m in xfer], float)
    b = np.array([m.bytes for m in xfer], float)
    target = y.copy()
    if "nic_bandwidth_Bps" in terms.set_terms:
        target -= b / terms.values["nic_bandwidth_Bps"]
    if "kv_transfer_overhead_s" in terms.set_terms:
        target -= terms.values["kv_transfer_overhead_s"]
    cols = {"kv_transfer_overhead_s": np.ones_like(b), "nic_bandwidth_Bps": b}
    coef, se = _nnls_relative(np.column_stack([cols[t] for t in free]), target, 1.0 / y)
    desc = (
        f"{fit_desc}: seconds = overhead + bytes / bandwidth, non-negative least squares, relative error, "
        f"{len(xfer)} transfer rows"
    )
    for i, t in enumerate(free):
        value = float(coef[i])
        if t == "nic_bandwidth_Bps":
            if value <= 0:
                raise ValueError(
                    "transfer rows do not grow with bytes: nic_bandwidth_Bps is not determined (need "
                    "transfer rows over a wider range of bytes)"
                )
            value = 1.0 / value
        terms.fitted(t, value, f"{desc} (+-{se[i]:.1f} % std. error){tail}", float(se[i]))


def _report(
    fitted: LatencyModel, rows: list[Measurement], terms: _Terms, files: list[str], knots: list[float]
) -> FitReport:
    """Fit errors of ``fitted`` on ``rows``: overall, per kind, per term (over the rows each acts on)."""
    pred = predict(fitted, rows)
    measured = np.array([m.seconds for m in rows])
    ape = 100.0 * np.abs(pred - measured) / measured
    cols = _term_columns(rows)
    is_step = np.array([m.kind in STEP_KINDS for m in rows])
    acts = {"linear": is_step, **{t: cols[t] > 0 for t in ATTN_TERMS}}
    acts.update({t: ~is_step for t in TRANSFER_TERMS})
    term_fits: dict[str, TermFit] = {}
    for t in ("linear", *ATTN_TERMS, *TRANSFER_TERMS, *UNMEASURED_TERMS):
        mask = acts.get(t, np.zeros(len(rows), bool))
        n = int(mask.sum())
        term_fits[t] = TermFit(
            value=terms.values[t] if t == "linear" else float(terms.values[t]),
            how=terms.how[t],
            source=terms.sources[t],
            rows=n,
            mape_pct=float(ape[mask].mean()) if n else None,
            rel_stderr_pct=terms.stderr.get(t),
        )
    return FitReport(
        name=fitted.name,
        data=files,
        rows_used=len(rows),
        rows_by_kind=dict(Counter(m.kind for m in rows)),
        mape_pct=float(ape.mean()),
        by_kind=errors_by_kind(rows, pred),
        terms=term_fits,
        knots=[float(k) for k in knots],
        predictions=row_predictions(rows, pred),
        warnings=terms.warnings + quality_warnings(term_fits, None),
    )


def row_predictions(rows: Sequence[Measurement], pred: np.ndarray) -> list[dict[str, Any]]:
    """One record per row: origin, kind, measured and predicted seconds, error in percent."""
    return [
        {
            "origin": m.origin,
            "kind": m.kind,
            "measured_s": float(m.seconds),
            "predicted_s": float(p),
            "error_pct": float(100.0 * (p - m.seconds) / m.seconds),
        }
        for m, p in zip(rows, pred)
    ]


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _nnls_relative(design: np.ndarray, target: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative least squares of ``design @ x ~ target`` with row weights ``w``.

    Columns are scaled to unit norm for conditioning. Returns the coefficients and each one's approximate
    standard error relative to it, percent (from the unconstrained covariance; inf for a zero coefficient).
    """
    from scipy.optimize import nnls

    a = design * w[:, None]
    b = target * w
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    x_s, _ = nnls(a / scale, b, maxiter=50 * a.shape[1])
    coef = x_s / scale
    dof = max(a.shape[0] - a.shape[1], 1)
    sigma2 = float(np.sum((a @ coef - b) ** 2) / dof)
    cov_s = sigma2 * np.linalg.pinv((a / scale).T @ (a / scale))
    se = np.sqrt(np.clip(np.diag(cov_s), 0, None)) / scale
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(coef > 0, 100.0 * se / np.where(coef > 0, coef, 1.0), np.inf)
    return coef, rel


def split_holdout(
    rows: Sequence[Measurement], fraction: float, rng: np.random.Generator
) -> tuple[list[Measurement], list[Measurement]]:
    """Split rows into (fit, held-out), stratified by kind so every kind stays in the fit.

    :param fraction: share of each kind's rows held out, in [0, 1).
    :param rng: the one random generator of the caller (seeded there).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    fit: list[Measurement] = []
    held: list[Measurement] = []
    for kind in KINDS:
        idx = [i for i, m in enumerate(rows) if m.kind == kind]
        if not idx:
            continue
        perm = rng.permutation(len(idx))
        n_held = min(round(fraction * len(idx)), len(idx) - 2) if len(idx) > 2 else 0
        held_set = set(perm[: max(n_held, 0)].tolist())
        for j, i in enumerate(idx):
            (held if j in held_set else fit).append(rows[i])
    return fit, held


def with_holdout(
    report: FitReport, profile: LatencyModel, held: Sequence[Measurement], fraction: float, seed: int
) -> FitReport:
    """The report with the profile's errors on held-out rows attached (``report.holdout``)."""
    pred = predict(profile, held)
    holdout: dict[str, Any] = {"fraction": fraction, "seed": seed, "rows": len(held)}
    holdout["mape_pct"] = error_stats(np.array([m.seconds for m in held]), pred)["mape_pct"]
    holdout["by_kind"] = errors_by_kind(held, pred)
    holdout["predictions"] = row_predictions(held, pred)
    return replace(report, holdout=holdout, warnings=report.warnings + quality_warnings({}, holdout))


def read_many(paths: Collection[str | Path]) -> list[Measurement]:
    """Rows of several measurement CSVs, in order."""
    rows: list[Measurement] = []
    for p in paths:
        rows += read_measurements(p)
    return rows
