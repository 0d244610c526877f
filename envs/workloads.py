"""Workloads: request traces read from public files, and the arrival streams the simulator replays.

Formats read by :func:`load_trace` (the format is taken from the suffix or the header, or given as ``fmt``):

``azure``
    Azure LLM inference traces (Patel et al., "Splitwise", ISCA 2024; the 2024 week-long traces have the
    same schema). CSV with header ``TIMESTAMP,ContextTokens,GeneratedTokens``. ``TIMESTAMP`` is wall-clock
    time ``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fractional digits in 2023, more than ``datetime`` accepts) or,
    in 2024, timezone-aware (``...+00:00``); any 0-9 fractional digits and a ``Z`` / ``+HH:MM`` offset are
    accepted, but all rows of a file must agree on naive or aware. ``ContextTokens`` is the prompt length,
    ``GeneratedTokens`` the output length, in tokens.
``mooncake``
    Mooncake traces (Qin et al., FAST 2025). JSON Lines, one object per request:
    ``{"timestamp": ms from trace start, "input_length": tokens, "output_length": tokens,
    "hash_ids": [prefix block hashes, 512 tokens a block]}``. ``hash_ids`` may be absent from a whole file,
    but not from only some lines.
``burstgpt``
    BurstGPT (``HPMLL/BurstGPT``). CSV with header ``Timestamp,Model,Request tokens,Response tokens,Total
    tokens,Log Type``; ``Timestamp`` in seconds. BurstGPT logs failed requests with ``Response tokens`` 0:
    they are an error unless ``load_trace(..., drop_failed=True)`` drops them.

Conventions. Times are seconds, lengths tokens. A :class:`Trace` keeps a file's requests in file order with
arrivals re-based so the first is 0.0. Timestamps may repeat but never decrease; token counts are > 0.
Blank lines hold no request and are passed over; anything else that is not a valid request is a
:class:`WorkloadError` naming the file, the 1-based line as in the file, and the problem. Nothing is skipped
silently.

Purity. :func:`make_workload` is a pure function of its arguments (and the file's contents): the same
arguments give identical arrays. All randomness comes from one ``numpy.random.default_rng(seed)`` created
inside the call; the global numpy and ``random`` states are neither read nor changed. Synthetic arrivals
draw the inter-arrival gaps first and then the indices of the sampled lengths, so that order is part of
the contract. Gaps are never clipped: bursts are what this project studies.

Every :class:`Workload` starts with a request at time 0. Its ``duration_s`` is the time from the first to
the last arrival and its ``mean_rate`` is ``(len - 1) / duration_s``, one over the mean gap, so that
rescaling a trace to ``rate`` gives a workload whose ``mean_rate`` is exactly ``rate``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import re
from collections.abc import Iterator
from dataclasses import InitVar, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.envs.config import check_number

DATA_DIR = Path(__file__).resolve().parent / "data"

#: Bundled traces: name -> file in ``envs/data`` (see ``envs/data/README.md`` for source and licence).
BUNDLED: dict[str, Path] = {
    "azure_code": DATA_DIR / "AzureLLMInferenceTrace_code_first30min.csv",
    "azure_conv": DATA_DIR / "AzureLLMInferenceTrace_conv_first30min.csv",
    "mooncake_synthetic": DATA_DIR / "mooncake_synthetic_trace.jsonl",
}

FORMATS = ("azure", "mooncake", "burstgpt")

#: Tokens one Mooncake ``hash_ids`` entry stands for: "each hash id represents a block of 512 tokens" (README of
#: ``kvcache-ai/Mooncake`` ``FAST25-release/traces``; given by the trace format, not fitted). Mooncake is the
#: only format here with hashes; Azure and BurstGPT traces have none and get no prefix-cache hits.
MOONCAKE_HASH_BLOCK_TOKENS = 512
ARRIVALS = ("trace", "poisson", "gamma", "onoff")

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")

# Date, time, optional fraction (any precision up to ns), optional UTC offset.
_TS_RE = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?")
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_NS = 1_000_000_000


class WorkloadError(ValueError):
    """A trace file or a workload request is malformed; the message names the file, line and problem."""


#: how make_workload's argument errors are raised (the one number checker, envs.config.check_number)
_MW: dict[str, Any] = {"what": "make_workload", "error": WorkloadError}


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _check_requests(
    where: str, arrival_s: Any, input_tokens: Any, output_tokens: Any, hash_ids: Any, chains: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coerce and check the per-request arrays shared by :class:`Trace` and :class:`Workload`; ``chains``: also
    check that the block hashes chain (not for hash lists taken from a checked trace)."""
    arr = np.asarray(arrival_s, dtype=np.float64)
    inp = np.asarray(input_tokens, dtype=np.int64)
    out = np.asarray(output_tokens, dtype=np.int64)
    if arr.ndim != 1 or inp.shape != arr.shape or out.shape != arr.shape:
        raise WorkloadError(
            f"{where}: arrival_s, input_tokens and output_tokens must be 1-D of equal length, "
            f"got shapes {arr.shape}, {inp.shape}, {out.shape}"
        )
    if len(arr) == 0:
        raise WorkloadError(f"{where}: no requests")
    if not np.all(np.isfinite(arr)):
        raise WorkloadError(
            f"{where}: arrival_s has a non-finite value at index {int(np.argmin(np.isfinite(arr)))}"
        )
    bad = np.flatnonzero(np.diff(arr) < 0)
    if bad.size:
        raise WorkloadError(f"{where}: arrival_s decreases at index {int(bad[0]) + 1}")
    for name, a in (("input_tokens", inp), ("output_tokens", out)):
        bad = np.flatnonzero(a <= 0)
        if bad.size:
            raise WorkloadError(f"{where}: {name} must be > 0, got {int(a[bad[0]])} at index {int(bad[0])}")
    if hash_ids is not None:
        if len(hash_ids) != len(arr):
            raise WorkloadError(f"{where}: hash_ids has {len(hash_ids)} entries for {len(arr)} requests")
        if chains:
            check_hash_chains(hash_ids, where)
    return arr, inp, out


_ROOT, _NONE = object(), object()  # check_hash_chains: the parent of a prompt's first block; no parent seen yet


def check_hash_chains(hash_ids: list[list[int]], where: str, lines: list[int] | None = None) -> None:
    """Refuse block hashes that do not chain. Mooncake's ``hash_ids`` are prefix hashes: a block's id stands for
    every block before it too, so one id always follows the same id (the first block of a prompt has none before
    it). The prefix cache relies on that (``envs.prefix_cache``: a lookup matches a span by its first and last
    blocks); a list where one id follows two different ones, or comes first in one prompt and later in another,
    names the requests (by index, or by ``lines``: each request's line in the file)."""
    parent: dict[int, Any] = {}
    first: dict[int, int] = {}  # the request where each id was first seen (for the message)
    for i, hs in enumerate(hash_ids):
        prev = _ROOT
        for h in hs:
            p = parent.get(h, _NONE)
            if p is _NONE:
                parent[h] = prev
                first[h] = i
            elif p is not prev and p != prev:
                a, b = (f"line {lines[i]}", f"line {lines[first[h]]}") if lines else (f"request {i}",
                                                                                        f"request {first[h]}")
                raise WorkloadError(
                    f"{where}: hash_ids do not chain: block {h} comes {_after(prev)} in {a} but {_after(p)} "
                    f"in {b}; prefix-cache hashes must cover every block before theirs (one id, one "
                    "prefix), as Mooncake's do")
            prev = h


def _after(x: Any) -> str:
    return "first in its prompt" if x is _ROOT else f"after block {x}"


@dataclass(frozen=True, eq=False)
class Trace:
    """The raw requests of one trace file, in file order.

    Traces are cached by :func:`load_trace` and shared: the arrays are read-only, and ``hash_ids`` must not
    be changed in place (:func:`make_workload` copies what it takes).

    :param name: short name, e.g. ``azure_code`` for a bundled trace, else the file stem.
    :param arrival_s: arrival times, seconds from the first request (the first is 0.0), non-decreasing.
    :param input_tokens: prompt length of each request, tokens, > 0.
    :param output_tokens: output length of each request, tokens, > 0.
    :param hash_ids: Mooncake prefix-block hashes per request (512 tokens a block), else None.
    :param source: the path read, or the bundled name.
    :param fmt: the file format, one of :data:`FORMATS`.
    """

    name: str
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[list[int]] | None
    source: str
    fmt: str = ""
    #: the hash lists were checked to chain already (the file reader does it, naming lines): not checked again
    hashes_checked: InitVar[bool] = False

    def __post_init__(self, hashes_checked: bool) -> None:
        arr, inp, out = _check_requests(
            f"Trace {self.name!r}", self.arrival_s, self.input_tokens, self.output_tokens, self.hash_ids,
            chains=not hashes_checked,
        )
        if arr[0] != 0.0:
            raise WorkloadError(f"Trace {self.name!r}: arrival_s must start at 0.0, got {arr[0]!r}")
        object.__setattr__(self, "arrival_s", _readonly(arr.copy()))
        object.__setattr__(self, "input_tokens", _readonly(inp.copy()))
        object.__setattr__(self, "output_tokens", _readonly(out.copy()))

    def __len__(self) -> int:
        return len(self.arrival_s)


@dataclass(frozen=True, eq=False)
class Workload:
    """The requests the simulator replays: arrival times and (input, output) lengths.

    :param arrival_s: arrival times, seconds, non-decreasing (from :func:`make_workload` the first is 0.0).
    :param input_tokens: prompt length of each request, tokens, > 0.
    :param output_tokens: output length of each request, tokens, > 0.
    :param hash_ids: prefix-block hashes per request when the source has them (Mooncake), else None.
    :param meta: how the workload was made (source, format, window, arrival process, rate, seed, ...);
        JSON-serialisable, meant to be written beside results.
    :param hash_block_tokens: prompt tokens one entry of ``hash_ids`` stands for (the trace format's block).
    """

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[list[int]] | None = None
    meta: dict = field(default_factory=dict)
    hash_block_tokens: int = MOONCAKE_HASH_BLOCK_TOKENS
    #: the hash lists come from a :class:`Trace` (checked to chain): not checked again (make_workload)
    hashes_checked: InitVar[bool] = False

    def __post_init__(self, hashes_checked: bool) -> None:
        arr, inp, out = _check_requests(
            "Workload", self.arrival_s, self.input_tokens, self.output_tokens, self.hash_ids,
            chains=not hashes_checked,
        )
        object.__setattr__(self, "arrival_s", arr)
        object.__setattr__(self, "input_tokens", inp)
        object.__setattr__(self, "output_tokens", out)
        check_number(self.hash_block_tokens, "hash_block_tokens", lo=1, integer=True, unit="tokens",
                     what="Workload", error=WorkloadError)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival, seconds."""
        return float(self.arrival_s[-1] - self.arrival_s[0])

    @property
    def mean_rate(self) -> float:
        """Requests per second, ``(len - 1) / duration_s`` (one over the mean gap); NaN if undefined."""
        d = self.duration_s
        return (len(self) - 1) / d if d > 0 else math.nan


# --------------------------------------------------------------------------------------------- readers


def _parse_timestamp_ns(text: str, day_cache: dict[str, int]) -> tuple[int, bool] | None:
    """``YYYY-MM-DD HH:MM:SS[.f...][offset]`` -> (ns since the epoch in UTC, aware?) or None if unparsable."""
    m = _TS_RE.fullmatch(text.strip())
    if m is None:
        return None
    date, hh, mm, ss, frac, tz = m.groups()
    days = day_cache.get(date)
    if days is None:
        try:
            days = _dt.date.fromisoformat(date).toordinal() - _EPOCH_ORDINAL
        except ValueError:
            return None
        day_cache[date] = days
    h, mi, s = int(hh), int(mm), int(ss)
    if h > 23 or mi > 59 or s > 59:
        return None
    ns = ((days * 24 + h) * 60 + mi) * 60 + s
    ns *= _NS
    if frac:
        ns += int(frac) * 10 ** (9 - len(frac))
    if tz and tz != "Z":
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        oh, om = int(digits[:2]), int(digits[2:])
        if oh > 23 or om > 59:
            return None
        ns -= sign * (oh * 3600 + om * 60) * _NS
    return ns, tz is not None


def _positive_int(text: str, column: str, where: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise WorkloadError(f"{where}: {column} {text!r} is not an integer") from None
    if v <= 0:
        raise WorkloadError(f"{where}: {column} must be > 0 tokens, got {v}")
    return v


def _csv_rows(path: Path, required: tuple[str, ...], fmt: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, row) for the data rows of a CSV file, with the column indices of ``required``."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = None
        for row in reader:
            if any(c.strip() for c in row):
                header = [c.strip() for c in row]
                break
        if header is None:
            raise WorkloadError(f"{path}:1: empty file (no header)")
        hline = reader.line_num
        missing = [c for c in required if c not in header]
        if missing:
            raise WorkloadError(
                f"{path}:{hline}: missing column(s) {', '.join(missing)} for the {fmt} format; "
                f"header is {header}"
            )
        idx = tuple(header.index(c) for c in required)
        yield hline, idx
        ncols = len(header)
        for row in reader:
            if len(row) != ncols:
                if not any(c.strip() for c in row):
                    continue  # a blank line holds no request
                raise WorkloadError(f"{path}:{reader.line_num}: expected {ncols} fields, got {len(row)}")
            yield reader.line_num, row


def _read_azure(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
    rows = _csv_rows(path, _AZURE_COLUMNS, "azure")
    hline, (i_ts, i_in, i_out) = next(rows)
    ts: list[int] = []
    inp: list[int] = []
    out: list[int] = []
    day_cache: dict[str, int] = {}
    aware0: bool | None = None
    prev = None
    for line, row in rows:
        where = f"{path}:{line}"
        parsed = _parse_timestamp_ns(row[i_ts], day_cache)
        if parsed is None:
            raise WorkloadError(
                f"{where}: unparsable TIMESTAMP {row[i_ts]!r} (expected YYYY-MM-DD HH:MM:SS.fffffff[+HH:MM])"
            )
        t, aware = parsed
        if aware0 is None:
            aware0 = aware
        elif aware != aware0:
            raise WorkloadError(f"{where}: TIMESTAMP {row[i_ts]!r} mixes timezone-aware and naive timestamps")
        if prev is not None and t < prev:
            raise WorkloadError(f"{where}: timestamps not sorted: {row[i_ts]!r} is before the previous row")
        prev = t
        inp.append(_positive_int(row[i_in], "ContextTokens", where))
        out.append(_positive_int(row[i_out], "GeneratedTokens", where))
        ts.append(t)
    if not ts:
        raise WorkloadError(f"{path}:{hline + 1}: no requests after the header")
    # Subtract in Python ints: float64 epoch nanoseconds would lose the sub-microsecond digits.
    t0 = ts[0]
    arrival = np.array([t - t0 for t in ts], dtype=np.int64) / _NS
    return arrival, np.array(inp, dtype=np.int64), np.array(out, dtype=np.int64), None


def _read_burstgpt(path: Path, drop_failed: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
    rows = _csv_rows(path, _BURSTGPT_COLUMNS, "burstgpt")
    hline, (i_ts, i_in, i_out) = next(rows)
    ts: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    dropped = 0
    prev = -math.inf
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            t = float(row[i_ts])
        except ValueError:
            raise WorkloadError(f"{where}: unparsable Timestamp {row[i_ts]!r} (expected seconds)") from None
        if not math.isfinite(t):
            raise WorkloadError(f"{where}: Timestamp {row[i_ts]!r} is not finite")
        if t < prev:
            raise WorkloadError(
                f"{where}: timestamps not sorted: {t} s is before the previous row's {prev} s"
            )
        prev = t
        try:
            resp = int(row[i_out])
        except ValueError:
            raise WorkloadError(f"{where}: Response tokens {row[i_out]!r} is not an integer") from None
        if resp == 0:
            if drop_failed:
                dropped += 1
                continue
            raise WorkloadError(
                f"{where}: Response tokens is 0, which BurstGPT uses for a failed request; "
                "pass drop_failed=True to drop failed requests"
            )
        if resp < 0:
            raise WorkloadError(f"{where}: Response tokens must be > 0 tokens, got {resp}")
        inp.append(_positive_int(row[i_in], "Request tokens", where))
        out.append(resp)
        ts.append(t)
    if not ts:
        extra = f" ({dropped} failed requests dropped)" if dropped else ""
        raise WorkloadError(f"{path}:{hline + 1}: no requests after the header{extra}")
    arrival = np.array(ts, dtype=np.float64)
    return arrival - arrival[0], np.array(inp, dtype=np.int64), np.array(out, dtype=np.int64), None


def _json_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _mooncake_record(text: str, where: str) -> dict[str, Any]:
    """One line of a mooncake trace as a JSON object with a finite timestamp and positive integer lengths."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in _MOONCAKE_KEYS if k not in rec]
    if missing:
        raise WorkloadError(f"{where}: missing key(s) {', '.join(missing)} for the mooncake format")
    t = rec["timestamp"]
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
        raise WorkloadError(f"{where}: unparsable timestamp {t!r} (expected milliseconds)")
    for key in ("input_length", "output_length"):
        v = rec[key]
        if not _json_int(v):
            raise WorkloadError(f"{where}: {key} {v!r} is not an integer")
        if v <= 0:
            raise WorkloadError(f"{where}: {key} must be > 0 tokens, got {v}")
    return rec


def _read_mooncake(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]] | None]:
    ts: list[float] = []
    inp: list[int] = []
    out: list[int] = []
    hashes: list[list[int]] = []
    lines: list[int] = []  # each request's line
    ids: dict[int, int] = {}
    has_hashes: bool | None = None
    prev = -math.inf
    last_line = 0
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            last_line = line
            if not text.strip():
                continue  # a blank line holds no request
            where = f"{path}:{line}"
            rec = _mooncake_record(text, where)
            t = rec["timestamp"]
            if t < prev:
                raise WorkloadError(
                    f"{where}: timestamps not sorted: {t} ms is before the previous line's {prev} ms"
                )
            prev = t
            h = rec.get("hash_ids")
            if has_hashes is None:
                has_hashes = h is not None
            elif has_hashes != (h is not None):
                raise WorkloadError(f"{where}: hash_ids present on some lines but not others")
            if h is not None:
                if not isinstance(h, list) or not all(_json_int(x) for x in h):
                    raise WorkloadError(f"{where}: hash_ids must be a list of integers")
                # one int object per distinct hash (JSON parsing makes one per occurrence): the prefix cache then
                # compares shared blocks by identity, and the trace takes less memory
                hashes.append([ids.setdefault(x, x) for x in h])
                lines.append(line)
            ts.append(t)
            inp.append(rec["input_length"])
            out.append(rec["output_length"])
    if not ts:
        raise WorkloadError(f"{path}:{max(last_line, 1)}: empty file (no requests)")
    if has_hashes:
        check_hash_chains(hashes, str(path), lines)  # here, to name the lines (the Trace does not check again)
    arrival = np.array(ts, dtype=np.float64)
    arrival = (arrival - arrival[0]) / 1000.0
    return (
        arrival,
        np.array(inp, dtype=np.int64),
        np.array(out, dtype=np.int64),
        hashes if has_hashes else None,
    )


def _detect_format(path: Path) -> str:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return "mooncake"
    with open(path, newline="", encoding="utf-8-sig") as f:
        first = ""
        for first in f:
            if first.strip():
                break
    if not first.strip():
        raise WorkloadError(f"{path}:1: empty file (no header)")
    if first.lstrip().startswith("{"):
        return "mooncake"
    header = [c.strip() for c in next(csv.reader([first]))]
    if "TIMESTAMP" in header:
        return "azure"
    if "Timestamp" in header or "Request tokens" in header:
        return "burstgpt"
    raise WorkloadError(
        f"{path}:1: cannot tell the format from the header {header}; expected azure "
        f"({','.join(_AZURE_COLUMNS)}), burstgpt (Timestamp,Model,Request tokens,Response tokens,...) "
        "or mooncake JSON Lines; pass fmt= to choose"
    )


def _parse(path: Path, fmt: str | None, drop_failed: bool, name: str, source: str) -> Trace:
    fmt = fmt or _detect_format(path)
    if drop_failed and fmt != "burstgpt":
        raise WorkloadError(f"{path}: drop_failed applies only to the burstgpt format, not {fmt}")
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray, list[list[int]] | None]
    if fmt == "azure":
        arrays = _read_azure(path)
    elif fmt == "mooncake":
        arrays = _read_mooncake(path)
    else:
        arrays = _read_burstgpt(path, drop_failed)
    arrival, inp, out, hashes = arrays
    return Trace(name, arrival, inp, out, hashes, source, fmt, hashes_checked=hashes is not None)


@lru_cache(maxsize=16)
def _parse_cached(
    path: str, mtime_ns: int, size: int, fmt: str | None, drop_failed: bool, name: str, source: str
) -> Trace:
    # mtime and size are part of the key so that an edited file is read again.
    return _parse(Path(path), fmt, drop_failed, name, source)


def load_trace(source: str | Path, fmt: str | None = None, *, drop_failed: bool = False) -> Trace:
    """Read a trace file (or a bundled trace) into a :class:`Trace`.

    Parsed traces are cached in-process, keyed by the file's path, modification time and size, so repeated
    loads are cheap; the returned arrays are read-only.

    :param source: a bundled name (a key of :data:`BUNDLED`, e.g. ``"azure_code"``) or a file path.
    :param fmt: ``"azure"``, ``"mooncake"`` or ``"burstgpt"``; None to detect it from the suffix
        (``.jsonl``/``.json`` is mooncake) or the CSV header.
    :param drop_failed: BurstGPT only: drop requests logged with 0 response tokens (failed requests)
        instead of raising.
    :raises WorkloadError: unknown name or missing file, or a malformed file (message names file and line).
    """
    if fmt is not None and fmt not in FORMATS:
        raise WorkloadError(f"load_trace: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if isinstance(source, str) and source in BUNDLED:
        path, name, label = BUNDLED[source], source, source
    else:
        path = Path(source)
        name, label = path.stem, str(source)
        if not path.is_file():
            looks_like_name = isinstance(source, str) and not path.suffix and len(path.parts) == 1
            what = "unknown bundled trace name" if looks_like_name else "no such file"
            raise WorkloadError(f"{source}: {what}; bundled traces: {', '.join(sorted(BUNDLED))}")
    st = path.stat()
    return _parse_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, fmt, drop_failed, name, label)


# ----------------------------------------------------------------------------------------- workloads


def _gaps(
    rng: np.random.Generator, arrival: str, n: int, rate: float, cv: float, on_s: float, off_s: float
) -> np.ndarray:
    """Arrival times of ``n`` requests, the first at 0, for a synthetic process. Gaps are never clipped."""
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    elif arrival == "gamma":
        shape = 1.0 / (cv * cv)  # gamma CV = 1/sqrt(shape); mean = shape * scale = 1/rate
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    else:  # onoff: Poisson at the on-rate in "on-time", then insert an off period after every on_s of it
        on_rate = rate * (on_s + off_s) / on_s
        u = np.concatenate(([0.0], np.cumsum(rng.exponential(1.0 / on_rate, size=n - 1))))
        return u + np.floor(u / on_s) * off_s
    return np.concatenate(([0.0], np.cumsum(gaps)))


def make_workload(
    source: str | Path | Trace,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    num_requests: int | None = None,
    rate: float | None = None,
    arrival: str = "trace",
    cv: float = 1.0,
    on_s: float = 10.0,
    off_s: float = 30.0,
    seed: int = 0,
) -> Workload:
    """Build the workload the simulator replays from a trace window. A pure function of its arguments.

    The window is the trace's requests with arrival in ``[start_s, start_s + duration_s)``; arrivals are
    re-based so the workload's first request is at 0.

    :param source: a bundled name, a trace file path, or a loaded :class:`Trace`.
    :param start_s: window start, seconds from the trace's first request.
    :param duration_s: window length, seconds; None runs to the end of the trace.
    :param num_requests: with ``arrival="trace"``, keep at most this many of the window's requests (the
        first ones); with a synthetic arrival, generate exactly this many (default: as many as the window
        has).
    :param rate: target mean rate, requests per second. With ``"trace"``, arrival offsets are multiplied by
        ``window mean rate / rate`` (this keeps the CV of the gaps; None keeps the recorded times). Required
        for the synthetic processes.
    :param arrival: ``"trace"`` (recorded times), ``"poisson"`` (exponential gaps), ``"gamma"`` (gamma gaps
        with coefficient of variation ``cv``) or ``"onoff"`` (Poisson during on periods of ``on_s`` seconds
        at ``rate * (on_s + off_s) / on_s``, nothing during off periods of ``off_s`` seconds; long-run mean
        ``rate``). Synthetic processes sample (input, output) pairs jointly, with replacement, from the
        window.
    :param cv: coefficient of variation of the gaps for ``"gamma"`` (1 is Poisson), > 0.
    :param on_s: length of an on period for ``"onoff"``, seconds, > 0.
    :param off_s: length of an off period for ``"onoff"``, seconds, >= 0.
    :param seed: seed of the one ``numpy.random.Generator`` used (synthetic arrivals only).
    :raises WorkloadError: bad arguments, an empty window, or a malformed trace file.
    """
    if arrival not in ARRIVALS:
        raise WorkloadError(f"make_workload: unknown arrival {arrival!r}; known: {', '.join(ARRIVALS)}")
    start_s = check_number(start_s, "start_s", lo=0.0, unit="s", **_MW)
    if duration_s is not None:
        duration_s = check_number(duration_s, "duration_s", lo=0.0, lo_open=True, unit="s", **_MW)
    if num_requests is not None:
        num_requests = check_number(num_requests, "num_requests", lo=1, integer=True, **_MW)
    if rate is not None:
        rate = check_number(rate, "rate", lo=0.0, lo_open=True, unit="req/s", **_MW)
    elif arrival != "trace":
        raise WorkloadError(f"make_workload: arrival={arrival!r} needs rate (req/s)")
    if arrival == "gamma":
        cv = check_number(cv, "cv", lo=0.0, lo_open=True, **_MW)
    if arrival == "onoff":
        on_s = check_number(on_s, "on_s", lo=0.0, lo_open=True, unit="s", **_MW)
        off_s = check_number(off_s, "off_s", lo=0.0, unit="s", **_MW)
    seed = check_number(seed, "seed", lo=0, integer=True, **_MW)

    trace = source if isinstance(source, Trace) else load_trace(source)
    t = trace.arrival_s
    lo = int(np.searchsorted(t, start_s, side="left"))
    hi = len(t) if duration_s is None else int(np.searchsorted(t, start_s + duration_s, side="left"))
    end = "end" if duration_s is None else f"{start_s + duration_s:g}"
    if hi <= lo:
        raise WorkloadError(
            f"{trace.source}: window [{start_s:g}, {end}) s holds no requests "
            f"(the trace's arrivals span 0-{float(t[-1]):g} s)"
        )
    window_n = hi - lo
    window_span = float(t[hi - 1] - t[lo])
    meta: dict[str, Any] = {
        "source": trace.source,
        "trace": trace.name,
        "format": trace.fmt,
        "window": {
            "start_s": start_s,
            "duration_s": duration_s,
            "num_requests": num_requests,
            "requests": window_n,
            "mean_rate": (window_n - 1) / window_span if window_span > 0 else None,
        },
        "arrival": arrival,
        "rate": rate,
    }

    if arrival == "trace":
        if num_requests is not None:
            hi = min(hi, lo + num_requests)
        arr = t[lo:hi] - t[lo]
        if rate is not None:
            span = float(arr[-1])
            if span <= 0:
                raise WorkloadError(
                    f"{trace.source}: cannot rescale to rate={rate:g} req/s: "
                    f"the {hi - lo} selected request(s) span 0 s"
                )
            scale = ((hi - lo - 1) / span) / rate
            arr = arr * scale
            meta["time_scale"] = scale
        idx = slice(lo, hi)
        inp, out = trace.input_tokens[idx].copy(), trace.output_tokens[idx].copy()
        hashes = None if trace.hash_ids is None else [list(h) for h in trace.hash_ids[lo:hi]]
        meta["seed"] = None
    else:
        rng = np.random.default_rng(seed)
        n = num_requests if num_requests is not None else window_n
        assert rate is not None
        arr = _gaps(rng, arrival, n, rate, cv, on_s, off_s)
        pick = rng.integers(lo, hi, size=n)
        inp, out = trace.input_tokens[pick], trace.output_tokens[pick]
        hashes = None if trace.hash_ids is None else [list(trace.hash_ids[i]) for i in pick]
        meta["seed"] = int(seed)
        if arrival == "gamma":
            meta["cv"] = cv
        if arrival == "onoff":
            meta.update(on_s=on_s, off_s=off_s, on_rate=rate * (on_s + off_s) / on_s)
    meta["requests"] = len(arr)
    return Workload(np.array(arr, dtype=np.float64), inp, out, hashes, meta, hashes_checked=True)


def trace_stats(t: Trace | Workload) -> dict[str, float | int]:
    """Summary statistics of a trace or workload, as in ``envs/data/README.md``.

    ``cv`` is std/mean of the inter-arrival gaps (population std; Poisson gives 1). ``peak_rate_1s`` and
    ``peak_rate_10s`` are the largest request count in aligned k-second bins (from the first arrival) over k.
    Percentiles use numpy's default (linear) interpolation.

    :param t: a :class:`Trace` or :class:`Workload`.
    :returns: requests, duration_s (s), mean_rate (req/s, one over the mean gap), cv, peak_rate_1s,
        peak_rate_10s (req/s), and input_/output_ mean, p50, p95, p99, max (tokens).
    """
    arr = np.asarray(t.arrival_s, dtype=np.float64)
    arr = arr - arr[0]
    n = len(arr)
    duration = float(arr[-1])
    gaps = np.diff(arr)
    stats: dict[str, float | int] = {
        "requests": n,
        "duration_s": duration,
        "mean_rate": (n - 1) / duration if duration > 0 else math.nan,
        "cv": float(gaps.std() / gaps.mean()) if n > 2 and gaps.mean() > 0 else math.nan,
    }
    for k in (1, 10):
        stats[f"peak_rate_{k}s"] = float(np.bincount((arr // k).astype(np.int64)).max() / k)
    for name, a in (("input", t.input_tokens), ("output", t.output_tokens)):
        a = np.asarray(a)
        stats[f"{name}_mean"] = float(a.mean())
        for p in (50, 95, 99):
            stats[f"{name}_p{p}"] = float(np.percentile(a, p))
        stats[f"{name}_max"] = int(a.max())
    return stats
