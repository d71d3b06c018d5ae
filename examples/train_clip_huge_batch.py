"""Train a small dual encoder with a CLIP loss on a batch far larger than a naive loss could hold.

Synthetic paired data: a hidden latent z per pair; the "image" is one random linear view of z plus
noise, the "text" another view (of a different width) plus noise. Two MLP towers (with dropout) are
trained with the symmetric CLIP loss and a learnable logit scale. Each step encodes the batch in
chunks with :func:`fastcl.train.chunked_contrastive_step` (activation memory of one chunk) and the
fused loss (O(B) memory instead of the B x B logits).

    python examples/train_clip_huge_batch.py --tiny            # CPU, a few seconds
    python examples/train_clip_huge_batch.py                   # CUDA: B = 65536, bf16 autocast
    python examples/train_clip_huge_batch.py --compare-naive   # CUDA: also the naive step's peak memory

On CUDA it reports the peak memory of the chunked + fused step and, with --compare-naive, of a
naive step (full-batch autograd encoding + the materialised reference loss), or that it ran out of
memory.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import fastcl
from fastcl import reference
from fastcl.train import chunked_contrastive_step


class Tower(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_hidden, d_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(d_hidden, d_out))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


class DualEncoder(nn.Module):
    def __init__(self, d_img: int, d_txt: int, d_hidden: int, d_emb: int, dropout: float):
        super().__init__()
        self.image = Tower(d_img, d_hidden, d_emb, dropout)
        self.text = Tower(d_txt, d_hidden, d_emb, dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class PairedData:
    """Pairs (image (B, d_img), text (B, d_txt)) sharing a latent (B, d_latent)."""

    def __init__(self, d_latent, d_img, d_txt, noise, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(d_latent, d_img, generator=g).to(device) / math.sqrt(d_latent)
        self.B = torch.randn(d_latent, d_txt, generator=g).to(device) / math.sqrt(d_latent)
        self.d_latent, self.noise, self.device = d_latent, noise, device

    def sample(self, n, gen=None):
        z = torch.randn(n, self.d_latent, device=self.device, generator=gen)
        img = z @ self.A + self.noise * torch.randn(n, self.A.shape[1], device=self.device, generator=gen)
        txt = z @ self.B + self.noise * torch.randn(n, self.B.shape[1], device=self.device, generator=gen)
        return img, txt


@torch.no_grad()
def recall_at_1(model, img, txt, chunk):
    """Image->text top-1 retrieval accuracy, scored chunk by chunk (no B x B matrix kept)."""
    model.eval()
    ei = torch.cat([model.image(img[s:s + chunk]) for s in range(0, img.shape[0], chunk)])
    et = torch.cat([model.text(txt[s:s + chunk]) for s in range(0, txt.shape[0], chunk)])
    hits = 0
    for s in range(0, ei.shape[0], chunk):
        best = (ei[s:s + chunk] @ et.T).argmax(1)
        hits += (best == torch.arange(s, s + best.shape[0], device=best.device)).sum().item()
    model.train()
    return hits / ei.shape[0]


def naive_step(model, img, txt):
    """The step a naive implementation takes: full-batch autograd encoding, materialised loss."""
    loss = reference.clip_loss(model.image(img), model.text(txt), model.logit_scale.exp())
    loss.backward()
    return loss.detach()


def peak_memory(fn, device):
    """Peak CUDA memory (bytes) allocated while fn runs, above what was allocated before; or the
    error text when it runs out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        fn()
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return torch.cuda.max_memory_allocated(device) - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small CPU-friendly run")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="pairs per step (global batch)")
    p.add_argument("--chunk", type=int, default=None, help="pairs per encoder call")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--compare-naive", action="store_true",
                   help="CUDA: also measure the naive step's peak memory on the same batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tiny:
        batch, chunk, steps, dims = 1024, 256, 3, dict(d_latent=16, d_img=48, d_txt=32, d_hidden=64, d_emb=32)
    else:
        batch, chunk, steps, dims = 65536, 4096, 20, dict(d_latent=64, d_img=256, d_txt=192, d_hidden=512, d_emb=128)
    batch = args.batch or batch
    chunk = args.chunk or chunk
    steps = args.steps if args.steps is not None else steps
    torch.manual_seed(args.seed)

    data = PairedData(dims["d_latent"], dims["d_img"], dims["d_txt"], noise=0.5, device=device, seed=args.seed)
    model = DualEncoder(dims["d_img"], dims["d_txt"], dims["d_hidden"], dims["d_emb"], dropout=0.1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    cuda = device.type == "cuda"
    autocast = torch.bfloat16 if cuda else None
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    eval_img, eval_txt = data.sample(min(batch, 4096), gen)

    def loss_fn(ei, et):
        return fastcl.clip_loss(ei, et, model.logit_scale.exp())

    print(f"device={device} batch={batch} chunk={chunk} steps={steps} "
          f"B x B logits would be {batch * batch * 4 / 2**20:,.0f} MiB in float32")
    print(f"step 0: R@1 (image->text, {eval_img.shape[0]} pairs) = {recall_at_1(model, eval_img, eval_txt, chunk):.3f}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        img, txt = data.sample(batch, gen)
        opt.zero_grad(set_to_none=True)
        loss = chunked_contrastive_step((model.image, model.text), (img, txt), loss_fn, chunk,
                                        autocast=autocast)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        print(f"step {step}: loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}")
    elapsed = time.perf_counter() - t0
    print(f"{steps} steps in {elapsed:.1f} s; R@1 = {recall_at_1(model, eval_img, eval_txt, chunk):.3f}")

    if cuda:
        img, txt = data.sample(batch, gen)

        def ours():
            opt.zero_grad(set_to_none=True)
            chunked_contrastive_step((model.image, model.text), (img, txt), loss_fn, chunk, autocast=autocast)

        mem = peak_memory(ours, device)
        print(f"peak memory, chunked step + fused loss: {mem / 2**30:.2f} GiB")
        if args.compare_naive:
            def naive():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    naive_step(model, img, txt)

            mem_n = peak_memory(naive, device)
            print("peak memory, naive step (full-batch encode + materialised loss): "
                  + ("out of memory" if mem_n is None else f"{mem_n / 2**30:.2f} GiB"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
