"""Results: provenance, derived metrics, CSV / JSON files, the table and the plots."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .timing import FLOP_CONVENTION

COLUMNS = ("loss", "provider", "mode", "N", "M", "D", "dtype", "status", "ms", "p20", "p80",
           "repeats", "host_ms", "tflops", "pct_peak", "peak_extra_mib", "loss_value",
           "x_vs_compiled", "x_vs_naive")
CSV_NAME, JSON_NAME = "bench.csv", "bench.json"
RATIO_NOTE = ("x_vs_compiled / x_vs_naive = that provider's median ms / this row's median ms, "
              "same loss, mode, shape and dtype in the same run (> 1: faster)")
HOST_NOTE = ("host_ms = the host's time to issue one step (Python, dispatch, launches) to an idle "
             "CUDA device, nothing waited for; a step whose host_ms nears its ms is bound by the "
             "host; blank on CPU")
MEMORY_NOTE = ("peak_extra_mib = CUDA peak allocation above the inputs during one step "
               "(forward for fwd; forward + backward, gradients included, for bwd and fwdbwd); "
               "blank on CPU")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def default_out_dir(device: torch.device) -> str:
    """bench/results/<gpu or cpu name>/"""
    name = device_name(device)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"
    if device.type != "cuda":
        slug = "cpu-" + slug
    return os.path.join(_ROOT, "bench", "results", slug)


def git_sha(cwd: str = _ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
        sha = out.stdout.strip()
        return sha if out.returncode == 0 and sha else "unknown"
    except Exception:
        return "unknown"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return "not installed"


def provenance(device: torch.device, argv: Optional[Sequence[str]] = None,
               extra: Optional[Dict] = None) -> Dict[str, str]:
    """Where and how the numbers were taken; written into every result file."""
    try:
        from fastcl import _backend

        ext = "built" if _backend.has_extension() else "not built"
    except Exception:
        ext = "unknown"
    argv = list(sys.argv if argv is None else argv)
    prov = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastcl": _version("fastcl"),
        "fastcl_extension": ext,
        "cuda": str(torch.version.cuda),
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv[1:]),
        "flops": FLOP_CONVENTION,
        "ratios": RATIO_NOTE,
        "memory": MEMORY_NOTE,
        "host": HOST_NOTE,
    }
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        prov["compute_capability"] = f"{cap[0]}.{cap[1]}"
    prov.update({k: str(v) for k, v in (extra or {}).items()})
    return prov


# ----------------------------------------------------------------------------------------------
# derived metrics
# ----------------------------------------------------------------------------------------------


def _case_key(row: Dict):
    return (row["loss"], row["mode"], row["N"], row["M"], row["D"], row["dtype"])


def add_ratios(rows: List[Dict]) -> None:
    """Fill x_vs_compiled / x_vs_naive from the baseline rows of the same case (in place)."""
    base = {}
    for r in rows:
        if r["provider"] in ("naive", "compiled") and r["status"] == "ok":
            base[(r["provider"],) + _case_key(r)] = r["ms"]
    for r in rows:
        for prov, col in (("compiled", "x_vs_compiled"), ("naive", "x_vs_naive")):
            b = base.get((prov,) + _case_key(r))
            r[col] = round(b / r["ms"], 3) if (b and r["status"] == "ok" and r["ms"]) else None


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(path: str, rows: Iterable[Dict], prov: Dict[str, str],
              skipped: Sequence[Dict] = ()) -> None:
    """CSV with ``# key: value`` provenance lines first (read with ``comment='#'``)."""
    with open(path, "w", newline="") as f:
        for k, v in prov.items():
            f.write(f"# {k}: {v}\n")
        for s in skipped:
            f.write(f"# skipped: {s['loss']} / {s['provider']}: {s['reason']}\n")
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_fmt(r.get(c)) for c in COLUMNS])


def _strict(v):
    """JSON has no NaN / Infinity: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path: str, rows: Sequence[Dict], prov: Dict[str, str],
               skipped: Sequence[Dict] = ()) -> None:
    rows = [{k: _strict(v) for k, v in r.items()} for r in rows]
    with open(path, "w") as f:
        json.dump({"provenance": prov, "columns": list(COLUMNS), "rows": rows,
                   "skipped": list(skipped)}, f, indent=1, allow_nan=False)


def write_results(out_dir: str, rows: Sequence[Dict], prov: Dict[str, str],
                  skipped: Sequence[Dict] = ()) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, CSV_NAME), os.path.join(out_dir, JSON_NAME)]
    write_csv(paths[0], rows, prov, skipped)
    write_json(paths[1], rows, prov, skipped)
    return paths


def read_csv(path: str) -> List[Dict]:
    """Rows of a CSV written by :func:`write_csv` (values as strings)."""
    with open(path) as f:
        return read_csv_text(f.read())


def read_csv_text(text: str) -> List[Dict]:
    """Rows of the text of a CSV written by :func:`write_csv` (values as strings)."""
    return list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def _footer(prov: Dict[str, str]) -> str:
    return (f"{prov.get('device')} | torch {prov.get('torch')} | triton {prov.get('triton')} | "
            f"fastcl {prov.get('fastcl')} @ {prov.get('git_sha', '')[:10]} | {prov.get('date')}")


def _n_label(v, _pos) -> str:
    return f"{int(round(v))}" if v >= 1 else f"{v:g}"


def plot_results(out_dir: str, rows: Sequence[Dict], prov: Dict[str, str]) -> List[str]:
    """Per (loss, dtype): time vs N (one row of panels per mode, one column per D) and peak memory
    vs N (one panel per D), log axes, one line per provider. Returns the files written; nothing
    when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except Exception:
        print("note: matplotlib is not installed; no plots written")
        return []
    ok = [r for r in rows if r["status"] == "ok"]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    meta = {"Description": json.dumps(prov), "Software": "fastcl bench"}
    for loss, dtype in sorted({(r["loss"], r["dtype"]) for r in ok}):
        sel = [r for r in ok if r["loss"] == loss and r["dtype"] == dtype]
        Ds = sorted({r["D"] for r in sel})
        modes = [m for m in ("fwd", "bwd", "fwdbwd") if any(r["mode"] == m for r in sel)]
        providers = sorted({r["provider"] for r in sel})
        colour = {p: f"C{i % 10}" for i, p in enumerate(providers)}

        width = max(6.5, 4.2 * len(Ds))
        fig, axes = plt.subplots(len(modes), len(Ds), figsize=(width, 3.2 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            for j, D in enumerate(Ds):
                ax = axes[i][j]
                for p in providers:
                    pts = sorted((r["N"], r["ms"]) for r in sel
                                 if r["provider"] == p and r["mode"] == mode and r["D"] == D)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=p, color=colour[p])
                ax.set_xscale("log", base=2)
                ax.xaxis.set_major_formatter(ticker.FuncFormatter(_n_label))
                ax.set_yscale("log")
                ax.set_title(f"{loss} {mode} D={D} {dtype}", fontsize=9)
                ax.set_xlabel("N")
                ax.set_ylabel("ms (median)")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.text(0.01, 0.005, _footer(prov), fontsize=6)
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        path = os.path.join(out_dir, f"time_{loss}_{dtype}.png")
        fig.savefig(path, dpi=90, metadata=meta)
        plt.close(fig)
        written.append(path)

        mem = [r for r in sel if r.get("peak_extra_mib") is not None]
        if not mem:
            continue
        fig, axes = plt.subplots(1, len(Ds), figsize=(width, 3.4), squeeze=False)
        for j, D in enumerate(Ds):
            ax = axes[0][j]
            for p in providers:
                # memory of the training step (fwd+bwd when measured, else whatever mode ran)
                by_n: Dict[int, float] = {}
                for r in mem:
                    if r["provider"] == p and r["D"] == D:
                        if r["mode"] == "fwdbwd" or r["N"] not in by_n:
                            by_n[r["N"]] = max(r["peak_extra_mib"], 1e-3)
                if by_n:
                    ax.plot(*zip(*sorted(by_n.items())), marker="o", label=p, color=colour[p])
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_n_label))
            ax.set_yscale("log")
            ax.set_title(f"{loss} peak extra memory D={D} {dtype}", fontsize=9)
            ax.set_xlabel("N")
            ax.set_ylabel("MiB above inputs")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.text(0.01, 0.005, _footer(prov), fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, f"memory_{loss}_{dtype}.png")
        fig.savefig(path, dpi=90, metadata=meta)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------


def _cell(v, nd=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2g}"
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def print_table(rows: Sequence[Dict], prov: Dict[str, str], has_peak: bool) -> None:
    cols = ["loss", "provider", "mode", "N", "M", "D", "dtype", "ms", "p20", "p80"]
    host = any(r.get("host_ms") is not None for r in rows)
    if host:
        cols.append("host ms")
    cols.append("TFLOP/s")
    if has_peak:
        cols.append("% peak")
    cols += ["extra MiB", "loss value", "x compiled", "x naive"]
    body = []
    for r in rows:
        ok = r["status"] == "ok"
        line = [r["loss"], r["provider"], r["mode"], str(r["N"]), str(r["M"]), str(r["D"]), r["dtype"],
                _cell(r["ms"]) if ok else r["status"], _cell(r["p20"]), _cell(r["p80"])]
        if host:
            line.append(_cell(r.get("host_ms")))
        line.append(_cell(r["tflops"], 2))
        if has_peak:
            line.append(_cell(r["pct_peak"], 1))
        line += [_cell(r["peak_extra_mib"], 1), _cell(r["loss_value"], 5), _cell(r["x_vs_compiled"], 2),
                 _cell(r["x_vs_naive"], 2)]
        body.append(line)
    title = f"{prov['device']} | torch {prov['torch']} | fastcl {prov['fastcl']} @ {prov['git_sha'][:10]}"
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:
        print(title)
        print(" | ".join(cols))
        for line in body:
            print(" | ".join(line))
    else:
        t = Table(title=title, caption=FLOP_CONVENTION + ". " + RATIO_NOTE)
        for c in cols:
            t.add_column(c, justify="left" if c in ("loss", "provider", "mode", "dtype") else "right")
        for line in body:
            t.add_row(*line)
        Console(width=max(160, len(cols) * 11)).print(t)
