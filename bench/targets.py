"""The performance targets checked against benchmark results: ``python -m bench.targets DIR ...``.

Reads every ``bench.csv`` under the given folders (and in ``extras.tar.gz`` archives, as
``scripts/gpu_run.sh`` packs them), then prints in Markdown:

* one line per target with the measured value, the threshold and a verdict (``met``,
  ``not met`` with the gap, or ``not measured``);
* the headline table (symmetric CLIP, bf16, N = 32768, fwd+bwd, per D: torch.compile, fastcl,
  Inf-CL, the ratios, TFLOP/s, % of the measured peak and extra memory);
* forward and backward separately (TFLOP/s and % of peak of each provider, and the host's time to
  issue one step: a step the host cannot issue faster than the device runs it is host-bound).

A ratio is only ever formed between rows of one result file (one run, same inputs); when several
files hold a case, the newest run (``# date:``) is taken. "fastcl" is the faster of the
user-facing backends (``fastcl-triton``, ``fastcl-cuda``); engine configurations
(``fastcl-triton@NAME``) are shown beside it but never count towards a target.
``--out FILE`` also writes the report to FILE.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple

from . import report

BACKENDS = ("fastcl-triton", "fastcl-cuda")
HEADLINE_N = 32768
# fwd+bwd speed-up over torch.compile the headline needs per D, and the memory fraction
HEADLINE_RATIO = {256: 2.0, 512: 1.3, 768: 1.1, 1024: 1.0}
MEMORY_FRACTION = 1 / 20
INFCL_RATIO = 25.0
SIGLIP_RATIO = 1.5  # against torch.compile, bf16
FP32_RATIO = 3.0  # against the naive loss, float32 inputs (TF32)
HUGE_N, HUGE_D = 2**20, 512
WIDE_TESTS = ("test_64bit_offsets_keys", "test_64bit_offsets_queries")

Run = Tuple[Dict[str, str], List[Dict[str, str]]]  # (provenance, rows)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def _parse(text: str) -> Run:
    prov: Dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# ") and ": " in line and not line.startswith("# skipped:"):
            k, v = line[2:].split(": ", 1)
            prov.setdefault(k, v)
    rows = report.read_csv_text(text)
    return prov, rows


def load_runs(paths: Sequence[str]) -> Tuple[List[Run], List[str]]:
    """Every result file under ``paths`` (folders, CSV files or .tar.gz archives), and the texts
    of the JUnit reports found beside them."""
    runs: List[Run] = []
    junits: List[str] = []

    def take(name: str, text: str) -> None:
        base = os.path.basename(name)
        if base.endswith(".csv"):
            runs.append(_parse(text))
        elif base.startswith("junit") and base.endswith(".xml"):
            junits.append(text)

    def take_archive(path: str) -> None:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile() and (m.name.endswith(".csv") or m.name.endswith(".xml")):
                    take(m.name, tar.extractfile(m).read().decode())

    for p in paths:
        if os.path.isdir(p):
            for root, _dirs, files in sorted(os.walk(p)):
                for f in sorted(files):
                    full = os.path.join(root, f)
                    if f.endswith(".tar.gz"):
                        take_archive(full)
                    elif f.endswith(".csv") or f.endswith(".xml"):
                        with open(full) as fh:
                            take(full, fh.read())
        elif p.endswith(".tar.gz"):
            take_archive(p)
        else:
            with open(p) as fh:
                take(p, fh.read())
    return runs, junits


# ----------------------------------------------------------------------------------------------
# lookups
# ----------------------------------------------------------------------------------------------


def _num(v) -> Optional[float]:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _match(row: Dict[str, str], **case) -> bool:
    return all(str(row.get(k)) == str(v) for k, v in case.items())


def _ok(rows: List[Dict[str, str]], provider: str, **case) -> Optional[Dict[str, str]]:
    for r in rows:
        if r["provider"] == provider and r["status"] == "ok" and _match(r, **case):
            return r
    return None


def _best(rows: List[Dict[str, str]], providers: Sequence[str], **case) -> Optional[Dict[str, str]]:
    found = [r for p in providers for r in [_ok(rows, p, **case)] if r is not None]
    return min(found, key=lambda r: float(r["ms"])) if found else None


def _configs(rows: List[Dict[str, str]], **case) -> List[Dict[str, str]]:
    return [r for r in rows if r["provider"].startswith("fastcl-triton@") and r["status"] == "ok"
            and _match(r, **case)]


def _newest(runs: List[Run], need: Sequence[str], **case) -> Optional[Run]:
    """The newest run holding an ok row of the case for each provider group in ``need``
    ("fastcl" stands for the backends)."""
    best = None
    for prov, rows in runs:
        have = all((_best(rows, BACKENDS, **case) if p == "fastcl" else _ok(rows, p, **case))
                   is not None for p in need)
        if have and (best is None or prov.get("date", "") >= best[0].get("date", "")):
            best = (prov, rows)
    return best


def _failed(runs: List[Run], **case) -> str:
    """Why a case has no result: the statuses its fastcl rows had, if any."""
    seen = sorted({r["status"] for _p, rows in runs for r in rows
                   if r["provider"] in BACKENDS and r["status"] != "ok" and _match(r, **case)})
    return f" (fastcl rows: {', '.join(seen)})" if seen else ""


# ----------------------------------------------------------------------------------------------
# the targets
# ----------------------------------------------------------------------------------------------


def _ratio_line(name: str, runs: List[Run], baseline: str, need: float, **case) -> List[str]:
    run = _newest(runs, ("fastcl", baseline), **case)
    if run is None:
        return [name, "", f">= {need:g}x", "not measured" + _failed(runs, **case)]
    rows = run[1]
    ours, base = _best(rows, BACKENDS, **case), _ok(rows, baseline, **case)
    x = float(base["ms"]) / float(ours["ms"])
    got = f"{x:.2f}x ({ours['provider']} {float(ours['ms']):.3g} ms, {baseline} {float(base['ms']):.3g} ms)"
    if x >= need:
        verdict = "met"
    else:
        verdict = f"not met: {float(base['ms']) / need:.3g} ms needed, {100 * (x / need - 1):+.0f}%"
    return [name, got, f">= {need:g}x", verdict]


def _memory_line(name: str, runs: List[Run], **case) -> List[str]:
    run = _newest(runs, ("fastcl", "compiled"), **case)
    need = f"<= {MEMORY_FRACTION:g} of torch.compile's"
    if run is None:
        return [name, "", need, "not measured"]
    ours, base = _best(run[1], BACKENDS, **case), _ok(run[1], "compiled", **case)
    a, b = _num(ours.get("peak_extra_mib")), _num(base.get("peak_extra_mib"))
    if a is None or b is None:
        return [name, "", need, "not measured (no memory column)"]
    got = f"{a:.0f} MiB vs {b:.0f} MiB ({a / b:.3f})" if b else f"{a:.0f} MiB vs {b:.0f} MiB"
    return [name, got, need, "met" if a <= MEMORY_FRACTION * b else "not met"]


def _infcl_lines(runs: List[Run]) -> List[List[str]]:
    out = []
    for prov, rows in runs:
        for r in rows:
            if r["provider"] not in ("infcl", "infcl-ring") or r["status"] != "ok":
                continue
            case = {k: r[k] for k in ("loss", "mode", "N", "M", "D", "dtype")}
            ours = _best(rows, BACKENDS, **case)
            label = f"{r['provider']}: {case['loss']} {case['dtype']} {case['mode']} N={case['N']} D={case['D']}"
            if ours is None:
                out.append([label, "", f">= {INFCL_RATIO:g}x", "not measured" + _failed([(prov, rows)], **case)])
                continue
            x = float(r["ms"]) / float(ours["ms"])
            out.append([label, f"{x:.1f}x", f">= {INFCL_RATIO:g}x",
                        "met" if x >= INFCL_RATIO else f"not met ({100 * (x / INFCL_RATIO - 1):+.0f}%)"])
    return out or [["Inf-CL", "", f">= {INFCL_RATIO:g}x", "not measured (no Inf-CL rows)"]]


def _huge_line(runs: List[Run]) -> List[str]:
    case = dict(loss="clip", mode="fwdbwd", N=HUGE_N, D=HUGE_D)
    name = f"CLIP fwd+bwd at N = 2^20, D = {HUGE_D}"
    run = _newest(runs, ("fastcl",), **case)
    if run is None:
        return [name, "", "completes", "not measured" + _failed(runs, **case)]
    r = _best(run[1], BACKENDS, **case)
    mem = _num(r.get("peak_extra_mib"))
    got = f"{float(r['ms']):.4g} ms, {r['dtype']}" + (f", {mem / 1024:.2f} GiB extra" if mem is not None else "")
    return [name, got, "completes", "met"]


def _wide_line(junits: List[str]) -> List[str]:
    name = "N*D > 2^31 matches the reference (sampled rows)"
    results: Dict[str, str] = {}
    for text in junits:
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            continue
        for tc in root.iter("testcase"):
            test = tc.get("name", "")
            if not test.startswith(WIDE_TESTS):
                continue
            tags = {c.tag for c in tc}
            status = ("failed" if tags & {"failure", "error"} else
                      "skipped" if "skipped" in tags else "passed")
            if results.get(test) != "failed":
                results[test] = status
    if not results:
        return [name, "", "tests pass", "not measured (no JUnit report with the 64-bit tests)"]
    got = ", ".join(f"{k}: {v}" for k, v in sorted(results.items()))
    if any(v == "failed" for v in results.values()):
        return [name, got, "tests pass", "not met"]
    done = all(v == "passed" for v in results.values()) and len(results) >= 2 * len(WIDE_TESTS)
    return [name, got, "tests pass", "met" if done else "not measured (skipped)"]


def target_lines(runs: List[Run], junits: List[str]) -> List[List[str]]:
    head = dict(loss="clip", mode="fwdbwd", N=HEADLINE_N, dtype="bfloat16")
    lines = []
    for D, need in HEADLINE_RATIO.items():
        lines.append(_ratio_line(f"CLIP bf16 fwd+bwd N = {HEADLINE_N}, D = {D} vs torch.compile",
                                 runs, "compiled", need, D=D, **head))
        lines.append(_memory_line(f"  extra memory, D = {D}", runs, D=D, **head))
    lines += _infcl_lines(runs)
    # SigLIP and float32 inputs at whatever shapes fastcl was measured (N = 32768, D = 512 if none)
    lines += [_ratio_line(f"SigLIP bf16 fwd+bwd N = {N}, D = {D} vs torch.compile", runs, "compiled",
                          SIGLIP_RATIO, loss="siglip", mode="fwdbwd", N=N, D=D, dtype="bfloat16")
              for N, D in _shapes(runs, loss="siglip", mode="fwdbwd", dtype="bfloat16") or [(HEADLINE_N, 512)]]
    lines += [_ratio_line(f"CLIP fp32 (TF32) fwd+bwd N = {N}, D = {D} vs naive fp32", runs, "naive",
                          FP32_RATIO, loss="clip", mode="fwdbwd", N=N, D=D, dtype="float32")
              for N, D in _shapes(runs, loss="clip", mode="fwdbwd", dtype="float32") or [(HEADLINE_N, 512)]]
    lines.append(_huge_line(runs))
    lines.append(_wide_line(junits))
    return lines


def _shapes(runs: List[Run], **case) -> List[Tuple[int, int]]:
    """(N, D) of the cases of ``case`` with an ok fastcl row, in any run."""
    seen = set()
    for _prov, rows in runs:
        for r in rows:
            if r["provider"] in BACKENDS and r["status"] == "ok" and _match(r, **case):
                seen.add((int(r["N"]), int(r["D"])))
    return sorted(seen)


# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _ms(r: Optional[Dict[str, str]]) -> str:
    return f"{float(r['ms']):.3g} ms" if r else "—"


def headline_table(runs: List[Run]) -> str:
    lines = []
    for D in HEADLINE_RATIO:
        case = dict(loss="clip", mode="fwdbwd", N=HEADLINE_N, D=D, dtype="bfloat16")
        run = _newest(runs, ("fastcl",), **case)
        if run is None:
            lines.append([D] + ["—"] * 8)
            continue
        rows = run[1]
        ours, comp = _best(rows, BACKENDS, **case), _ok(rows, "compiled", **case)
        naive, inf = _ok(rows, "naive", **case), _ok(rows, "infcl", **case)
        cfg = min(_configs(rows, **case), key=lambda r: float(r["ms"]), default=None)
        x = f"{float(comp['ms']) / float(ours['ms']):.2f}×" if comp else "—"
        xi = f"{float(inf['ms']) / float(ours['ms']):.0f}×" if inf else "—"
        mem = _num(ours.get("peak_extra_mib"))
        cmem = _num(comp.get("peak_extra_mib")) if comp else None
        lines.append([D, _ms(comp), _ms(naive), _ms(inf), f"{_ms(ours)} ({ours['provider']})", x, xi,
                      f"{ours.get('tflops', '')} ({ours.get('pct_peak', '') or '—'}%)",
                      f"{mem:.0f} / {cmem:.0f} MiB" if mem is not None and cmem is not None else "—"]
                     + ([f"{cfg['provider']} {_ms(cfg)}"] if cfg and float(cfg["ms"]) < float(ours["ms"]) else []))
    header = ["D", "torch.compile", "naive", "Inf-CL", "fastcl", "vs compile", "vs Inf-CL",
              "fastcl TFLOP/s (% peak)", "extra memory fastcl / compile"]
    if any(len(line) > len(header) for line in lines):
        header.append("faster configuration")
        lines = [line + [""] * (len(header) - len(line)) for line in lines]
    return _table(header, lines)


def split_table(runs: List[Run]) -> str:
    lines = []
    for D in HEADLINE_RATIO:
        for mode in ("fwd", "bwd"):
            case = dict(loss="clip", mode=mode, N=HEADLINE_N, D=D, dtype="bfloat16")
            run = _newest(runs, ("fastcl",), **case)
            if run is None:
                continue
            for r in run[1]:
                if r["status"] == "ok" and _match(r, **case):
                    host = _num(r.get("host_ms"))
                    lines.append([D, mode, r["provider"], _ms(r), r.get("tflops", ""),
                                  r.get("pct_peak", "") or "—",
                                  "—" if host is None else f"{host:.3g} ms" + (
                                      " (host-bound)" if host >= 0.9 * float(r["ms"]) else "")])
    if not lines:
        return "(no forward / backward rows at the headline shape)"
    return _table(["D", "mode", "provider", "median", "TFLOP/s", "% peak", "host issue time"],
                  lines)


def build_report(paths: Sequence[str]) -> str:
    runs, junits = load_runs(paths)
    buf = io.StringIO()
    devices = sorted({f"{p.get('device', '?')} (torch {p.get('torch', '?')}, triton {p.get('triton', '?')}, "
                      f"git {p.get('git_sha', '?')[:7]})" for p, _r in runs})
    buf.write(f"Result files: {len(runs)}; {'; '.join(devices) or 'none'}\n\n")
    buf.write("## Targets\n\n")
    buf.write(_table(["target", "measured", "needed", "verdict"], target_lines(runs, junits)) + "\n\n")
    buf.write(f"## Headline: symmetric CLIP, bf16, N = {HEADLINE_N}, fwd+bwd\n\n")
    buf.write(headline_table(runs) + "\n\n")
    buf.write("## Forward and backward separately\n\n")
    buf.write(split_table(runs) + "\n")
    return buf.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.targets", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="result folders, bench.csv files or .tar.gz archives")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        ap.error(f"no such file or folder: {', '.join(missing)}")
    text = build_report(args.paths)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
