"""The references against independent formulations, gradcheck of the engine's torch backend, and
the torch backend (the engine contract on materialised chunks) against the loss references."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
from fastcl import reference as R

D64 = torch.float64


def _feat(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=D64, generator=g).requires_grad_()


def _manual_info_nce(q, k, pos, s, b):
    logp = torch.log_softmax(s * q @ k.T + b, dim=1)
    return -logp[torch.arange(q.shape[0]), pos]


def test_info_nce_reference_is_cross_entropy():
    q, k = _feat(7, 5, 0), _feat(11, 5, 1)
    pos = torch.tensor([3, 0, 10, 2, 2, 7, 1])
    s, b = torch.tensor(4.0, dtype=D64), torch.tensor(0.3, dtype=D64)
    torch.testing.assert_close(R.info_nce(q, k, pos, s, b, "none"), _manual_info_nce(q, k, pos, s, b))


def test_clip_reference_is_both_directions():
    i, t = _feat(6, 4, 2), _feat(6, 4, 3)
    s = 1 / 0.07
    ar = torch.arange(6)
    row = _manual_info_nce(i, t, ar, s, 0.0)
    col = _manual_info_nce(t, i, ar, s, 0.0)
    torch.testing.assert_close(R.clip_loss(i, t, s), 0.5 * (row.mean() + col.mean()))
    torch.testing.assert_close(R.clip_loss(i, t, s, reduction="none"), torch.stack([row, col]))


def test_siglip_reference_matches_formula():
    i, t = _feat(5, 3, 4), _feat(5, 3, 5)
    S = 10.0 * i @ t.T - 10.0
    z = 2 * torch.eye(5, dtype=D64) - 1
    manual = -sum(math.log(1 / (1 + math.exp(-z[a, c].item() * S[a, c].item())))
                  for a in range(5) for c in range(5)) / 5
    assert abs(R.siglip_loss(i, t, 10.0, -10.0).item() - manual) < 1e-9


def test_supcon_reference_matches_loops():
    x = _feat(6, 3, 6)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    z = F.normalize(x, dim=1)
    S = (z @ z.T / 0.5).detach()
    losses = []
    for a in range(6):
        others = [j for j in range(6) if j != a]
        pos = [j for j in others if y[j] == y[a]]
        if not pos:
            continue
        lse = torch.logsumexp(S[a, others], 0)
        losses.append(sum(lse - S[a, p] for p in pos) / len(pos))
    expect = sum(losses) / len(losses)
    loss, valid = R.supcon(x, y, 0.5)
    assert valid.tolist() == [True, True, True, False, True, True]
    assert abs(loss.item() - expect.item()) < 1e-9


CASES = {
    "info_nce": lambda q, k, s, b: fastcl.info_nce(q, k[:9], positives=torch.tensor([8, 1, 0, 3, 3, 2, 7]),
                                                   scale=s, bias=b, reduction="none", backend="torch"),
    "clip": lambda q, k, s, b: fastcl.clip_loss(q, k[:7], s, b, reduction="none", backend="torch"),
    "siglip": lambda q, k, s, b: fastcl.siglip_loss(q, k[:7], s, b, reduction="none", backend="torch"),
    "nt_xent": lambda q, k, s, b: fastcl.nt_xent(q, k[:7], 1 / s, reduction="none", backend="torch"),
    "supcon": lambda q, k, s, b: fastcl.supcon(torch.stack([q, k[:7]], 1), torch.tensor([0, 1, 0, 2, 1, 0, 3]),
                                               1 / s, reduction="none", backend="torch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_torch_backend(case):
    q, k = _feat(7, 4, 7), _feat(9, 4, 8)
    s = torch.tensor(3.0, dtype=D64, requires_grad=True)
    b = torch.tensor(-0.5, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(CASES[case], (q, k, s, b))


def test_torch_backend_chunks(monkeypatch):
    """The torch engine materialises a bounded number of logits at a time; chunking is exact."""
    i, t = _feat(33, 6, 9), _feat(33, 6, 10)
    full = fastcl.clip_loss(i, t, 20.0, reduction="none", backend="torch")
    (g_full,) = torch.autograd.grad(full.sum(), [i])
    monkeypatch.setattr(R, "_CHUNK_ELEMENTS", 33 * 4)
    chunked = fastcl.clip_loss(i, t, 20.0, reduction="none", backend="torch")
    (g_chunk,) = torch.autograd.grad(chunked.sum(), [i])
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(g_chunk, g_full)


@pytest.mark.parametrize("deadline,outcome", [("1", "1 skipped"), (str(2**40), "1 passed")])
def test_run_deadline_skips_tests_not_started(deadline, outcome):
    """FASTCL_TEST_DEADLINE (the GPU script's time-limited test phase): a test that would start
    after it is skipped, so the run ends with its report; before it, tests run."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTCL_TEST_DEADLINE=deadline)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_reference.py::test_info_nce_reference_is_cross_entropy"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert outcome in proc.stdout, proc.stdout[-2000:]
