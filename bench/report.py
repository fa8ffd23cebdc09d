"""From measurements to the report: medians over repetitions, ratios, Markdown and JSON.

`python -m bench.report bench/results/latest.json` renders a saved run again (the summary
is recomputed from its measurements).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from bench import paced

MODES = {"json": "Non-streaming (JSON, 64 completion tokens)",
         "sse": "Streaming (SSE, 64 token chunks + usage chunk + [DONE])"}
PHASES = ("request_headers", "request_body", "response_headers", "response_body")
CPU_GROUPS = ("envoy", "python", "redis")


def per_request(m: dict[str, Any]) -> dict[str, Any]:
    """Derived per-request figures of one measurement."""
    n = max(m["completed"], 1)
    diff: dict[str, float] = m["counters"]
    out: dict[str, Any] = {
        "cpu_us": {k: v / n * 1e6 for k, v in m["cpu_s"].items()},
        "gateway_cpu_us": sum(m["cpu_s"].get(k, 0.0) for k in CPU_GROUPS) / n * 1e6,
        "loadgen_cores": m["cpu_s"].get("loadgen", 0.0) / m["window_s"],
    }
    authz = diff.get("grpc.check", diff.get("grpc.ext_authz"))
    if authz is not None:
        phases = {p: diff[f"grpc.{p}"] / n for p in PHASES if f"grpc.{p}" in diff}
        proc = diff.get("grpc.ext_proc", sum(phases.values()) * n)
        out["msgs"] = {"ext_authz": authz / n, "ext_proc": proc / n,
                       "total": (authz + proc) / n, "phases": phases}
    if "envoy.ext_proc.stream_msgs_sent" in diff:
        out["envoy_msgs"] = (diff["envoy.ext_proc.stream_msgs_sent"]
                             + diff.get("envoy.ext_authz.ok", 0.0)) / n
    return out


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(measurements: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, mode, concurrency): the median of each figure over reps."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for m in measurements:
        groups.setdefault((m["config"], m["mode"], m["connections"]), []).append(m)
    rows = []
    for (config, mode, conc), ms in groups.items():
        derived = [per_request(m) for m in ms]
        row: dict[str, Any] = {
            "config": config, "mode": mode, "connections": conc, "reps": len(ms),
            "rps": _median(m["rps"] for m in ms),
            "rps_range": [min(m["rps"] for m in ms), max(m["rps"] for m in ms)],
            "p50_ms": _median(m["lat_ms"]["p50"] for m in ms),
            "p99_ms": _median(m["lat_ms"]["p99"] for m in ms),
            "ttfb_p50_ms": _median(m["ttfb_ms"]["p50"] for m in ms),
            "events_per_response": _median(m["events_per_response"] for m in ms),
            "cpu_us": {g: _median(d["cpu_us"].get(g) for d in derived)
                       for g in ("envoy", "python", "redis", "sim", "loadgen")},
            "gateway_cpu_us": _median(d["gateway_cpu_us"] for d in derived),
            "loadgen_cores": _median(d["loadgen_cores"] for d in derived),
            "completed": sum(m["completed"] for m in ms),
            "failed": sum(m["completed"] - m["ok"] + m["bad_body"] + sum(m["errors"].values())
                          + (m["completed"] == 0) for m in ms),
        }
        if any("msgs" in d for d in derived):
            row["msgs"] = {k: _median(d["msgs"][k] for d in derived if "msgs" in d)
                           for k in ("ext_authz", "ext_proc", "total")}
            phases = [d["msgs"]["phases"] for d in derived if d.get("msgs", {}).get("phases")]
            if phases:
                row["msgs"]["phases"] = {p: _median(ph.get(p) for ph in phases) for p in PHASES}
        if any("envoy_msgs" in d for d in derived):
            row["envoy_msgs"] = _median(d.get("envoy_msgs") for d in derived)
        rows.append(row)
    _add_relations(rows)
    return rows


def _add_relations(rows: list[dict[str, Any]]) -> None:
    index = {(r["config"], r["mode"], r["connections"]): r for r in rows}
    for r in rows:
        base = index.get(("A", r["mode"], r["connections"]))
        if base and r["p50_ms"] is not None and base["p50_ms"] is not None:
            r["added_p50_ms_over_A"] = r["p50_ms"] - base["p50_ms"]
        if not r["config"].startswith("B"):
            continue
        r["ratios"] = {}
        # A "before" variant is compared with the floor of the same pattern.
        floor = "F-split" if r["config"] == "B-split" else "F"
        for other in ("A", "F", "C"):
            o = index.get((floor if other == "F" else other, r["mode"], r["connections"]))
            if o is None or not o["rps"] or not r["rps"]:
                continue
            r["ratios"][other] = {
                "rps": r["rps"] / o["rps"],
                "p50": (r["p50_ms"] / o["p50_ms"]) if o["p50_ms"] else None,
                "gateway_cpu": (r["gateway_cpu_us"] / o["gateway_cpu_us"]
                                if o["gateway_cpu_us"] else None),
            }


def _f(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return out


def _order(rows: list[dict[str, Any]], configs: Sequence[str]) -> list[dict[str, Any]]:
    rank = {c: i for i, c in enumerate(configs)}
    return sorted(rows, key=lambda r: (rank.get(r["config"], 99), r["connections"]))


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows: list[dict[str, Any]] = result["summary"]
    configs: list[str] = s["configs"]
    out = [f"### Run of {result['finished_at']}", "",
           f"Machine: {result['machine']['summary']}. "
           f"{s['reps']} repetitions, configurations interleaved (order rotated each round), "
           f"{s['duration_s']:g} s measured after {s['warmup_s']:g} s of warm-up per cell; "
           "medians over the repetitions (req/s: median, then the lowest and highest)."
           + (f" LiteLLM {s['litellm']}." if s.get("litellm") else "")
           + (f" tokenbooth at {s['commit']}." if s.get("commit") else ""), ""]
    for mode in s["modes"]:
        sel = _order([r for r in rows if r["mode"] == mode], configs)
        if not sel:
            continue
        header = ["config", "conns", "req/s", "p50 ms", "p99 ms"]
        header += ["TTFB p50 ms"] if mode == "sse" else []
        header += ["+p50 vs A ms", "Envoy µs/req", "Python µs/req", "Redis µs/req",
                   "gRPC msgs/req", "sim µs/req", "loadgen cores", "failed"]
        lines = []
        for r in sel:
            cpu = r["cpu_us"]
            lo, hi = r["rps_range"]
            rps = _f(r["rps"]) + (f" ({_f(lo)}-{_f(hi)})" if r["reps"] > 1 else "")
            cells = [r["config"], str(r["connections"]), rps, _f(r["p50_ms"], 2),
                     _f(r["p99_ms"], 2)]
            cells += [_f(r["ttfb_p50_ms"], 2)] if mode == "sse" else []
            cells += [_f(r.get("added_p50_ms_over_A"), 2), _f(cpu["envoy"]), _f(cpu["python"]),
                      _f(cpu["redis"]), _f(r.get("msgs", {}).get("total"), 1), _f(cpu["sim"]),
                      _f(r["loadgen_cores"], 2),
                      "**" + str(r["failed"]) + "** ⚠" if r["failed"] else "0"]
            lines.append(cells)
        out += [f"#### {MODES[mode]}", "", *_table(header, lines), ""]
    out += _ratio_section(rows, configs, s["modes"])
    out += _messages_section(rows, configs, s["modes"])
    out += paced.markdown(result.get("paced", []), s.get("paced_configs", []))
    return "\n".join(out) + "\n"


def _ratio_section(rows: list[dict[str, Any]], configs: Sequence[str],
                   modes: Sequence[str]) -> list[str]:
    sel = [r for r in _order(rows, configs) if r.get("ratios")]
    if not sel:
        return []
    header = ["config", "mode", "conns"]
    for other in ("A", "F", "C"):
        header += [f"req/s B/{other}", f"CPU/req B/{other}"]
    lines = []
    for mode in modes:
        for r in (r for r in sel if r["mode"] == mode):
            cells = [r["config"], mode, str(r["connections"])]
            for other in ("A", "F", "C"):
                rat = r["ratios"].get(other, {})
                cells += [_x(rat.get("rps")), _x(rat.get("gateway_cpu"))]
            lines.append(cells)
    return ["#### B against A, F and C", "",
            "Gateway CPU = Envoy + Python (+ Redis where the configuration uses it).", "",
            *_table(header, lines), ""]


def _messages_section(rows: list[dict[str, Any]], configs: Sequence[str],
                      modes: Sequence[str]) -> list[str]:
    lines = []
    for mode in modes:
        for config in configs:
            sel = [r for r in rows if r["config"] == config and r["mode"] == mode
                   and r.get("msgs")]
            if not sel:
                continue
            med = {k: _median(r["msgs"][k] for r in sel) for k in ("ext_authz", "ext_proc",
                                                                    "total")}
            phases = [r["msgs"].get("phases") for r in sel if r["msgs"].get("phases")]
            by_phase = " / ".join(_f(_median(p[ph] for p in phases if p), 2)
                                  for ph in PHASES) if phases else "-"
            lines.append([config, mode, _f(med["ext_authz"], 2), _f(med["ext_proc"], 2),
                          by_phase, _f(med["total"], 2),
                          _f(_median(r.get("envoy_msgs") for r in sel), 2)])
    if not lines:
        return []
    return ["#### gRPC messages per request", "",
            "Counted by the servicers (F: the no-op servicers, by kind; B: tokenbooth's "
            "`tokenbooth_decision_seconds_count` per service) and, as a cross-check, by "
            "Envoy (`ext_authz.ok` + `ext_proc.stream_msgs_sent`); median over every "
            "concurrency and repetition.", "",
            *_table(["config", "mode", "ext_authz", "ext_proc", "req hdrs / req body / "
                     "resp hdrs / resp body", "total", "Envoy's count"], lines), ""]


def main(path: str) -> None:
    with open(path) as f:
        result: dict[str, Any] = json.load(f)
    result["summary"] = summarize(result["measurements"])
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main(sys.argv[1])
