"""One flag grammar for every command.

Cluster and workload flags are built from the fields of :class:`envs.config.ClusterConfig` and
:class:`experiments.runner.WorkloadSpec` (their ``cli_field`` metadata: help, unit, aliases, choices), so a new
field gets its flag in every command without touching one. The grammar, the same wherever a flag appears:

* ``--window SECONDS | START:SECONDS | <N>req | all``: the trace window. ``--duration SECONDS`` is a deprecated
  alias of ``--window SECONDS``. In ``simulate`` and ``replay`` the start is ``--start-s`` (default 0); in
  ``compare`` and ``tune`` each seed draws its own start (within ``--span``) unless ``START:`` is given.
* ``--rate`` / ``--rates``: offered load in requests per second. ``--loads``: multiples of the trace window's
  recorded rate. No flag means one in one command and the other in another.
* ``--seed N``: one workload seed. ``--seeds``: several, ranges ``A-B`` inclusive.
* Lists are separated by spaces (``--policies round_robin proactive``, ``--rates 2 5 8``). Number lists also take
  commas (``--rates 2,5,8``, ``--seeds 0-4``); policy lists do not, as a spec's own parameters use commas
  (``proactive:margin=0.1,min_chunk=64``).
* ``--policy SPEC``: one policy. ``--policies SPEC [SPEC ...]``: several.
* Units are in flag names where a number could be read two ways (``--ttft-slo-s``, ``--start-s``), and in every
  help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any

from deflectlab.envs.config import ClusterConfig, parse_shape
from deflectlab.experiments.labels import labelled  # noqa: F401  (the CLI's LABEL=VALUE options; defined there)
from deflectlab.experiments.runner import WorkloadSpec

_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
WINDOW_METAVAR = "SECONDS|START:SECONDS|<N>req|all"


# -- flags from dataclass fields ------------------------------------------------------------------------------
def flag_name(f: dataclasses.Field) -> str | None:
    """The flag of a field: its ``cli_field`` ``flag``, or ``--`` and the field name with dashes; None for none."""
    flag = f.metadata.get("flag", "")
    if flag is None:
        return None
    return flag or "--" + f.name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The scalar type a field's flag parses (``int | None`` -> int); unknown annotations parse as strings and the
    dataclass validates them."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
    parts = [p.strip() for p in name.split("|") if p.strip() != "None"]
    return _TYPES.get(parts[0], str) if len(parts) == 1 else str


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]


def field_help(f: dataclasses.Field) -> str:
    """The field's help, its unit in brackets, its default and its older flag names."""
    md = f.metadata
    unit = f" [{md['unit']}]" if md.get("unit") else ""
    default = field_default(f)
    aliases = f"; alias {', '.join(md['aliases'])}" if md.get("aliases") else ""
    return f"{md.get('help', f.name)}{unit} (default: {'unset' if default is None else default}{aliases})" \
        .replace("%", "%%")


def field_metavar(f: dataclasses.Field, typ: type) -> str:
    unit = f.metadata.get("unit", "")
    if unit:
        return unit.upper().replace("/", "_PER_")
    return {int: "INT", float: "NUMBER"}.get(typ, "NAME")


def add_dataclass_flags(group: Any, cls: type, only: Iterable[str] | None = None) -> None:
    """One flag per field of ``cls`` that has one (see :func:`flag_name`). Flags default to None (not given), so
    the dataclass's own default applies: :func:`given` collects what was set."""
    keep = set(only) if only is not None else None
    for f in dataclasses.fields(cls):
        name = flag_name(f)
        if name is None or (keep is not None and f.name not in keep):
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": field_help(f)}
        typ = field_type(f)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = typ
            kw["metavar"] = field_metavar(f, typ)
        if f.metadata.get("choices"):
            kw.pop("metavar", None)
            kw["choices"] = tuple(f.metadata["choices"])
        group.add_argument(name, *f.metadata.get("aliases", ()), **kw)


def given(a: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose flags were given."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name, None) is not None}


# -- the cluster ----------------------------------------------------------------------------------------------
def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """``--shape``, ``--profile`` and one flag per :class:`ClusterConfig` field."""
    g = p.add_argument_group("cluster")
    g.add_argument("--shape", default=None, metavar="<x>p<y>d",
                   help="x prefill and y decode nodes (default: 2p2d)")
    g.add_argument("--profile", default=None, help="latency profile of both pools, bundled name or YAML path "
                   "(--prefill-profile / --decode-profile set one pool)")
    add_dataclass_flags(g, ClusterConfig)


def cluster_flags_given(a: argparse.Namespace) -> bool:
    return bool(a.shape or a.profile or given(a, ClusterConfig))


def cluster_from_flags(a: argparse.Namespace, base: ClusterConfig | dict[str, Any] | str | None = None
                       ) -> ClusterConfig:
    """``base`` (default: the defaults) with the cluster flags that were given applied on top."""
    kw = ClusterConfig.coerce(base).to_dict()
    if a.shape:
        kw["num_prefill"], kw["num_decode"] = parse_shape(a.shape)
    if a.profile:
        kw["prefill_profile"] = kw["decode_profile"] = a.profile
    kw.update(given(a, ClusterConfig))
    return ClusterConfig.from_dict(kw)


# -- the workload ---------------------------------------------------------------------------------------------
def add_window_flag(g: Any, default: str | None, start: str) -> None:
    """``--window`` (and its deprecated alias ``--duration``); ``start`` says where the window starts when only
    SECONDS are given."""
    g.add_argument("--window", default=default, metavar=WINDOW_METAVAR,
                   help=f"trace window: SECONDS of trace time ({start}), START:SECONDS, the first <N>req "
                        f"requests, or all (default: {default or 'all'})")
    g.add_argument("--duration", dest="window", type=_deprecated_duration, metavar="SECONDS",
                   help="deprecated: --window SECONDS")


def _deprecated_duration(text: str) -> str:
    print("deflectlab: --duration is deprecated, use --window SECONDS", file=sys.stderr)
    return text


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """One window of one trace: one flag per :class:`WorkloadSpec` field, and ``--window``."""
    g = p.add_argument_group("workload")
    add_dataclass_flags(g, WorkloadSpec)
    add_window_flag(g, None, "from --start-s")


def workload_from_flags(a: argparse.Namespace) -> WorkloadSpec:
    kw = given(a, WorkloadSpec)
    win = parse_window(a.window) if a.window else {}
    if "window_start_s" in win and win["window_start_s"] is not None:
        if "start_s" in kw:
            raise ValueError("--window START:SECONDS and --start-s both set the start: give one")
        kw["start_s"] = win["window_start_s"]
    if win.get("num_requests") is not None:
        if "num_requests" in kw:
            raise ValueError("--window <N>req and --num-requests both cap the requests: give one")
        kw["num_requests"] = win["num_requests"]
    if win.get("window_s") is not None:
        kw["duration_s"] = win["window_s"]
    return WorkloadSpec(**kw)


def parse_window(text: str) -> dict[str, Any]:
    """``600`` (seconds), ``300:600`` (start:seconds), ``2000req`` (the first requests) or ``all`` (the whole
    trace) -> ``window_s`` / ``window_start_s`` / ``num_requests``."""
    t = text.strip().lower()
    if t in ("all", "whole", "none"):
        return {"window_s": None, "window_start_s": None, "num_requests": None}
    try:
        if t.endswith("req"):
            n = int(t[:-3])
            if n < 1:
                raise ValueError
            return {"num_requests": n}
        if ":" in t:
            a, b = t.split(":", 1)
            start, dur = float(a), float(b)
            if start < 0 or dur <= 0:
                raise ValueError
            return {"window_start_s": start, "window_s": dur}
        dur = float(t)
        if dur <= 0:
            raise ValueError
        return {"window_s": dur}
    except ValueError:
        raise ValueError(f"--window: {text!r} is not {WINDOW_METAVAR}") from None


def parse_span(text: str | None) -> tuple[float, float] | list[tuple[float, float]] | None:
    """``LO:HI`` seconds of the trace (or several, ``LO:HI,LO:HI``: each window lies in one), or None."""
    if not text:
        return None
    out = []
    for part in text.split(","):
        try:
            a, b = (float(x) for x in part.split(":", 1))
        except ValueError:
            raise ValueError(f"--span: {part!r} is not LO:HI seconds") from None
        if not 0 <= a < b:
            raise ValueError(f"--span: {part!r} needs 0 <= LO < HI")
        out.append((a, b))
    return out[0] if len(out) == 1 else out


# -- lists ----------------------------------------------------------------------------------------------------
def _items(value: str | Iterable[str]) -> list[str]:
    """The items of a number list given as one string or several, separated by spaces or commas."""
    words = [value] if isinstance(value, str) else list(value)
    return [p for w in words for p in str(w).replace(",", " ").split()]


def _positive(part: str, flag: str, unit: str) -> float:
    try:
        v = float(part)
    except ValueError:
        raise ValueError(f"{flag}: {part!r} is not a number ({unit})") from None
    if not v > 0 or v == float("inf"):
        raise ValueError(f"{flag}: {part!r} must be a finite number > 0 ({unit})")
    return v


def parse_rates(value: str | Iterable[str], allow_trace: bool = True) -> tuple[float | None, ...]:
    """Rates in requests/s (``"3.21,5,8"`` or ``["3.21", "5"]``); ``trace`` (or ``recorded``) replays the
    recorded times (None) when ``allow_trace``."""
    out: list[float | None] = []
    for part in _items(value):
        if allow_trace and part.lower() in ("trace", "recorded", "none"):
            out.append(None)
        else:
            out.append(_positive(part, "--rates", "requests/s" + (" or 'trace'" if allow_trace else "")))
    if not out:
        raise ValueError("--rates: give at least one rate (requests/s)")
    return tuple(out)


def parse_loads(value: str | Iterable[str]) -> tuple[float, ...]:
    """Load multipliers of the trace window's recorded rate (``"2,3,4"`` or ``["2", "3"]``)."""
    out = tuple(_positive(part, "--loads", "x the recorded rate") for part in _items(value))
    if not out:
        raise ValueError("--loads: give at least one multiplier")
    return out


def parse_seeds(value: str | Iterable[str], flag: str = "--seeds") -> tuple[int, ...]:
    """``"0,1,2"``, ``"0-4"`` (inclusive), a mix, or several such words -> distinct seeds in order."""
    out: list[int] = []
    for part in _items(value):
        lo, dash, hi = part.partition("-")
        try:
            if dash:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not an integer or a range like 0-4") from None
    if not out or min(out) < 0:
        raise ValueError(f"{flag}: give integers >= 0")
    return tuple(dict.fromkeys(out))


def parse_policies(specs: Iterable[str], flag: str = "--policies") -> tuple[str, ...]:
    """Policy specs, one per word. Commas belong to a spec's parameters (``proactive:margin=0.1,min_chunk=64``); a
    comma-separated list of policies (``round_robin,proactive``, ``learned:path=x,round_robin``) is an error that
    says to use spaces. ``;`` between a spec's parameters (``evaluate``'s old form) is read as ``,``, with a note."""
    out = []
    for spec in (s.strip() for s in specs):
        if ";" in spec:
            print(f"deflectlab: {flag}: ';' between a spec's parameters is deprecated, use ','", file=sys.stderr)
            spec = spec.replace(";", ",")
        name, _, rest = spec.partition(":")
        stray = [kv for kv in rest.split(",") if kv and "=" not in kv]
        if "," in name or stray:
            raise ValueError(f"{flag}: {spec!r} looks like a comma-separated list of policies; separate policies "
                             "with spaces (a spec's own parameters take commas: proactive:margin=0.1,min_chunk=64)")
        if spec:
            out.append(spec)
    if not out:
        raise ValueError(f"{flag}: give at least one policy spec")
    return tuple(out)


def add_rates_flag(g: Any, default: Iterable[float | None], allow_trace: bool = True) -> None:
    shown = " ".join("trace" if r is None else f"{r:g}" for r in default)
    g.add_argument("--rates", nargs="+", default=[shown], metavar="REQUESTS_PER_S",
                   help="offered loads in requests/s (not multiples of the trace's rate: that is --loads)"
                        + ("; 'trace' replays the recorded times" if allow_trace else "") + f" (default: {shown})")


def add_seeds_flag(g: Any, default: str, what: str = "workload seeds") -> None:
    g.add_argument("--seeds", nargs="+", default=[default], metavar="SEED",
                   help=f"{what}: integers or inclusive ranges, e.g. 0 1 2 or 0-4 (default: {default})")


def add_policies_flag(p: Any, default: Iterable[str] | None, help_text: str) -> None:
    shown = " ".join(default) if default else None
    p.add_argument("--policies", nargs="+", default=list(default) if default else None, metavar="SPEC",
                   help=f"{help_text}; space-separated registry specs, e.g. round_robin proactive:margin=0.1 "
                        f"(default: {shown or 'see below'})")
