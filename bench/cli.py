"""``python -m bench``: the command line and the sweep.

With no arguments: on a GPU the headline sweep (symmetric CLIP, bf16, N in {8192, 32768},
D in {256, 512, 768, 1024}, fwd / bwd / fwd+bwd, every provider that runs here); on CPU a small
run (N in {512, 1024}, D = 128, fp32; naive, fastcl-torch and fastcl-cpu when the extension is
built).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import providers as P
from . import report, timing

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# (N list, D list, dtype names, repeats, warmup, seconds per case)
DEFAULTS = {
    "cuda": dict(N=[8192, 32768], D=[256, 512, 768, 1024], dtype=["bf16"], repeats=50, warmup=10,
                 case_seconds=0.5),
    "cpu": dict(N=[512, 1024], D=[128], dtype=["fp32"], repeats=5, warmup=1, case_seconds=1.0),
}
QUICK = {
    "cuda": dict(N=[1024, 4096], D=[256], repeats=10, warmup=3, case_seconds=0.2),
    "cpu": dict(N=[256], D=[64], repeats=3, warmup=1, case_seconds=0.3),
}


def _list(conv):
    """argparse type for one token of a list option: ``8192`` or ``8192,32768``."""
    def parse(tok: str):
        out = []
        for part in tok.split(","):
            part = part.strip()
            if part:
                out.append(conv(part))
        if not out:
            raise argparse.ArgumentTypeError(f"empty value {tok!r}")
        return out
    return parse


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _choice(choices):
    def parse(s: str) -> str:
        if s not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice {s!r} (choose from {', '.join(choices)})")
        return s
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark fastcl's fused contrastive losses against materialised baselines. "
                    + timing.FLOP_CONVENTION + ".")
    p.add_argument("--loss", nargs="+", type=_list(_choice(P.LOSSES)), help="losses (default clip)")
    p.add_argument("--provider", nargs="+", type=_list(_choice(P.PROVIDERS)),
                   help="implementations (default: those that run on this device)")
    p.add_argument("--mode", nargs="+", type=_list(_choice(timing.MODES)),
                   help="fwd, bwd, fwdbwd (default all three)")
    p.add_argument("--N", nargs="+", type=_list(_pos_int), help="rows (queries)")
    p.add_argument("--M", nargs="+", type=_list(_pos_int),
                   help="columns (keys) for info_nce / siglip / gist (default M = N)")
    p.add_argument("--D", nargs="+", type=_list(_pos_int), help="feature dimension")
    p.add_argument("--dtype", nargs="+", type=_list(_choice(tuple(DTYPES))), help="bf16, fp16, fp32")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--out", default=None, help="results folder (default bench/results/<device name>/)")
    p.add_argument("--repeats", type=_pos_int, default=None, help="timed repeats per case (at most)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per case")
    p.add_argument("--case-seconds", type=float, default=None,
                   help="cap on the timed repeats of one case, in seconds (never fewer than 5)")
    p.add_argument("--quick", action="store_true", help="a tiny sweep (smoke test)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for the %% of peak column (default on a GPU: measured at the start "
                        "of the run, an 8192^3 matrix product in each dtype, float32 as TF32)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (the rest is listed as skipped)")
    p.add_argument("--threads", type=_pos_int, default=None,
                   help="CPU threads for torch (default: torch's); fewer than the free cores keeps "
                        "CPU timings stable on a shared machine")
    p.add_argument("--triton-config", action="append", default=[], metavar="NAME=JSON",
                   help="also measure provider fastcl-triton@NAME with this engine configuration, "
                        "e.g. 'w4={\"fwd_plain.num_warps\": 4}' or 'dense={\"DENSE\": true}' "
                        "(repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="print the table only, write no files")
    p.add_argument("--no-plots", action="store_true", help="write CSV/JSON but no PNG")
    return p


def _flat(xs) -> Optional[List]:
    if xs is None:
        return None
    out = []
    for group in xs:
        for x in group:
            if x not in out:
                out.append(x)
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line and fill the device-dependent defaults."""
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        a.device = resolve_device(a.device)
    except ValueError as e:
        parser.error(str(e))
    kind = "cuda" if a.device.type == "cuda" else "cpu"
    d = dict(DEFAULTS[kind])
    if a.quick:
        d.update(QUICK[kind])
    a.loss = _flat(a.loss) or ["clip"]
    a.mode = _flat(a.mode) or list(timing.MODES)
    a.N = _flat(a.N) or d["N"]
    a.M = _flat(a.M)
    a.D = _flat(a.D) or d["D"]
    a.dtype = [DTYPES[x] for x in (_flat(a.dtype) or d["dtype"])]
    a.dtype = list(dict.fromkeys(a.dtype))
    a.provider_explicit = a.provider is not None
    a.provider = _flat(a.provider) or P.default_providers(a.device)
    for spec in a.triton_config:
        try:
            name = P.add_triton_variant(spec)
        except ValueError as e:
            parser.error(str(e))
        if name not in a.provider:
            a.provider.append(name)
    a.repeats = a.repeats or d["repeats"]
    a.warmup = d["warmup"] if a.warmup is None else a.warmup
    if a.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {a.warmup}")
    a.case_seconds = d["case_seconds"] if a.case_seconds is None else a.case_seconds
    if a.out is None:
        a.out = report.default_out_dir(a.device)
    return a


def peak_for(args, dtype: torch.dtype) -> Optional[float]:
    """TF/s of the %-of-peak column: --peak-tflops, else on a GPU the matrix-product ceiling
    measured once per dtype in this run (timing.matmul_tflops); none on CPU."""
    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.device.type != "cuda":
        return None
    measured = args.__dict__.setdefault("measured_peaks", {})
    if dtype not in measured:
        try:
            measured[dtype] = sig(timing.matmul_tflops(dtype, args.device), 4)
        except Exception as e:  # no peak column rather than no results
            print(f"note: matrix-product peak not measured ({type(e).__name__}: {e})")
            measured[dtype] = None
    return measured[dtype]


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar, or plain prints when rich is missing."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self._p = None
        if not sys.stdout.isatty():  # logs get one line per case instead of a redrawn bar
            return
        try:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn())
        except Exception:
            self._p = None

    def __enter__(self):
        if self._p is not None:
            self._p.__enter__()
            self._task = self._p.add_task("bench", total=self.total)
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def note(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def step(self, desc: str, advance: int = 1) -> None:
        self.done += advance
        if self._p is not None:
            self._p.update(self._task, advance=advance, description=desc)
        else:
            print(f"[{self.done}/{self.total}] {desc}", flush=True)


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


def plan_shapes(args):
    """(loss, dtype, D, N, M) groups in sweep order; a loss needing M == N keeps only those."""
    shapes = []
    for loss in args.loss:
        for dtype in args.dtype:
            for D in args.D:
                for N in args.N:
                    for M in (args.M or [N]):
                        if P.square_only(loss) and M != N:
                            continue
                        if loss in ("info_nce", "gist") and M < N:
                            continue
                        shapes.append((loss, dtype, D, N, M))
    return shapes


def _row(loss, provider, mode, N, M, D, dtype) -> Dict:
    r = {c: None for c in report.COLUMNS}
    r.update(loss=loss, provider=provider, mode=mode, N=N, M=M, D=D, dtype=DTYPE_NAMES[dtype],
             status="ok")
    return r


def _error_status(e: BaseException) -> str:
    if timing.is_oom(e):
        return "OOM"
    msg = " ".join(str(e).split())
    return f"error: {type(e).__name__}: {msg[:160]}"


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (small TFLOP/s on CPU stay non-zero)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def run_case(fn, input_sets, row: Dict, args, peak: Optional[float]) -> Dict:
    """Time one (provider, mode, shape); failures become the row's status, never exceptions."""
    dev = args.device
    mode, N, M, D = row["mode"], row["N"], row["M"], row["D"]
    try:
        t = timing.time_step(fn, input_sets, mode, dev, warmup=args.warmup, repeats=args.repeats,
                             max_seconds=args.case_seconds)
        row.update(ms=sig(t.ms, 5), p20=sig(t.p20, 5), p80=sig(t.p80, 5), repeats=t.repeats,
                   host_ms=None if t.host_ms is None else sig(t.host_ms, 4))
        tf = timing.tflops(mode, *P.similarity_shape(row["loss"], N, M), D, t.ms)
        row["tflops"] = sig(tf, 4)
        if peak:
            row["pct_peak"] = sig(100.0 * tf / peak, 3)
        extra = timing.peak_extra_bytes(fn, input_sets[0], mode, dev)
        if extra is not None:
            row["peak_extra_mib"] = round(extra / 2**20, 1)
        row["loss_value"] = timing.loss_value(fn, input_sets[0], no_grad=mode == "fwd")
    except Exception as e:  # OOM and failures are results, not crashes
        row["status"] = _error_status(e)
        for k in ("ms", "p20", "p80", "host_ms", "tflops", "pct_peak", "peak_extra_mib",
                  "loss_value"):
            row[k] = None
    if row["status"] != "ok":  # outside the handler: the traceback no longer pins the tensors
        timing.free_memory(dev)
    return row


# devices where engine configurations with the same launch plan at a shape are timed once, and
# the compute capability their plans assume (None: the GPU's own)
PLAN_DEVICES = ("cuda",)
PLAN_ARCH: Optional[int] = None


def _is_engine(provider: str) -> bool:
    """fastcl-triton or one of its @variants (engine configurations)."""
    return provider == "fastcl-triton" or provider in P.TRITON_VARIANTS


def same_launches(prov_name: str, fn, inputs, mode: str, seen: Dict) -> Optional[str]:
    """The provider already in ``seen`` (launch signature -> provider, for one shape and mode)
    whose launches ``prov_name`` would repeat in ``mode`` (bench/launch_plan.py: kernels, grids,
    arguments, configurations and the torch operators between them), else None after recording
    its own. Never an exception: without a plan the case is timed."""
    try:
        from . import launch_plan

        with P.engine_config(prov_name):
            key = (mode, launch_plan.mode_signature(fn, inputs, mode, PLAN_ARCH))
    except Exception:
        return None
    if key in seen:
        return seen[key]
    seen[key] = prov_name
    return None


def run(args, log=None) -> Dict:
    """Run the sweep described by parsed ``args``; returns {"rows", "skipped", "provenance", "files"}."""
    dev = args.device
    shapes = plan_shapes(args)
    total = len(shapes) * len(args.provider) * len(args.mode)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 baselines at their usual speed
    extra = {"repeats": args.repeats, "warmup": args.warmup, "case_seconds": args.case_seconds,
             "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        extra["tf32_matmul"] = "on (fp32 baselines use TF32, as fastcl's default exact=False)"
        peaks = {DTYPE_NAMES[dt]: peak_for(args, dt) for dt in args.dtype}
        extra["peak_tflops"] = (f"{args.peak_tflops:g} (--peak-tflops)" if args.peak_tflops is not None
                                else ", ".join(f"{k} {v}" for k, v in peaks.items())
                                + " (measured here: median 8192^3 torch.mm, float32 as TF32)")
    prov = report.provenance(dev, extra=extra)
    rows: List[Dict] = []
    skipped: List[Dict] = []
    unavailable: Dict = {}
    files: List[str] = []
    cache = timing.H100_L2_BYTES if dev.type == "cuda" else timing.CPU_CACHE_BYTES
    gen_device = dev if dev.type == "cuda" else "cpu"
    t_start = time.perf_counter()
    with _Progress(total) as bar:
        if total == 0:
            bar.note("nothing to run: no (loss, shape) pair fits the given --N/--M")
        for loss, dtype, D, N, M in shapes:
            dname = DTYPE_NAMES[dtype]
            todo = []
            for prov_name in args.provider:
                key = (loss, prov_name, dname)
                if key not in unavailable:
                    try:
                        P.build(loss, prov_name, dev, dtype) if prov_name != "compiled" else \
                            P.naive_fn(loss)
                        unavailable[key] = None
                    except P.Unavailable as e:
                        unavailable[key] = str(e)
                        skipped.append({"loss": loss, "provider": prov_name, "dtype": dname,
                                        "reason": str(e)})
                        bar.note(f"skip {loss} / {prov_name} / {dname}: {e}")
                if unavailable[key] is None:
                    todo.append(prov_name)
                else:
                    bar.step(f"{loss} {prov_name} skipped", advance=len(args.mode))
            if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                for prov_name in todo:
                    skipped.append({"loss": loss, "provider": prov_name, "dtype": dname,
                                    "reason": f"time budget ({args.budget_s:g} s) reached before "
                                              f"N={N} M={M} D={D}"})
                bar.step("budget reached", advance=len(todo) * len(args.mode))
                continue
            if "compiled" in todo:
                P.reset_compiled()
            input_sets = first = None
            try:
                gen = torch.Generator(device=gen_device).manual_seed(args.seed + N + 7 * D)
                first = P.make_inputs(loss, N, M, D, dtype, dev, gen)
                n = timing.copies_for(P.input_bytes(first), cache)
                input_sets = [first] + [P.make_inputs(loss, N, M, D, dtype, dev, gen)
                                        for _ in range(n - 1)]
            except Exception as e:
                status = _error_status(e)
            else:
                status = None
            if status is not None:
                input_sets = first = None
                timing.free_memory(dev)
                for prov_name in todo:
                    for mode in args.mode:
                        r = _row(loss, prov_name, mode, N, M, D, dtype)
                        r["status"] = status
                        rows.append(r)
                bar.step(f"{loss} N={N} D={D}: inputs {status}", advance=len(todo) * len(args.mode))
                continue
            peak = peak_for(args, dtype)
            # engine configurations (fastcl-triton and its @variants) with one launch plan at
            # this shape and mode are timed once: the others' rows say whose launches they repeat
            plans: Optional[Dict] = {} if (dev.type in PLAN_DEVICES
                                           and sum(map(_is_engine, todo)) > 1) else None
            for prov_name in todo:
                try:
                    fn = P.build(loss, prov_name, dev, dtype)
                except Exception as e:  # built fine for an earlier shape; record, go on
                    fn, err = None, _error_status(e)
                for mode in args.mode:
                    r = _row(loss, prov_name, mode, N, M, D, dtype)
                    twin = None
                    if fn is not None and plans is not None and _is_engine(prov_name):
                        twin = same_launches(prov_name, fn, first, mode, plans)
                    if fn is None:
                        r["status"] = err
                    elif twin is not None:
                        r["status"] = f"same launches as {twin}"
                    else:
                        with P.engine_config(prov_name):
                            run_case(fn, input_sets, r, args, peak)
                    rows.append(r)
                    shown = f"{r['ms']:.3f} ms" if r["status"] == "ok" else r["status"]
                    bar.step(f"{loss} {prov_name} {mode} N={N} M={M} D={D} {dname}: {shown}")
                fn = None
            input_sets = first = None
            timing.free_memory(dev)
            report.add_ratios(rows)
            if not args.no_save:
                files = report.write_results(args.out, rows, prov, skipped)
    report.add_ratios(rows)
    if not args.no_save:
        files = report.write_results(args.out, rows, prov, skipped)
        if not args.no_plots:
            try:
                files += report.plot_results(args.out, rows, prov)
            except Exception as e:  # a plotting problem never loses the measured rows
                print(f"note: plots not written ({type(e).__name__}: {e})")
    return {"rows": rows, "skipped": skipped, "provenance": prov, "files": files,
            "peak": any(peak_for(args, dt) for dt in args.dtype)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    res = run(args)
    if res["rows"]:
        report.print_table(res["rows"], res["provenance"], has_peak=res["peak"])
    for s in res["skipped"]:
        print(f"skipped {s['loss']} / {s['provider']} / {s['dtype']}: {s['reason']}")
    if res["files"]:
        print("results: " + ", ".join(res["files"]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
