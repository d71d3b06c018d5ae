"""``python -m bench.ring``: the rings of ``fastcl.distributed`` over W processes, forward +
backward. ``--loss nt_xent``: NT-Xent's Gram-symmetric ring (each tile of two ranks' row blocks
swept once: W // 2 + 1 tiles per rank) against the full one (W tiles per rank); ``--loss
siglip``: SigLIP's ring of steps (one ring, each text block swept once, its dK travelling home
in the forward) against the forward ring and the backward ring (each block swept twice).

Each of W spawned processes holds n pairs (NT-Xent: 2n rows of width D; SigLIP: n images and
n texts). A step is one ring loss forward and backward with the ranks released together by a
barrier; its time is the slowest rank's (an all-reduce of the per-rank times, MAX); the rings take turns within each repeat.
Median, p20 and p80 over the repeats.
CPU: gloo, one thread per process (``--threads``); CUDA: NCCL, one GPU per process (needs W of
them). Results: ``ring.csv`` / ``ring.json`` / ``ring.png`` under ``--out`` with the provenance of
:func:`bench.report.provenance`.

    python -m bench.ring --world 4 --n 512 --D 128 --out bench/results/cpu-ring
    python -m bench.ring --loss siglip --world 4 --n 1024 --D 128 --out bench/results/cpu-ring/siglip-world4
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .timing import percentile

COLUMNS = ("loss", "world", "n", "rows", "D", "dtype", "backend", "ring", "tiles", "ms", "p20",
           "p80", "speedup")
RINGS = {"nt_xent": ("full", "mirrored"), "siglip": ("two_rings", "step")}


def _port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(rows: torch.Tensor, positives: torch.Tensor, backend: str, mirror: bool) -> None:
    """One NT-Xent ring forward + backward; ``backend`` concrete (:func:`_concrete`)."""
    from fastcl import distributed as fdist
    x = rows.detach().requires_grad_(True)
    s = torch.tensor(1 / 0.1, dtype=torch.float32, device=x.device)
    per, _, _ = fdist._ring(x, x, s, None, positives, exact=False, backend=backend, group=None,
                            exclude_self=True, mirror=mirror)
    per.sum().backward()


def _siglip_step(images: torch.Tensor, texts: torch.Tensor, backend: str, ring: str) -> None:
    """One SigLIP ring forward + backward (the mean over the global batch, a learnable scale and
    bias): ``ring`` "step" (:class:`fastcl.distributed._RingStep`) or "two_rings"."""
    from fastcl import distributed as fdist
    from fastcl.ops import LossSpec
    q, k = images.detach().requires_grad_(True), texts.detach().requires_grad_(True)
    s = torch.tensor(10.0, device=q.device, requires_grad=True)
    b = torch.tensor(-10.0, device=q.device, requires_grad=True)
    weight = 1.0 / (fdist._world(None)[0] * q.shape[0])
    if ring == "step":
        total = fdist._RingStep.apply(q, k, s, b, (LossSpec(kind="sigmoid"), backend, None, weight,
                                                   None))
    else:
        rows, _, _ = fdist._ring(q, k, s, b, None, kind="sigmoid", exact=False, backend=backend,
                                 group=None)
        total = rows.sum() * weight
    total.backward()


def _concrete(backend: str, x: torch.Tensor) -> str:
    from fastcl import _backend
    return _backend.concrete(_backend.resolve(backend, x.device, x.dtype), False)


def _worker(rank: int, args, port: int, out: str) -> None:
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=600))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    gen = torch.Generator().manual_seed(rank)
    rows = torch.nn.functional.normalize(
        torch.randn(2 * args.n, args.D, generator=gen), dim=1).to(dev)
    positives = torch.arange(2 * args.n, device=dev).add_(args.n).remainder_(2 * args.n)
    backend = _concrete(args.backend, rows)
    results: Dict[str, List[float]] = {name: [] for name in RINGS[args.loss]}
    # the rings take turns within each repeat, so that a drift of the machine's speed (a shared
    # or throttled CPU) reaches both alike
    for i in range(args.warmup + args.repeats):
        for name in RINGS[args.loss]:
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if args.loss == "siglip":  # (n images, n texts)
                _siglip_step(rows[:args.n], rows[args.n:], backend, name)
            else:
                _step(rows, positives, backend, name == "mirrored")
            if cuda:
                torch.cuda.synchronize()
            ms = torch.tensor([(time.perf_counter() - t0) * 1e3], dtype=torch.float64, device=dev)
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
            if i >= args.warmup:
                results[name].append(ms.item())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"backend": backend, **results}, f)
    dist.barrier()
    # exit without tearing the group down: torch < 2.5's gloo group can hang in its destructor
    # (see tests/_gloo.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


_TITLES = {"nt_xent": "NT-Xent", "siglip": "SigLIP"}


def _plot(path: str, rows: List[Dict], prov: Dict[str, str]) -> None:
    """Each ring's median step time, p20 - p80 as the error bar (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ms = [r["ms"] for r in rows]
    err = [[r["ms"] - r["p20"] for r in rows], [r["p80"] - r["ms"] for r in rows]]
    ax.bar([f"{r['ring']}\n{r['tiles']} tiles / rank" for r in rows], ms, yerr=err, capsize=4,
           color=["#999999", "#1f77b4"])
    r0 = rows[0]
    ax.set_ylabel("ms per forward + backward")
    ax.set_title(f"{_TITLES[r0['loss']]} ring, W = {r0['world']}, {r0['rows']} rows x D = {r0['D']} "
                 f"per rank, {r0['backend']}", fontsize=8)
    fig.text(0.01, 0.01, f"{prov['device']} | torch {prov['torch']} | {prov['git_sha'][:10]}",
             fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", choices=sorted(RINGS), default="nt_xent",
                    help="nt_xent: full vs mirrored ring; siglip: two rings vs the ring of steps")
    ap.add_argument("--world", type=int, default=4, help="processes (ranks)")
    ap.add_argument("--n", type=int, default=512, help="pairs per rank (2n rows)")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--backend", default="auto", help="fastcl backend of the tiles")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="directory for ring.csv / ring.json")
    args = ap.parse_args(argv)
    if args.world < 1 or args.n < 1 or args.D < 1 or args.repeats < 1:
        ap.error("--world, --n, --D and --repeats must be positive")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        ap.error(f"--device cuda needs --world GPUs, found {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "times.json")
        mp.start_processes(_worker, args=(args, _port(), path), nprocs=args.world,
                           start_method="spawn")
        with open(path) as f:
            times = json.load(f)
    tiles = {"full": args.world, "mirrored": args.world // 2 + 1, "two_rings": 2 * args.world,
             "step": args.world}  # (tiles swept per rank: SigLIP's two rings sweep each twice)
    rows = []
    for name in RINGS[args.loss]:
        ms = percentile(times[name], 50)
        rows.append(dict(loss=args.loss, world=args.world, n=args.n,
                         rows=args.n if args.loss == "siglip" else 2 * args.n, D=args.D, dtype="float32",
                         backend=times["backend"], ring=name, tiles=tiles[name], ms=ms,
                         p20=percentile(times[name], 20), p80=percentile(times[name], 80)))
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
    print(" ".join(f"{c:>9}" for c in COLUMNS))
    for r in rows:
        print(" ".join(f"{r[c]:>9.3f}" if isinstance(r[c], float) else f"{r[c]!s:>9}"
                       for c in COLUMNS))
    if args.out:
        from . import report
        given = list(sys.argv[1:] if argv is None else argv)
        prov = report.provenance(torch.device(args.device), argv=["bench"] + given)
        prov["command"] = "python -m bench.ring " + " ".join(shlex.quote(a) for a in given)
        for key in ("flops", "ratios", "memory", "host"):  # (the single-process sweep's columns)
            prov.pop(key, None)
        prov["timing"] = ("wall clock of one forward + backward per step, the ranks released by a "
                          "barrier, the slowest rank's time; the rings take turns within each "
                          "repeat; median (p20, p80) over the repeats")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ring.csv"), "w", newline="") as f:
            for k, v in prov.items():
                f.write(f"# {k}: {v}\n")
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow([f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in COLUMNS])
        with open(os.path.join(args.out, "ring.json"), "w") as f:
            json.dump({"provenance": prov, "columns": list(COLUMNS), "rows": rows}, f, indent=1)
        _plot(os.path.join(args.out, "ring.png"), rows, prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
