"""Train a small encoder with SimCLR's NT-Xent (or SupCon) over torch.distributed, DDP-style.

The global batch is split across the ranks: each encodes its slice (two noisy views of each
sample), and the loss is :func:`fastcl.distributed.nt_xent` / :func:`~fastcl.distributed.supcon`
of the whole global batch. ``--mode ring`` passes row blocks from rank to rank (no rank ever holds
every rank's rows); ``--mode gather`` all-gathers them. The encoder is wrapped in
DistributedDataParallel: its averaging of the parameter gradients, together with the module's
convention (each rank's feature gradient is W times its slice of the global one), gives exactly
the gradient of the single-process loss of the global batch. ``--check`` verifies that after the
first step, against the single-process fused loss on the gathered batch.

    python examples/train_simclr_ddp.py --tiny                 # 2 CPU processes over gloo, seconds
    python examples/train_simclr_ddp.py --tiny --check --loss supcon --mode gather
    torchrun --nproc-per-node 8 examples/train_simclr_ddp.py   # one process per GPU, NCCL, bf16

Without torchrun the script starts ``--procs`` processes itself (gloo on CPU, or NCCL with one GPU
each when there are enough).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastcl
import fastcl.distributed as fdist


class Encoder(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden),
                                 nn.GELU(), nn.Linear(d_hidden, d_out))

    def forward(self, x):
        return self.net(x)  # (the losses normalise the rows themselves)


class ViewData:
    """Samples of K latent classes seen through a fixed random map; two views per sample differ
    by their noise. Each rank draws its own slice of the global batch (seed, step, rank)."""

    def __init__(self, classes: int, d_latent: int, d_in: int, noise: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(classes, d_latent, generator=g)
        self.A = torch.randn(d_latent, d_in, generator=g) / math.sqrt(d_latent)
        self.noise, self.seed = noise, seed

    def slice(self, n: int, step: int, rank: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + rank)
        y = torch.randint(0, self.centres.shape[0], (n,), generator=g)
        z = self.centres[y] + 0.5 * torch.randn(n, self.centres.shape[1], generator=g)
        x = z @ self.A
        views = [x + self.noise * torch.randn(x.shape, generator=g) for _ in range(2)]
        return views[0], views[1], y


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(args, e1, e2, y, distributed: bool):
    """The global loss from this rank's embeddings (distributed), or the single-process loss of
    the whole batch."""
    if args.loss == "simclr":
        if distributed:
            return fdist.nt_xent(e1, e2, args.temperature, mode=args.mode)
        return fastcl.nt_xent(e1, e2, args.temperature)
    feats = torch.stack([e1, e2], dim=1)  # (n, 2 views, D)
    if distributed:
        return fdist.supcon(feats, y, args.temperature, mode=args.mode)
    return fastcl.supcon(feats, y, args.temperature)


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _check(args, model: DDP, x1, x2, y, device) -> float:
    """Max |DDP gradient - single-process gradient| over the parameters, relative to the largest
    gradient entry: the single-process fused loss of the gathered global batch, on a copy of the
    (identical) parameters."""
    ref = Encoder(args.d_in, args.d_hidden, args.d_emb).to(device)
    ref.load_state_dict(model.module.state_dict())
    X1, X2, Y = _gather(x1), _gather(x2), _gather(y)
    with _autocast(device):
        loss = _loss(args, ref(X1), ref(X2), Y, distributed=False)
    loss.backward()
    err = max((p.grad - r.grad).abs().max().item() for p, r in zip(model.parameters(), ref.parameters()))
    size = max(r.grad.abs().max().item() for r in ref.parameters())
    return err / size


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _use_cuda(args, world: int, torchrun: bool) -> bool:
    """One GPU per process: torchrun's local ranks, or as many GPUs here as processes started."""
    return (torch.cuda.is_available() and not args.cpu
            and (torchrun or torch.cuda.device_count() >= world))


def worker(rank: int, world: int, args, port: int = 0) -> int:
    torchrun = port == 0
    if not torchrun:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = _use_cuda(args, world, torchrun)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        return _train(rank, world, args, device)
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, args, device: torch.device) -> int:
    torch.manual_seed(args.seed)  # the same initial parameters on every rank (DDP checks them)
    data = ViewData(args.classes, args.d_latent, args.d_in, noise=0.3, seed=args.seed)
    model = DDP(Encoder(args.d_in, args.d_hidden, args.d_emb).to(device),
                device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n = args.batch // world  # each rank's slice of the global batch
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{world} ranks ({device.type}), global batch {n * world} ({n} per rank, 2 views), "
        f"loss={args.loss} mode={args.mode}")
    first = last = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x1, x2, y = (t.to(device) for t in data.slice(n, step, rank))
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = _loss(args, model(x1), model(x2), y, distributed=True)
        loss.backward()  # DDP averages the parameter gradients over the ranks
        if step == 1 and args.check:
            rel = _check(args, model, x1, x2, y, device)
            say(f"step 1: DDP gradients against the single-process loss of the global batch: "
                f"max relative difference {rel:.1e}")
            if not rel <= args.check_tol:
                say(f"gradients differ by more than {args.check_tol:g}")
                return 1
            say("gradients match")
        opt.step()
        value = loss.item()  # (the global loss: the same on every rank)
        first = value if first is None else first
        last = value
        say(f"step {step}: loss {value:.4f}")
    say(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s; loss {first:.4f} -> {last:.4f}")
    return 0


def _spawned(rank: int, world: int, args, port: int) -> None:
    if worker(rank, world, args, port) != 0:
        raise SystemExit(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small CPU-friendly sizes")
    p.add_argument("--loss", choices=("simclr", "supcon"), default="simclr")
    p.add_argument("--mode", choices=fdist.MODES, default="ring")
    p.add_argument("--procs", type=int, default=2, help="processes to start without torchrun")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even when GPUs are present")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch (samples)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--check", action="store_true",
                   help="compare the first step's DDP gradients with the single-process loss's")
    p.add_argument("--check-tol", type=float, default=None,
                   help="relative tolerance of --check (default 1e-4; 2e-2 under bf16 autocast)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = dict(batch=256, steps=5, classes=16, d_latent=8, d_in=32, d_hidden=64, d_emb=32)
    full = dict(batch=65536, steps=50, classes=1000, d_latent=64, d_in=256, d_hidden=1024, d_emb=128)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    torchrun = "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if torchrun else args.procs
    if args.batch % world:
        p.error(f"--batch {args.batch} must be a multiple of the {world} processes")
    args.check_tol = args.check_tol or (2e-2 if _use_cuda(args, world, torchrun) else 1e-4)
    if torchrun:
        return worker(int(os.environ["RANK"]), world, args)
    try:
        mp.spawn(_spawned, args=(world, args, _free_port()), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:
        print(e)
        return 1
    except mp.ProcessExitedException:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
