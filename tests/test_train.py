"""The chunked step must reproduce the parameter gradients of an unchunked step."""
import pytest
import torch
from torch import nn

import fastcl
from fastcl import reference
from fastcl.train import chunked_contrastive_step


class Tower(nn.Module):
    """A tiny encoder with dropout: (B, d_in) -> (B, D), L2-normalised."""

    def __init__(self, d_in, d_out, p=0.3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 24), nn.GELU(), nn.Dropout(p), nn.Linear(24, d_out))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


class TextTower(nn.Module):
    """Token ids (+ a mask) in a dict: a different input type from the image tower."""

    def __init__(self, vocab, d_out, p=0.2):
        super().__init__()
        self.emb = nn.Embedding(vocab, 16)
        self.drop = nn.Dropout(p)
        self.proj = nn.Linear(16, d_out)

    def forward(self, batch):
        h = self.drop(self.emb(batch["ids"]))
        m = batch["mask"].unsqueeze(-1).to(h.dtype)
        h = (h * m).sum(1) / m.sum(1)
        return nn.functional.normalize(self.proj(h), dim=-1)


def _make(dtype, seed=0):
    torch.manual_seed(seed)
    img, txt = Tower(12, 8).to(dtype), TextTower(50, 8).to(dtype)
    logit_scale = nn.Parameter(torch.tensor(2.3, dtype=dtype))
    return img, txt, logit_scale


def _data(B, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 12, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, 50, (B, 5), generator=g)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[:, 3:] = torch.randint(0, 2, (B, 2), generator=g)
    return x, {"ids": ids, "mask": mask}


def _params(*mods):
    out = []
    for m in mods:
        out.extend(m.parameters() if isinstance(m, nn.Module) else [m])
    return out


def _reference_step(img, txt, logit_scale, x, t, chunk, loss_fn, seed):
    """Unchunked autograd step that encodes the same chunks in the same order (same dropout draws)."""
    torch.manual_seed(seed)
    ei = torch.cat([img(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)])
    et = torch.cat([txt({k: v[s:s + chunk] for k, v in t.items()}) for s in range(0, x.shape[0], chunk)])
    loss = loss_fn(ei, et)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_dual_encoder_dropout_matches_unchunked(dtype, tol):
    B, chunk, seed = 22, 5, 123  # uneven last chunk
    img, txt, ls = _make(dtype)
    x, t = _data(B, dtype)

    def loss_fn(ei, et):
        return 0.7 * fastcl.clip_loss(ei, et, ls.exp(), backend="torch")  # grad_output != 1

    ref_loss = _reference_step(img, txt, ls, x, t, chunk, loss_fn, seed)
    ref = [p.grad.clone() for p in _params(img, txt, ls)]
    for p in _params(img, txt, ls):
        p.grad = None

    torch.manual_seed(seed)
    loss = chunked_contrastive_step((img, txt), (x, t), loss_fn, chunk)
    assert not loss.requires_grad
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    got = [p.grad for p in _params(img, txt, ls)]
    for r, g in zip(ref, got):
        assert g is not None
        assert r.abs().max() > 0
        assert (g - r).abs().max().item() <= tol * max(1.0, r.abs().max().item())
    assert ls.grad.abs().item() > 1e-8  # learnable scale got its gradient

    # the loss agrees with the float64 reference oracle on the same embeddings
    torch.manual_seed(seed)
    with torch.no_grad():
        ei = torch.cat([img(x[s:s + chunk]) for s in range(0, B, chunk)]).double()
        et = torch.cat([txt({k: v[s:s + chunk] for k, v in t.items()}) for s in range(0, B, chunk)]).double()
        want = 0.7 * reference.clip_loss(ei, et, ls.detach().double().exp())
    assert abs(loss.item() - want.item()) <= 10 * tol


def test_rng_replay_matters():
    """Without the RNG replay the dropout masks differ and the gradients must not match: the check
    above is not vacuous."""
    dtype, B, chunk = torch.float64, 12, 4
    img, txt, ls = _make(dtype)
    x, t = _data(B, dtype)

    def loss_fn(ei, et):
        return fastcl.clip_loss(ei, et, ls.exp(), backend="torch")

    _reference_step(img, txt, ls, x, t, chunk, loss_fn, seed=5)
    ref = [p.grad.clone() for p in _params(img)]
    for p in _params(img, txt, ls):
        p.grad = None
    _reference_step(img, txt, ls, x, t, chunk, loss_fn, seed=6)  # other masks
    other = [p.grad for p in _params(img)]
    assert max((a - b).abs().max().item() for a, b in zip(ref, other)) > 1e-4


def test_shared_encoder_nt_xent_and_infonce_hard_negatives():
    """A single encoder shared by both inputs (SimCLR), and towers with different batch sizes
    (queries vs keys with hard negatives), float64 against an unchunked step."""
    dtype, chunk, seed = torch.float64, 3, 7
    torch.manual_seed(0)
    enc = Tower(12, 8, p=0.25).to(dtype)
    g = torch.Generator().manual_seed(3)
    v1 = torch.randn(10, 12, generator=g, dtype=dtype)
    v2 = torch.randn(10, 12, generator=g, dtype=dtype)

    def simclr(a, b):
        return fastcl.nt_xent(a, b, 0.5, backend="torch")

    torch.manual_seed(seed)
    a = torch.cat([enc(v1[s:s + chunk]) for s in range(0, 10, chunk)])
    b = torch.cat([enc(v2[s:s + chunk]) for s in range(0, 10, chunk)])
    simclr(a, b).backward()
    ref = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    chunked_contrastive_step(enc, [v1, v2], simclr, chunk)
    for r, p in zip(ref, enc.parameters()):
        assert (p.grad - r).abs().max().item() <= 1e-10

    # queries (10) vs keys (25: positives then hard negatives), one tower each, no dropout
    q_enc, k_enc = Tower(12, 8, p=0.0).to(dtype), Tower(12, 8, p=0.0).to(dtype)
    keys_in = torch.randn(25, 12, generator=g, dtype=dtype)

    def nce(q, k):
        return fastcl.info_nce(q, k, scale=20.0, reduction="sum", backend="torch")

    nce(q_enc(v1), k_enc(keys_in)).backward()  # plain full-batch step
    ref = [p.grad.clone() for p in _params(q_enc, k_enc)]
    for p in _params(q_enc, k_enc):
        p.grad = None
    chunked_contrastive_step([q_enc, k_enc], [v1, keys_in], nce, 4)
    for r, p in zip(ref, _params(q_enc, k_enc)):
        assert (p.grad - r).abs().max().item() <= 1e-10


def test_grad_scaler_and_autocast():
    """A GradScaler scales every parameter gradient by its scale; autocast (bfloat16 on CPU) runs."""
    dtype, B, chunk = torch.float32, 16, 6
    img, txt, ls = _make(dtype)
    x, t = _data(B, dtype)

    def loss_fn(ei, et):
        return fastcl.clip_loss(ei, et, ls.exp(), backend="torch")

    torch.manual_seed(3)
    chunked_contrastive_step((img, txt), (x, t), loss_fn, chunk)
    ref = [p.grad.clone() for p in _params(img, txt, ls)]
    for p in _params(img, txt, ls):
        p.grad = None

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(3)
    chunked_contrastive_step((img, txt), (x, t), loss_fn, chunk, scaler=scaler)
    for r, p in zip(ref, _params(img, txt, ls)):
        assert torch.allclose(p.grad, 1024.0 * r, rtol=1e-5, atol=1e-6)

    for p in _params(img, txt, ls):
        p.grad = None
    torch.manual_seed(3)
    loss = chunked_contrastive_step((img, txt), (x, t), loss_fn, chunk, autocast=torch.bfloat16)
    assert torch.isfinite(loss)
    for r, p in zip(ref, _params(img, txt, ls)):
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert (p.grad - r).norm() <= 0.1 * r.norm() + 1e-6  # bf16 encoders: close, not equal


def test_bad_arguments():
    img, txt, ls = _make(torch.float32)
    x, t = _data(8, torch.float32)
    f = lambda a, b: fastcl.clip_loss(a, b, 10.0, backend="torch")  # noqa: E731
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_contrastive_step((img, txt), (x, t), f, 0)
    with pytest.raises(ValueError, match="encoders has 1 entries"):
        chunked_contrastive_step([img], (x, t), f, 4)
    with pytest.raises(ValueError, match="same batch size"):
        chunked_contrastive_step((img, txt), (x, {"ids": t["ids"], "mask": t["mask"][:5]}), f, 4)
    with pytest.raises(TypeError, match="inputs must be"):
        chunked_contrastive_step((img, txt), x, f, 4)
    with pytest.raises(TypeError, match="one-element tensor"):
        chunked_contrastive_step((img, txt), (x, t),
                                 lambda a, b: fastcl.clip_loss(a, b, 10.0, reduction="none",
                                                               backend="torch"), 4)
    from fastcl.train import chunked_loss
    for bad in ([[(0, 8)]], [[(0, 4), (5, 8)], [(0, 8)]], [[(0, 4), (4, 4), (4, 8)], [(0, 8)]],
                [[(0, 4), (4, 7)], [(0, 8)]], [[(0, 8.0)], [(0, 8)]]):
        with pytest.raises(ValueError, match="ranges"):
            chunked_loss((img, txt), (x, t), f, 4, ranges=bad)
    # uneven chunks given as ranges (dropout off): the unchunked loss's gradients
    img.eval(), txt.eval()
    calls = []
    img.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    loss = chunked_loss((img, txt), (x, t), f, 4, ranges=[[(0, 3), (3, 8)], [(0, 1), (1, 2), (2, 8)]])
    loss.backward()
    assert calls == [3, 5, 3, 5]
    got = [p.grad.clone() for p in _params(img, txt)]
    for p in _params(img, txt):
        p.grad = None
    f(img(x), txt(t)).backward()
    for a, b in zip(got, [p.grad for p in _params(img, txt)]):
        assert b.abs().max() > 0 and (a - b).abs().max().item() <= 1e-5


def test_chunked_loss_deferred_backward():
    """chunked_loss returns a differentiable scalar: the re-encoding happens in its backward, with
    the upstream gradient (2.5 here) applied, as a trainer's ``loss.backward()`` would call it."""
    from fastcl.train import chunked_loss

    dtype, B, chunk, seed = torch.float64, 14, 4, 11
    img, txt, ls = _make(dtype)
    x, t = _data(B, dtype)

    def loss_fn(ei, et):
        return fastcl.siglip_loss(ei, et, ls.exp(), -2.0, backend="torch")

    _reference_step(img, txt, ls, x, t, chunk, lambda a, b: 2.5 * loss_fn(a, b), seed)
    ref = [p.grad.clone() for p in _params(img, txt, ls)]
    for p in _params(img, txt, ls):
        p.grad = None
    torch.manual_seed(seed)
    loss = chunked_loss((img, txt), (x, t), loss_fn, chunk, progress=True)
    assert all(p.grad is None for p in _params(img, txt, ls))  # nothing happens before backward
    (2.5 * loss).backward()
    for r, p in zip(ref, _params(img, txt, ls)):
        assert (p.grad - r).abs().max().item() <= 1e-10


def test_chunked_loss_with_its_own_backward():
    """loss_backward: loss_fn gets each input's chunk embeddings and back-propagates to them itself
    (sentence-transformers' gradient-cache protocol); the towers' gradients are the unchunked
    step's with the returned scalar's upstream gradient (2.5) applied at its backward, and an
    input the loss leaves unused is not re-encoded."""
    from fastcl.train import chunked_loss

    dtype, B, chunk, seed = torch.float64, 14, 4, 11
    img, txt, _ = _make(dtype)
    x, t = _data(B, dtype)

    def loss_of(ei, et):
        return fastcl.siglip_loss(ei, et, 8.0, -2.0, backend="torch")

    _reference_step(img, txt, None, x, t, chunk, lambda a, b: 2.5 * loss_of(a, b), seed)
    ref = [p.grad.clone() for p in _params(img, txt)]
    for p in _params(img, txt):
        p.grad = None
    seen = []

    def loss_fn(ei, et):
        seen.append([tuple(e.shape) for e in ei])
        assert all(e.is_leaf and e.requires_grad for e in ei + et)
        value = loss_of(torch.cat(ei), torch.cat(et))
        value.backward()
        return value.detach()

    torch.manual_seed(seed)
    loss = chunked_loss((img, txt), (x, t), loss_fn, chunk, loss_backward=True)
    assert seen == [[(4, 8), (4, 8), (4, 8), (2, 8)]]
    assert all(p.grad is None for p in _params(img, txt))  # the towers wait for the backward
    (2.5 * loss).backward()
    for r, p in zip(ref, _params(img, txt)):
        assert r.abs().max() > 0 and (p.grad - r).abs().max().item() <= 1e-10
    # the texts unused: their tower is not run again
    calls = []
    txt.register_forward_hook(lambda *a: calls.append(1))

    def images_only(ei, et):
        value = fastcl.uniformity_loss(torch.cat(ei), backend="torch")
        value.backward()
        return value.detach()

    loss = chunked_loss((img, txt), (x, t), images_only, chunk, loss_backward=True)
    n_phase1 = len(calls)
    loss.backward()
    assert n_phase1 == 4 and len(calls) == 4


def test_example_tiny_runs(capsys):
    """examples/train_clip_huge_batch.py --tiny, two steps, in-process."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_clip_huge_batch.py"
    spec = importlib.util.spec_from_file_location("train_clip_huge_batch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--tiny", "--steps", "2", "--device", "cpu", "--batch", "512"]) == 0
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "R@1" in out


@pytest.mark.parametrize("loss,mode", [("simclr", "ring"), ("supcon", "gather")])
def test_example_ddp_tiny_gradients_match(loss, mode):
    """examples/train_simclr_ddp.py --tiny --check: two gloo processes under DDP, whose averaged
    gradients after the first step equal the single-process loss's on the gathered batch."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = subprocess.run([sys.executable, str(root / "examples" / "train_simclr_ddp.py"), "--tiny",
                          "--check", "--steps", "2", "--loss", loss, "--mode", mode, "--cpu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gradients match" in out.stdout and "step 2: loss" in out.stdout, out.stdout
