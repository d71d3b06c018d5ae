"""Drop-in integrations against the real peer libraries (where installed) and, always, against a
transcription of the peer's formula on the materialised matrix. Float64, fresh random inputs,
learnable scale/bias, every gradient, grad_output != 1."""
import math
import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastcl
from fastcl import reference
from fastcl.integrations import info_nce_pytorch as infonce
from fastcl.integrations import lightly as ly
from fastcl.integrations import open_clip as oc
from fastcl.integrations import pytorch_metric_learning as pml
from fastcl.integrations import sentence_transformers as st

from ._gloo import run_gloo

TOL = 1e-9


# the Triton backend on these CPU tensors: the interpreter (tests/test_triton.py and the others
# run the kernels on CUDA tensors where there is a GPU)
TRITON = pytest.param("triton", marks=pytest.mark.interpreter)


def _feats(gen, n, d, normalize=True):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if normalize:
        x = nn.functional.normalize(x, dim=1)
    return x.requires_grad_(True)


def _leaf(v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def _compare(name, ours, theirs, inputs, g=0.7, tol=TOL):
    assert abs(ours.item() - theirs.item()) <= tol * max(1.0, abs(theirs.item())), \
        f"{name}: loss {ours.item()} vs {theirs.item()}"
    ga = torch.autograd.grad(ours, inputs, torch.tensor(g, dtype=ours.dtype), allow_unused=True)
    gb = torch.autograd.grad(theirs, inputs, torch.tensor(g, dtype=theirs.dtype), allow_unused=True)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert b is not None and a is not None, f"{name}: missing gradient {i}"
        assert b.abs().max() > 0, f"{name}: zero reference gradient {i}"
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{name}: grad {i} off by {err:.3e}"


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------


def _siglip_formula(img, txt, scale, bias):
    """open_clip's SigLipLoss._loss on one process, transcribed."""
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    return -nn.functional.logsigmoid(labels * logits).sum() / img.shape[0]


def test_open_clip_single_process():
    gen = torch.Generator().manual_seed(0)
    img, txt = _feats(gen, 9, 16), _feats(gen, 9, 16)
    s, b = _leaf(14.0), _leaf(-0.5)
    # (a constant bias cannot change a softmax: its CLIP gradient is 0, so it is not compared)
    ours = oc.ClipLoss()(img, txt, s, b)
    _compare("clip/reference", ours, reference.clip_loss(img, txt, s, b), [img, txt, s])
    assert set(oc.ClipLoss()(img, txt, s, output_dict=True)) == {"contrastive_loss"}
    s2, b2 = _leaf(10.0), _leaf(-10.0)
    ours = oc.SigLipLoss()(img, txt, s2, b2)
    _compare("siglip/transcription", ours, _siglip_formula(img, txt, s2, b2), [img, txt, s2, b2])

    # DistillClipLoss: its distillation term is the cross-entropy against the teacher's softmax
    t_img, t_txt = _feats(gen, 9, 5).detach(), _feats(gen, 9, 5).detach()
    con, dis = oc.DistillClipLoss()(img, txt, s, t_img, t_txt, 12.0)
    _compare("distill/contrastive", con, reference.clip_loss(img, txt, s), [img, txt, s])
    ref = (reference.distill(img, txt, t_img, t_txt, s, 12.0, objective="cross_entropy")
           + reference.distill(txt, img, t_txt, t_img, s, 12.0, objective="cross_entropy")) / 2
    _compare("distill/transcription", dis, ref, [img, txt, s])
    out = oc.DistillClipLoss()(img, txt, s, t_img, t_txt, 12.0, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}
    with pytest.raises(ValueError, match="dist_image_features requires a gradient"):
        oc.DistillClipLoss()(img, txt, s, t_img.clone().requires_grad_(), t_txt, 12.0)

    open_clip_loss = pytest.importorskip("open_clip.loss")
    for k, name in enumerate(("contrastive", "distill")):  # (each term's graph afresh)
        theirs = open_clip_loss.DistillClipLoss()(img, txt, s, t_img, t_txt,
                                                  torch.tensor(12.0, dtype=torch.float64))[k]
        ours = oc.DistillClipLoss()(img, txt, s, t_img, t_txt, 12.0)[k]
        _compare(f"distill/open_clip/{name}", ours, theirs, [img, txt, s])
    _compare("clip/open_clip", oc.ClipLoss()(img, txt, s, b),
             open_clip_loss.ClipLoss()(img, txt, s, b), [img, txt, s])
    _compare("siglip/open_clip", oc.SigLipLoss()(img, txt, s2, b2),
             open_clip_loss.SigLipLoss()(img, txt, s2, b2), [img, txt, s2, b2])
    with pytest.raises(ValueError, match="use_horovod"):
        oc.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        oc.SigLipLoss(dist_impl="allgather")


def _caption_batch(gen, b=9, t=6, v=11, pad_id=0):
    logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(1, v, (b, t), generator=gen)
    labels[:, 4:] = pad_id  # padded tails, ignored
    return logits, labels


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.5, 0.0)])
def test_open_clip_coca(weights):
    gen = torch.Generator().manual_seed(4)
    img, txt = _feats(gen, 9, 16), _feats(gen, 9, 16)
    s = _leaf(14.0)
    logits, labels = _caption_batch(gen)
    cap_w, clip_w = weights
    con, cap = oc.CoCaLoss(cap_w, clip_w)(img, txt, logits, labels, s)
    want_cap = cap_w * nn.functional.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0)
    _compare("coca/caption", cap, want_cap, [logits])
    if clip_w:
        _compare("coca/contrastive", con, clip_w * reference.clip_loss(img, txt, s), [img, txt, s])
    else:
        assert con.item() == 0
    out = oc.CoCaLoss(cap_w, clip_w)(img, txt, logits, labels, s, output_dict=True)
    assert set(out) == {"contrastive_loss", "caption_loss"}
    with pytest.raises(ValueError, match="logits must be"):
        oc.CoCaLoss(cap_w, clip_w)(img, txt, logits[0], labels, s)
    open_clip_loss = pytest.importorskip("open_clip.loss")
    for k, name in enumerate(("contrastive", "caption")[0 if clip_w else 1:], 0 if clip_w else 1):
        theirs = open_clip_loss.CoCaLoss(cap_w, clip_w)(img, txt, logits, labels, s)[k]
        ours = oc.CoCaLoss(cap_w, clip_w)(img, txt, logits, labels, s)[k]
        _compare(f"coca/open_clip/{name}", ours, theirs, [img, txt, s] if k == 0 else [logits])


def _open_clip_worker(r, W):
    try:
        import open_clip.loss as ocl
    except Exception:
        ocl = None
    gen = torch.Generator().manual_seed(42)
    n, d = 4, 8
    I = nn.functional.normalize(torch.randn(W * n, d, generator=gen, dtype=torch.float64), dim=1)
    T = nn.functional.normalize(torch.randn(W * n, d, generator=gen, dtype=torch.float64), dim=1)

    def local(x):
        return x[r * n:(r + 1) * n].clone().requires_grad_(True)

    cases = []
    for local_loss, with_grad, mode in ((True, True, "gather"), (True, True, "ring"),
                                        (False, False, "gather"), (False, True, "gather"),
                                        (True, False, "gather")):
        i, t, s, b = local(I), local(T), _leaf(9.0), _leaf(0.25)
        ours = oc.ClipLoss(local_loss, with_grad, rank=r, world_size=W, dist_mode=mode)(i, t, s, b)
        cases.append((f"clip{(local_loss, with_grad, mode)}", ours, [i, t, s],
                      ("clip", local_loss, with_grad)))
        if mode == "gather":  # CoCa's contrastive term: ClipLoss's, weighted
            i, t, s = local(I), local(T), _leaf(9.0)
            logits, labels = _caption_batch(torch.Generator().manual_seed(r), b=n)
            ours, _ = oc.CoCaLoss(2.0, 1.5, local_loss=local_loss, gather_with_grad=with_grad, rank=r,
                                  world_size=W)(i, t, logits, labels, s)
            cases.append((f"coca{(local_loss, with_grad)}", ours, [i, t, s],
                          ("coca", local_loss, with_grad, logits, labels)))
        if mode == "gather":  # the distillation term over the same gathered columns
            i, t, s = local(I), local(T), _leaf(9.0)
            ti, tt = local(I.flip(1)).detach(), local(T.roll(1, 1)).detach()
            _, ours = oc.DistillClipLoss(local_loss, with_grad, rank=r, world_size=W)(i, t, s, ti, tt, 7.0)
            cases.append((f"distill{(local_loss, with_grad)}", ours, [i, t, s],
                          ("distill", local_loss, with_grad, ti, tt)))
    for impl in ("bidir", "gather"):
        i, t, s, b = local(I), local(T), _leaf(10.0), _leaf(-10.0)
        ours = oc.SigLipLoss(rank=r, world_size=W, dist_impl=impl)(i, t, s, b)
        cases.append((f"siglip/{impl}", ours, [i, t, s, b], ("siglip", impl)))

    for name, ours, inp, cfg in cases:
        i2, t2, s2 = [x.detach().clone().requires_grad_(True) for x in inp[:3]]
        b2 = inp[3].detach().clone().requires_grad_(True) if len(inp) > 3 else _leaf(0.25)
        if ocl is not None:
            if cfg[0] == "clip":
                theirs = ocl.ClipLoss(cfg[1], cfg[2], rank=r, world_size=W)(i2, t2, s2, b2)
            elif cfg[0] == "distill":
                _, theirs = ocl.DistillClipLoss(cfg[1], cfg[2], rank=r, world_size=W)(
                    i2, t2, s2, cfg[3], cfg[4], torch.tensor(7.0, dtype=torch.float64))
            elif cfg[0] == "coca":
                theirs, _ = ocl.CoCaLoss(2.0, 1.5, local_loss=cfg[1], gather_with_grad=cfg[2], rank=r,
                                         world_size=W)(i2, t2, cfg[3], cfg[4], s2)
            else:
                theirs = ocl.SigLipLoss(rank=r, world_size=W, dist_impl=cfg[1])(i2, t2, s2, b2)
        else:  # transcription of open_clip's per-rank formulas, single process on gathered data
            theirs = None
        if theirs is None:
            continue
        ga = torch.autograd.grad(ours, inp, torch.tensor(0.6, dtype=ours.dtype))
        gb = torch.autograd.grad(theirs, [i2, t2, s2, b2][:len(inp)], torch.tensor(0.6, dtype=theirs.dtype))
        if abs(ours.item() - theirs.item()) > TOL:
            raise AssertionError(f"{name}: {ours.item()} vs {theirs.item()}")
        for k, (a, bb) in enumerate(zip(ga, gb)):
            if k >= 2 and "ring" in name:
                # the ring splits a scalar's gradient across ranks differently: compare the
                # sums over ranks (what DDP's averaging sees)
                a, bb = a.clone(), bb.clone()
                dist.all_reduce(a)
                dist.all_reduce(bb)
            if bb.abs().max() == 0 or (a - bb).abs().max() > TOL * max(1.0, bb.abs().max().item()):
                raise AssertionError(f"{name}: grad {k} off by {(a - bb).abs().max().item():.3e}")
    # sentence-transformers gather_across_devices, all four directions, one hard-negative column
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Real
        from sentence_transformers import util as st_util
    except Exception:
        Real = None
    # (and each hardness mode: the own documents are those of the rank's global rows)
    for hardness in ([None, "hard_negatives", "in_batch_negatives", "all_negatives"]
                     if Real is not None else []):
        dirs = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
        cols = [local(_feats(gen, W * n, d, normalize=False).detach()) for _ in range(3)]
        hk = dict(hardness_mode=hardness, hardness_strength=2.0 if hardness else 0.0)
        ours = st.mnrl_from_embeddings(cols, scale=20.0, directions=dirs, gather_across_devices=True,
                                       backend="torch", **hk)
        twins = [c.detach().clone().requires_grad_(True) for c in cols]
        theirs = Real(nn.Identity(), scale=20.0, similarity_fct=st_util.cos_sim, directions=dirs,
                      gather_across_devices=True, **hk).compute_loss_from_embeddings(twins, None)
        if abs(ours.item() - theirs.item()) > TOL:
            raise AssertionError(f"mnrl/gather/{hardness}: {ours.item()} vs {theirs.item()}")
        for k, (a, bb) in enumerate(zip(torch.autograd.grad(ours, cols), torch.autograd.grad(theirs, twins))):
            if bb.abs().max() == 0 or (a - bb).abs().max() > TOL:
                raise AssertionError(f"mnrl/gather/{hardness}: grad {k} off by "
                                     f"{(a - bb).abs().max().item():.3e}")


def test_distributed_matches_open_clip_and_sentence_transformers():
    pytest.importorskip("open_clip.loss")
    run_gloo(_open_clip_worker, 2)


# ----------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------


class ToyEncoder(nn.Module):
    """features {"input_ids", "attention_mask"} -> features + {"sentence_embedding"}."""

    def __init__(self, vocab=40, d=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, dtype=torch.float64)
        self.proj = nn.Linear(d, d, dtype=torch.float64)

    def forward(self, features):
        h = self.emb(features["input_ids"])
        m = features["attention_mask"].unsqueeze(-1).to(h.dtype)
        out = dict(features)
        out["sentence_embedding"] = self.proj((h * m).sum(1) / m.sum(1).clamp(min=1))
        return out


def _columns(gen, n, cols, vocab=40, length=6):
    feats = []
    for _ in range(cols):
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        mask = torch.ones(n, length, dtype=torch.long)
        mask[:, 4:] = torch.randint(0, 2, (n, 2), generator=gen)
        feats.append({"input_ids": ids, "attention_mask": mask})
    return feats


def _mnrl_formula(embs, scale, directions, partition_mode, cos=True, hardness=None, strength=0.0):
    """sentence-transformers' MultipleNegativesRankingLoss on one process, transcribed."""
    if cos:
        embs = [nn.functional.normalize(e, dim=-1) for e in embs]
    q, docs = embs[0], embs[1:]
    n = q.shape[0]
    docs_all = torch.cat(docs)
    eye = torch.eye(n, dtype=torch.bool)
    sims = {"query_to_doc": q @ docs_all.T}
    if "query_to_query" in directions:
        sims["query_to_query"] = (q @ q.T).masked_fill(eye, -math.inf)
    if "doc_to_query" in directions:
        sims["doc_to_query"] = (q @ docs[0].T).T
    if "doc_to_doc" in directions:
        sims["doc_to_doc"] = (docs_all @ docs[0].T).T.masked_fill(eye.repeat(1, len(docs)), -math.inf)
    penalty = None
    if hardness is not None:  # strength * the detached similarity on the chosen negatives
        own = eye.repeat(1, len(docs))
        chosen = {"hard_negatives": own & (torch.arange(own.shape[1]) >= n)[None, :],
                  "in_batch_negatives": ~own,
                  "all_negatives": ~(own & (torch.arange(own.shape[1]) < n)[None, :])}[hardness]
        penalty = torch.where(chosen, strength * sims["query_to_doc"].detach(), 0.0)
    sims = {k: v * scale for k, v in sims.items()}
    if penalty is not None:
        sims["query_to_doc"] = sims["query_to_doc"] + penalty
    pos = sims["query_to_doc"].diagonal()
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(sims.values()), 1), 1)
    else:
        log_z = sum(torch.logsumexp(v, 1) for v in sims.values()) / len(sims)
    return (log_z - pos).mean()


MNRL_CASES = [
    (("query_to_doc",), "joint", 2, True, None),
    (("query_to_doc",), "joint", 4, False, None),  # two hard-negative columns, dot product
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", 3, True, None),
    (("query_to_doc", "doc_to_query"), "per_direction", 3, True, None),
    # hardness penalties on the query-to-doc negatives
    (("query_to_doc",), "joint", 3, True, "hard_negatives"),
    (("query_to_doc",), "joint", 3, True, "in_batch_negatives"),
    (("query_to_doc",), "joint", 2, False, "in_batch_negatives"),  # no own hard negatives
    (("query_to_doc", "doc_to_query"), "per_direction", 4, True, "all_negatives"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", 2, True,
     "hard_negatives"),  # the mode without hard-negative columns: no penalty
]


@pytest.mark.parametrize("directions,partition_mode,cols,cos,hardness", MNRL_CASES)
def test_sentence_transformers_mnrl(directions, partition_mode, cols, cos, hardness):
    gen = torch.Generator().manual_seed(len(directions) * 10 + cols)
    torch.manual_seed(0)
    model = ToyEncoder()
    feats = _columns(gen, 7, cols)
    params = list(model.parameters())
    sim = None
    try:
        from sentence_transformers import util as st_util
        sim = st_util.cos_sim if cos else st_util.dot_score
    except Exception:
        st_util = None
    kw = dict(directions=directions, partition_mode=partition_mode)
    if hardness is not None:
        kw.update(hardness_mode=hardness, hardness_strength=3.0)
    if sim is not None:
        kw["similarity_fct"] = sim
    elif not cos:
        kw["similarity_fct"] = lambda a, b: a @ b.T
        kw["similarity_fct"].__name__ = "dot_score"
    ours = st.MultipleNegativesRankingLoss(model, scale=20.0, **kw)(feats, None)
    def formula():
        embs = [model(f)["sentence_embedding"] for f in feats]
        return _mnrl_formula(embs, 20.0, directions, partition_mode, cos, hardness, 3.0)

    _compare("mnrl/transcription", ours, formula(), params)
    # chunked (cached) form: same loss and gradients
    model.zero_grad(set_to_none=True)
    cached = st.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=3, **kw)(feats, None)
    ref = formula()
    assert abs(cached.item() - ref.item()) <= TOL
    (0.7 * cached).backward()  # the re-encoding happens here, gradients land in .grad
    for p, g in zip(params, torch.autograd.grad(0.7 * ref, params)):
        assert g.abs().max() > 0 and (p.grad - g).abs().max() <= TOL, "mnrl/cached gradient"
    model.zero_grad(set_to_none=True)
    if sim is None:
        pytest.skip("sentence-transformers not installed: real-peer comparison skipped")
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as Real
    ours = st.MultipleNegativesRankingLoss(model, scale=20.0, **kw)(feats, None)
    _compare("mnrl/sentence-transformers", ours, Real(model, scale=20.0, **kw)(feats, None), params)


@pytest.mark.parametrize("cached", [False, True])
def test_sentence_transformers_symmetric_mnrl(cached):
    """MultipleNegativesSymmetricRankingLoss and its cached form: the anchors' loss over the
    documents and the positives' over the anchors (a hard-negative column, which only the first
    direction sees), against the transcribed formula and the library's own class."""
    gen = torch.Generator().manual_seed(31)
    torch.manual_seed(0)
    model = ToyEncoder()
    feats = _columns(gen, 6, 3)
    params = list(model.parameters())
    kw = dict(mini_batch_size=2) if cached else {}
    cls = st.CachedMultipleNegativesSymmetricRankingLoss if cached else st.MultipleNegativesSymmetricRankingLoss
    loss = cls(model, scale=15.0, **kw)
    assert loss.directions == ("query_to_doc", "doc_to_query") and loss.partition_mode == "per_direction"
    embs = [model(f)["sentence_embedding"] for f in feats]
    ref = _mnrl_formula(embs, 15.0, loss.directions, loss.partition_mode, True, None, 0.0)
    ours = loss(feats, None)
    assert abs(ours.item() - ref.item()) <= TOL
    (0.9 * ours).backward()
    for p, g in zip(params, torch.autograd.grad(0.9 * ref, params)):
        assert g.abs().max() > 0 and (p.grad - g).abs().max() <= TOL, "symmetric mnrl gradient"
    model.zero_grad(set_to_none=True)
    if cached:  # (the library's cached form needs a real SentenceTransformer: the plain one is
        return  # compared with the library below, and the cached form with it above)
    try:
        import warnings
        from sentence_transformers.sentence_transformer import losses as real
    except Exception:
        pytest.skip("sentence-transformers not installed: real-peer comparison skipped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = real.MultipleNegativesSymmetricRankingLoss(model, scale=15.0)
    _compare("symmetric mnrl/sentence-transformers", loss(feats, None), want(feats, None), params)


def test_sentence_transformers_errors():
    model = ToyEncoder()
    with pytest.raises(ValueError, match="query_to_doc"):
        st.MultipleNegativesRankingLoss(model, directions=("doc_to_query",))
    with pytest.raises(ValueError, match="hardness_mode"):
        st.MultipleNegativesRankingLoss(model, hardness_mode="hardest", hardness_strength=1.0)
    with pytest.raises(ValueError, match="hardness_strength"):
        st.MultipleNegativesRankingLoss(model, hardness_mode="hard_negatives", hardness_strength=-1.0)
    with pytest.raises(ValueError, match="similarity_fct"):
        st.MultipleNegativesRankingLoss(model, similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="at least 2"):
        st.MultipleNegativesRankingLoss(model)(_columns(torch.Generator().manual_seed(0), 3, 1), None)


def _gist_formula(anchors, cands, g_anchors, g_cands, temperature, margin_strategy="absolute", margin=0.0,
                  contrast_anchors=True, contrast_positives=True, offset=0):
    """sentence-transformers' GISTEmbedLoss, transcribed: this rank's anchors (n, D) against the
    candidate columns of every rank ([positives, negatives...], (W n, D) each) at ``offset``."""
    n = anchors.shape[0]
    cos = lambda a, b: nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T
    g_ap = cos(g_anchors, g_cands[0])
    g_pos = g_ap.diagonal(offset=offset)[:, None]
    thr = g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin
    own = torch.zeros_like(g_ap, dtype=torch.bool)
    own[torch.arange(n), offset + torch.arange(n)] = True
    scores = [cos(anchors, cands[0]).masked_fill((g_ap > thr) & ~own, -math.inf)]
    if contrast_anchors:
        scores.append(cos(anchors, anchors).masked_fill(cos(g_anchors, g_anchors) > thr, -math.inf))
    if contrast_positives:
        p, gp = cands[0][offset:offset + n], g_cands[0][offset:offset + n]
        scores.append(cos(p, cands[0]).masked_fill(cos(gp, g_cands[0]) > thr, -math.inf))
    for c, gc in zip(cands[1:], g_cands[1:]):
        scores.append(cos(anchors, c).masked_fill(cos(g_anchors, gc) > thr, -math.inf))
    scores = torch.cat(scores, 1) / temperature
    return nn.functional.cross_entropy(scores, torch.arange(n) + offset)


def _word_tokenizer(words):
    """A transformers fast tokenizer over the given words (whitespace-separated), built in memory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i + 1 for i, w in enumerate(words)}
    vocab["[PAD]"], vocab["[UNK]"] = 0, len(vocab) + 1
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")


class ToyGuide(ToyEncoder):
    """A guide with a tokenizer of its own (its vocabulary in reverse order)."""

    def __init__(self, tokenizer, vocab=42, d=5):
        super().__init__(vocab, d)
        self.tokenizer = tokenizer
        self.max_seq_length = 16

    def preprocess(self, texts):
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @property
    def device(self):
        return self.proj.weight.device


class ModuleListToy(ToyEncoder):
    """ToyEncoder indexable as a SentenceTransformer (``model[0]``: its input module)."""

    def __getitem__(self, i):
        return self


GIST_CASES = [
    (2, dict()),
    (3, dict(margin=0.1)),
    (3, dict(margin_strategy="relative", margin=0.3)),
    (4, dict(contrast_anchors=False)),  # two negative columns
    (3, dict(contrast_anchors=False, contrast_positives=False, margin=-0.05)),
]


@pytest.mark.parametrize("cols,kw", GIST_CASES)
def test_sentence_transformers_gist(cols, kw):
    gen = torch.Generator().manual_seed(cols + len(kw))
    torch.manual_seed(1)
    model, guide = ModuleListToy(), ToyEncoder(d=5)
    feats = _columns(gen, 7, cols)
    params = list(model.parameters())

    def formula():
        embs = [model(f)["sentence_embedding"] for f in feats]
        with torch.no_grad():
            gembs = [guide(f)["sentence_embedding"] for f in feats]
        return _gist_formula(embs[0], embs[1:], gembs[0], gembs[1:], 0.05, **kw)

    ours = st.GISTEmbedLoss(model, guide, temperature=0.05, **kw)(feats, None)
    _compare("gist/transcription", ours, formula(), params)
    # the guide changed the loss: without it (a guide that masks nothing) the value differs
    blind = st.GISTEmbedLoss(model, guide, temperature=0.05, margin=-10.0)(feats, None)
    assert abs(blind.item() - ours.item()) > 1e-3
    # cached form (and the guide in mini-batches): same loss and gradients
    model.zero_grad(set_to_none=True)
    cached = st.CachedGISTEmbedLoss(model, guide, temperature=0.05, mini_batch_size=3, **kw)(feats, None)
    ref = formula()
    assert abs(cached.item() - ref.item()) <= TOL
    (0.7 * cached).backward()
    for p, g in zip(params, torch.autograd.grad(0.7 * ref, params)):
        assert g.abs().max() > 0 and (p.grad - g).abs().max() <= TOL, "gist/cached gradient"
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in guide.parameters())
    try:
        from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as RealCached
        from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as Real
        tok = _word_tokenizer([f"w{i}" for i in range(40)])
    except Exception:
        pytest.skip("sentence-transformers not installed: real-peer comparison skipped")
    for m in (model, guide):  # one tokenizer: the guide takes the model's features
        m.tokenizer, m.max_seq_length = tok, 16
    if cols > 3:  # (sentence-transformers' GISTEmbedLoss takes at most one negative column)
        theirs = RealCached(model, guide, temperature=0.05, mini_batch_size=3, **kw)
        ours = st.CachedGISTEmbedLoss(model, guide, temperature=0.05, mini_batch_size=3, **kw)
        lt, lo = theirs(feats, None), ours(feats, None)
        assert abs(lt.item() - lo.item()) <= TOL
        lt.backward()
        want = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        lo.backward()
        # (ours are held to the float64 transcription at TOL above; sentence-transformers 6.0's
        # cached gradients are up to 1.3e-7 off it here, 6.2's within 1e-14: the library is
        # held to the same loss, not to its last digits)
        for p, g in zip(params, want):
            assert (p.grad - g).abs().max() <= 1e-6, "gist/cached vs sentence-transformers"
        return
    ours = st.GISTEmbedLoss(model, guide, temperature=0.05, **kw)(feats, None)
    _compare("gist/sentence-transformers", ours, Real(model, guide, temperature=0.05, **kw)(feats, None),
             params)


class DimToy(ModuleListToy):
    """ModuleListToy with the embedding width a SentenceTransformer reports (MatryoshkaLoss asks:
    sentence-transformers 6.2 through ``get_embedding_dimension``, 6.3 through the model's
    ``_get_untruncated_embedding_dimension``)."""

    def get_embedding_dimension(self):
        return self.proj.out_features

    def _get_untruncated_embedding_dimension(self):
        return self.get_embedding_dimension()


@pytest.mark.parametrize("kind", ["mnrl", "symmetric", "gist"])
def test_sentence_transformers_matryoshka(kind):
    """sentence-transformers' MatryoshkaLoss around the cached drop-ins: it decorates their
    ``calculate_loss`` (the gradient-cache protocol) and the loss and gradients are those of the
    plain drop-in inside it, which re-runs the model per width, and of the library's own loss;
    in evaluation (no grad) the same value. Before, the cached forms failed there: the
    re-encoding in their backward ran the undecorated model, full width against truncated
    gradients."""
    try:
        import warnings

        from sentence_transformers.sentence_transformer import losses as real
    except Exception:
        pytest.skip("sentence-transformers not installed")
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(2)
    model, guide = DimToy(), ToyEncoder(d=5)
    if kind == "gist":  # (the library's GIST wants tokenizers; one for both: the same features)
        tok = _word_tokenizer([f"w{i}" for i in range(40)])
        for m in (model, guide):
            m.tokenizer, m.max_seq_length = tok, 16
    feats = _columns(gen, 7, 3)
    params = list(model.parameters())
    dims, weights = [12, 8, 4], [1.0, 0.5, 2.0]
    make = {
        "mnrl": (lambda **kw: st.MultipleNegativesRankingLoss(model, scale=15.0, **kw),
                 lambda: real.MultipleNegativesRankingLoss(model, scale=15.0)),
        "symmetric": (lambda **kw: (st.CachedMultipleNegativesSymmetricRankingLoss(model, scale=15.0, **kw)
                                    if kw else st.MultipleNegativesSymmetricRankingLoss(model, scale=15.0)),
                      lambda: real.MultipleNegativesSymmetricRankingLoss(model, scale=15.0)),
        "gist": (lambda **kw: st.GISTEmbedLoss(model, guide, temperature=0.05, margin=0.05, **kw),
                 lambda: real.GISTEmbedLoss(model, guide, temperature=0.05, margin=0.05)),
    }[kind]

    def run(loss, g=0.7):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = real.MatryoshkaLoss(model, loss, dims, weights)
        value = wrapped(feats, None)
        (g * value).backward()
        grads = [p.grad.clone() for p in params]
        with torch.no_grad():
            assert abs(wrapped(feats, None).item() - value.item()) <= TOL
        return value, grads

    cached = make[0](mini_batch_size=3)
    assert cached.uses_gradient_cache and not make[0]().uses_gradient_cache
    want, want_g = run(make[0]())
    got, got_g = run(cached)
    assert abs(got.item() - want.item()) <= TOL
    for a, b in zip(got_g, want_g):
        assert b.abs().max() > 0 and (a - b).abs().max() <= TOL, f"{kind}: matryoshka gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = make[1]()
    peer, peer_g = run(theirs)
    assert abs(peer.item() - want.item()) <= 1e-9
    for a, b in zip(peer_g, want_g):
        assert (a - b).abs().max() <= 1e-9, f"{kind}: matryoshka against sentence-transformers"


@pytest.mark.parametrize("kind", ["mnrl", "gist"])
def test_sentence_transformers_token_budget(kind):
    """mini_batch_num_tokens: each column's mini-batches packed to that many non-padding tokens
    (sentence-transformers' ranges), the model and the guide run on them, and the loss and
    gradients those of the unchunked loss; evaluation (no grad) the same value."""
    gen = torch.Generator().manual_seed(9)
    torch.manual_seed(3)
    model, guide = DimToy(), ToyEncoder(d=5)
    feats = _columns(gen, 9, 3)
    params = list(model.parameters())
    budget = 11
    if kind == "mnrl":
        plain = st.MultipleNegativesRankingLoss(model, scale=15.0)
        cached = st.CachedMultipleNegativesRankingLoss(model, scale=15.0, mini_batch_num_tokens=budget)
    else:
        plain = st.GISTEmbedLoss(model, guide, temperature=0.05, margin=0.05)
        cached = st.CachedGISTEmbedLoss(model, guide, temperature=0.05, margin=0.05,
                                        mini_batch_num_tokens=budget)
    # the ranges: greedy, at most `budget` tokens unless one sequence alone exceeds it
    for f in feats:
        counts = f["attention_mask"].sum(1).tolist()
        ranges = cached._ranges(f)
        assert ranges[0][0] == 0 and ranges[-1][1] == 9 and len(ranges) > 2
        for (s, e), nxt in zip(ranges, ranges[1:] + [None]):
            assert sum(counts[s:e]) <= budget or e == s + 1
            if nxt is not None:
                assert nxt[0] == e and sum(counts[s:e + 1]) > budget
        try:
            from sentence_transformers.base.losses.gradcache import _minibatch_ranges
        except Exception:
            continue
        assert ranges == _minibatch_ranges(f, 32, budget)
    sizes = {"model": [], "guide": []}
    hooks = [model.register_forward_hook(lambda m, a, o: sizes["model"].append(a[0]["input_ids"].shape[0])),
             guide.register_forward_hook(lambda m, a, o: sizes["guide"].append(a[0]["input_ids"].shape[0]))]
    want = plain(feats, None)
    want_g = torch.autograd.grad(0.7 * want, params)
    for k in sizes:
        sizes[k].clear()
    got = cached(feats, None)
    (0.7 * got).backward()
    for h in hooks:
        h.remove()
    expect = [e - s for f in feats for s, e in cached._ranges(f)]
    assert sizes["model"] == expect + expect  # encoded, then re-encoded in the backward
    assert sizes["guide"] == (expect if kind == "gist" else [])
    assert abs(got.item() - want.item()) <= TOL
    for p, g in zip(params, want_g):
        assert g.abs().max() > 0 and (p.grad - g).abs().max() <= TOL, f"{kind}: token-budget gradient"
    with torch.no_grad():
        assert abs(cached(feats, None).item() - want.item()) <= TOL
    with pytest.raises(ValueError, match="mini_batch_num_tokens must be"):
        st.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)
    with pytest.raises(ValueError, match="attention_mask"):
        cached([{"input_ids": f["input_ids"]} for f in feats], None)


@pytest.mark.parametrize("cos", [True, False])
def test_sentence_transformers_contrastive_tension(cos):
    """ContrastiveTensionLossInBatchNegatives: the model's copy and the model on one column, the
    symmetric CLIP loss at a learnable scale; against the transcribed formula and the library's
    class (the copy's, the model's and the scale's gradients)."""
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(4)
    model = ToyEncoder()
    feats = _columns(gen, 8, 1)
    kw = {}
    try:
        from sentence_transformers import util as st_util
        kw["similarity_fct"] = st_util.cos_sim if cos else st_util.dot_score
    except Exception:
        st_util = None
        if not cos:
            kw["similarity_fct"] = lambda a, b: a @ b.T
            kw["similarity_fct"].__name__ = "dot_score"
    ours = st.ContrastiveTensionLossInBatchNegatives(model, scale=12.0, **kw)
    assert ours.model2 is model and ours.model1 is not model
    with torch.no_grad():  # the copy drifts from the model during training
        ours.model1.proj.weight.add_(0.1 * torch.randn(12, 12, generator=gen, dtype=torch.float64))

    def formula():
        a, b = ours.model1(feats[0])["sentence_embedding"], model(feats[0])["sentence_embedding"]
        if cos:
            a, b = nn.functional.normalize(a, dim=-1), nn.functional.normalize(b, dim=-1)
        logits = ours.logit_scale.exp() * a @ b.T
        y = torch.arange(8)
        return (nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(logits.T, y)) / 2

    params = list(ours.parameters())
    assert len(params) == 2 * len(list(model.parameters())) + 1
    _compare("contrastive tension/transcription", ours(feats, None), formula(), params)
    if st_util is None:
        pytest.skip("sentence-transformers not installed: real-peer comparison skipped")
    from sentence_transformers.sentence_transformer.losses import ContrastiveTensionLossInBatchNegatives as Real
    theirs = Real(model, scale=12.0, **kw)
    theirs.model1.load_state_dict(ours.model1.state_dict())
    got = torch.autograd.grad(ours(feats, None), params)
    want_loss = theirs(feats, None)
    want = torch.autograd.grad(want_loss, list(theirs.model2.parameters()) + list(theirs.model1.parameters())
                               + [theirs.logit_scale])
    order = list(ours.model2.parameters()) + list(ours.model1.parameters()) + [ours.logit_scale]
    index = {id(p): i for i, p in enumerate(params)}
    for p, w in zip(order, want):
        assert (got[index[id(p)]] - w).abs().max() <= TOL, "contrastive tension vs sentence-transformers"
    assert abs(ours(feats, None).item() - want_loss.item()) <= TOL


def _tiny_sentence_transformer(path, seed):
    """A real SentenceTransformer, offline: a two-layer BERT (dropout 0.1) with a word-level
    tokenizer, saved under ``path`` and loaded with mean pooling."""
    import warnings

    from transformers import BertConfig, BertModel

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    tok = _word_tokenizer([f"w{i}" for i in range(30)])
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size + 5, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                     hidden_dropout_prob=0.1)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = modules.Transformer(str(path), max_seq_length=16)
        return SentenceTransformer(modules=[tr, modules.Pooling(tr.get_word_embedding_dimension(), "mean")],
                                   device="cpu")


def test_sentence_transformers_real_model_cached(tmp_path):
    """The drop-ins on a real SentenceTransformer against the library's own losses: plain MNRL,
    symmetric MNRL and GIST, MNRL inside AdaptiveLayerLoss and Matryoshka2dLoss (which pass
    every layer's embeddings between calls in the features), and with dropout on (the re-encoding replays the RNG, and the
    mini-batches are cut as the library's) the cached forms with mini_batch_size,
    mini_batch_num_tokens, inside MatryoshkaLoss, and CachedGISTEmbedLoss with a guide model;
    float32, loss and gradients."""
    try:
        import warnings

        import transformers  # noqa: F401
        from sentence_transformers.sentence_transformer import losses as real
    except Exception:
        pytest.skip("sentence-transformers / transformers not installed")
    model = _tiny_sentence_transformer(tmp_path / "model", 0)
    guide = _tiny_sentence_transformer(tmp_path / "guide", 1)
    gen = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(30)]

    def texts(n):
        return [" ".join(words[i] for i in torch.randint(0, 30, (int(torch.randint(2, 9, (1,), generator=gen)),),
                                                         generator=gen)) for _ in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        feats = [dict(model.preprocess(texts(10))) for _ in range(3)]
    params = [p for p in model.parameters() if p.requires_grad]

    def run(loss):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout draws for both
        random.seed(5)  # (AdaptiveLayerLoss samples its layers with Python's random)
        value = loss([dict(f) for f in feats], None)
        (0.7 * value).backward()
        return value.item(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [
            # (the library's plain losses may merge the candidate columns into one forward: other
            # dropout draws; these run without dropout)
            ("plain", st.MultipleNegativesRankingLoss(model), real.MultipleNegativesRankingLoss(model)),
            ("symmetric", st.MultipleNegativesSymmetricRankingLoss(model),
             real.MultipleNegativesSymmetricRankingLoss(model)),
            ("gist plain", st.GISTEmbedLoss(model, guide), real.GISTEmbedLoss(model, guide)),
            ("plain, AdaptiveLayerLoss", real.AdaptiveLayerLoss(model, st.MultipleNegativesRankingLoss(model)),
             real.AdaptiveLayerLoss(model, real.MultipleNegativesRankingLoss(model))),
            ("plain, Matryoshka2dLoss", real.Matryoshka2dLoss(model, st.MultipleNegativesRankingLoss(model),
                                                             [16, 8]),
             real.Matryoshka2dLoss(model, real.MultipleNegativesRankingLoss(model), [16, 8])),
            ("mini_batch_size", st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
             real.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)),
            ("mini_batch_num_tokens", st.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=20),
             real.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=20)),
            ("matryoshka", real.MatryoshkaLoss(model, st.CachedMultipleNegativesRankingLoss(
                model, mini_batch_size=4), [16, 8, 4]), real.MatryoshkaLoss(
                model, real.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), [16, 8, 4])),
            ("gist", st.CachedGISTEmbedLoss(model, guide, mini_batch_size=4),
             real.CachedGISTEmbedLoss(model, guide, mini_batch_size=4)),
        ]
        for name, ours, theirs in cases:
            model.train("plain" not in name and "symmetric" not in name)
            (a, ga), (b, gb) = run(ours), run(theirs)
            assert abs(a - b) <= 1e-5 * abs(b), f"{name}: loss {a} vs {b}"
            size = max(g.abs().max().item() for g in gb)
            err = max((x - y).abs().max().item() for x, y in zip(ga, gb))
            assert size > 0 and err <= 1e-5 * size, f"{name}: gradients off by {err:.2e} (largest {size:.2e})"


def test_sentence_transformers_gist_retokenizes_for_the_guide():
    """A guide with its own vocabulary gets the texts re-encoded by its tokenizer (decoded with the
    model's), as sentence-transformers does."""
    pytest.importorskip("tokenizers")
    words = [f"w{i}" for i in range(40)]
    torch.manual_seed(2)
    model = ModuleListToy(vocab=42)
    model.tokenizer, model.max_seq_length = _word_tokenizer(words), 16
    guide = ToyGuide(_word_tokenizer(words[::-1]))
    gen = torch.Generator().manual_seed(5)
    feats = _columns(gen, 6, 3)
    loss = st.GISTEmbedLoss(model, guide, temperature=0.05)
    assert loss.must_retokenize
    texts = [model.tokenizer.batch_decode(f["input_ids"], skip_special_tokens=True) for f in feats]
    embs = [model(f)["sentence_embedding"] for f in feats]
    with torch.no_grad():
        gembs = [guide(guide.preprocess(t))["sentence_embedding"] for t in texts]
    params = list(model.parameters())
    _compare("gist/retokenized", loss(feats, None),
             _gist_formula(embs[0], embs[1:], gembs[0], gembs[1:], 0.05), params)
    # the guide's own tokens matter: its embeddings of the model's ids differ
    with torch.no_grad():
        assert (guide(feats[0])["sentence_embedding"] - gembs[0]).abs().max() > 1e-3
    try:
        from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as Real
    except Exception:
        pytest.skip("sentence-transformers not installed: real-peer comparison skipped")
    _compare("gist/retokenized/sentence-transformers", loss(feats, None),
             Real(model, guide, temperature=0.05)(feats, None), params)


def test_sentence_transformers_gist_errors():
    model, guide = ToyEncoder(), ToyEncoder(d=5)
    with pytest.raises(ValueError, match="margin_strategy"):
        st.GISTEmbedLoss(model, guide, margin_strategy="percent")
    with pytest.raises(ValueError, match="temperature"):
        st.GISTEmbedLoss(model, guide, temperature=0.0)
    with pytest.raises(ValueError, match="margin"):
        st.GISTEmbedLoss(model, guide, margin=float("nan"))
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        st.CachedGISTEmbedLoss(model, guide, mini_batch_num_tokens=-3)
    with pytest.raises(ValueError, match="at least 2"):
        st.GISTEmbedLoss(model, guide)(_columns(torch.Generator().manual_seed(0), 3, 1), None)
    e = [torch.randn(4, 6, dtype=torch.float64) for _ in range(2)]
    with pytest.raises(ValueError, match="one tensor per column"):
        st.gist_from_embeddings(e, e[:1])
    with pytest.raises(ValueError, match="guide embedding column 1"):
        st.gist_from_embeddings(e, [e[0], torch.randn(3, 2, dtype=torch.float64)])
    model.tokenizer, guide.tokenizer = object(), object()  # two tokenizers that cannot be compared
    with pytest.raises(ValueError, match="get_vocab"):
        st.GISTEmbedLoss(model, guide)


def _gist_worker(r, W):
    """GISTEmbed with gather_across_devices over two ranks: against sentence-transformers (when
    installed) and the transcription on the gathered columns."""
    gen = torch.Generator().manual_seed(7)
    n, d, dg = 4, 8, 5
    cols = [torch.randn(W * n, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    gcols = [torch.randn(W * n, dg, generator=gen, dtype=torch.float64) for _ in range(3)]
    gcols[1][n + 1] = gcols[1][1]  # rank 1's positive 1 is, to the guide, rank 0's positive 1
    local = [c[r * n:(r + 1) * n].clone().requires_grad_(True) for c in cols]
    glocal = [g[r * n:(r + 1) * n] for g in gcols]
    for kw in (dict(), dict(margin_strategy="relative", margin=0.2)):
        ours = st.gist_from_embeddings(local, glocal, temperature=0.1, gather_across_devices=True,
                                       backend="torch", **kw)
        theirs = _gist_formula(cols[0][r * n:(r + 1) * n].clone().requires_grad_(True), cols[1:],
                               glocal[0], gcols[1:], 0.1, offset=r * n, **kw)
        if abs(ours.item() - theirs.item()) > TOL:
            raise AssertionError(f"gist/gather{kw}: {ours.item()} vs {theirs.item()}")
        # gradients of this rank's columns: ours through the gather's backward (summed over
        # ranks), the transcription's on the full columns (each rank's loss alone): compare the
        # sums over ranks, which is what DDP's averaging sees
        ga = torch.autograd.grad(ours, local)
        full = [c.clone().requires_grad_(True) for c in cols]
        t2 = _gist_formula(full[0][r * n:(r + 1) * n], full[1:], glocal[0], gcols[1:], 0.1,
                           offset=r * n, **kw)
        gb = list(torch.autograd.grad(t2, full))
        for g in gb:
            dist.all_reduce(g)
        for k, (a, b) in enumerate(zip(ga, gb)):
            b = b[r * n:(r + 1) * n]
            if b.abs().max() == 0 or (a - b).abs().max() > TOL:
                raise AssertionError(f"gist/gather{kw}: grad {k} off by {(a - b).abs().max().item():.3e}")


def test_sentence_transformers_gist_distributed():
    run_gloo(_gist_worker, 2)


def _cached_gather_worker(r, W):
    """The cached drop-ins with gather_across_devices: calculate_loss back-propagates through the
    all-gather inside the forward (every rank takes part), the re-encoding follows at the
    backward; parameter gradients equal the plain drop-in's on every rank, inside MatryoshkaLoss
    too when sentence-transformers is installed."""
    gen = torch.Generator().manual_seed(21 + r)
    torch.manual_seed(6)  # the same model on every rank
    model = DimToy()
    feats = _columns(gen, 6, 3)
    params = list(model.parameters())
    cases = [(st.MultipleNegativesRankingLoss(model, scale=15.0, gather_across_devices=True),
              st.CachedMultipleNegativesRankingLoss(model, scale=15.0, mini_batch_size=4,
                                                    gather_across_devices=True))]
    try:
        import warnings

        from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases.append(tuple(MatryoshkaLoss(model, loss, [12, 6], [1.0, 0.5]) for loss in (
                st.MultipleNegativesRankingLoss(model, scale=15.0, gather_across_devices=True),
                st.CachedMultipleNegativesRankingLoss(model, scale=15.0, mini_batch_num_tokens=13,
                                                      gather_across_devices=True))))
    except ImportError:
        pass
    for k, (plain, cached) in enumerate(cases):
        grads = []
        for loss in (plain, cached):
            model.zero_grad(set_to_none=True)
            value = loss(feats, None)
            (0.8 * value).backward()
            grads.append((value.item(), [p.grad.clone() for p in params]))
        (a, ga), (b, gb) = grads
        if abs(a - b) > TOL:
            raise AssertionError(f"case {k}: loss {a} vs {b}")
        for x, y in zip(ga, gb):
            if x.abs().max() == 0 or (x - y).abs().max() > TOL:
                raise AssertionError(f"case {k}: gradient off by {(x - y).abs().max().item():.3e}")


def test_sentence_transformers_cached_gather_distributed():
    run_gloo(_cached_gather_worker, 2)


def _cached_ddp_worker(r, W):
    """The cached drop-in around a DistributedDataParallel model (as the library's trainer puts
    it in the loss), each rank with a different number of token-packed mini-batches: the
    re-encoding synchronises once, on each rank's last mini-batch (a sync per mini-batch would
    pair rank 0's third with nothing on rank 1), and the averaged gradients are those of the
    plain drop-in's single backward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    gen = torch.Generator().manual_seed(40 + r)
    torch.manual_seed(8)  # the same model on every rank
    model = DDP(DimToy())
    feats = _columns(gen, 6 if r == 0 else 3, 2)  # uneven chunk counts across the ranks
    params = list(model.parameters())
    plain = st.MultipleNegativesRankingLoss(model, scale=15.0)
    cached = st.CachedMultipleNegativesRankingLoss(model, scale=15.0, mini_batch_num_tokens=9)
    if r == 0:
        assert [len(cached._ranges(f)) for f in feats] != [len(cached._ranges(f)) for f in
                                                           _columns(torch.Generator().manual_seed(41), 3, 2)]
    grads = []
    for loss in (plain, cached):
        model.zero_grad(set_to_none=True)
        (0.6 * loss(feats, None)).backward()
        grads.append([p.grad.clone() for p in params])
    for x, y in zip(*grads):
        if x.abs().max() == 0 or (x - y).abs().max() > TOL:
            raise AssertionError(f"ddp cached gradient off by {(x - y).abs().max().item():.3e}")


def test_sentence_transformers_cached_ddp_uneven_mini_batches():
    run_gloo(_cached_ddp_worker, 2)


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning
# ----------------------------------------------------------------------------------------------


def _pml_ntxent_formula(x, labels, t, ref=None, ref_labels=None):
    """pml's NTXentLoss (cosine similarity, MeanReducer over positive pairs), transcribed; with
    ``ref``, the batch against that reference set (every pair)."""
    x = nn.functional.normalize(x, dim=1)
    r = x if ref is None else nn.functional.normalize(ref, dim=1)
    rl = labels if ref is None else ref_labels
    S = x @ r.T / t
    same = labels[:, None] == rl[None, :]
    pos = same & ~torch.eye(x.shape[0], dtype=torch.bool) if ref is None else same
    a, p = torch.nonzero(pos, as_tuple=True)
    neg = S.masked_fill(same, -math.inf)[a]
    den = torch.logsumexp(torch.cat([S[a, p][:, None], neg], 1), 1)
    return (den - S[a, p]).mean()


@pytest.mark.parametrize("kind", ["simclr", "groups"])
def test_pml_ntxent(kind):
    gen = torch.Generator().manual_seed(5)
    if kind == "simclr":
        labels = torch.arange(6).repeat(2)
    else:
        labels = torch.randint(0, 4, (14,), generator=gen)
    x = _feats(gen, labels.shape[0], 10, normalize=False)
    ours = pml.NTXentLoss(temperature=0.2)(x, labels)
    _compare("ntxent/transcription", ours, _pml_ntxent_formula(x, labels, 0.2), [x])
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    _compare("ntxent/pml", pml.NTXentLoss(temperature=0.2)(x, labels),
             losses.NTXentLoss(temperature=0.2)(x, labels), [x], tol=1e-8)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("kind", ["ntxent", "supcon"])
def test_pml_self_supervised(kind, symmetric):
    """SelfSupervisedLoss around the drop-ins against pml's own wrapper around its own losses
    (two augmentations, stacked or the second as a reference set), and pml's wrapper around the
    drop-ins (its labels made on the CPU)."""
    gen = torch.Generator().manual_seed(8)
    x = _feats(gen, 7, 9, normalize=False)
    y = (x.detach() + 0.4 * torch.randn(7, 9, generator=gen, dtype=x.dtype)).requires_grad_(True)
    ours_cls = pml.NTXentLoss if kind == "ntxent" else pml.SupConLoss
    loss = pml.SelfSupervisedLoss(ours_cls(temperature=0.2), symmetric=symmetric)
    ours = loss(x, y)
    ref_labels = torch.arange(7)
    if symmetric:
        ref = (_pml_ntxent_formula(torch.cat([x, y]), ref_labels.repeat(2), 0.2) if kind == "ntxent"
               else reference.supcon(torch.cat([x, y]), ref_labels.repeat(2), 0.2)[0])
    else:
        ref = (_pml_ntxent_formula(x, ref_labels, 0.2, y, ref_labels) if kind == "ntxent" else None)
    if ref is not None:
        _compare(f"self-supervised/{kind}/transcription", ours, ref, [x, y])
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    real = getattr(losses, "NTXentLoss" if kind == "ntxent" else "SupConLoss")(temperature=0.2)
    wrapper = losses.SelfSupervisedLoss(real, symmetric=symmetric)
    _compare(f"self-supervised/{kind}/pml", loss(x, y), wrapper(x, y), [x, y], tol=1e-8)
    wrapped = losses.SelfSupervisedLoss(ours_cls(temperature=0.2), symmetric=symmetric)(x, y)
    _compare(f"self-supervised/{kind}/pml-wrapper", wrapped, wrapper(x, y), [x, y], tol=1e-8)


def test_pml_self_supervised_errors():
    gen = torch.Generator().manual_seed(9)
    x = _feats(gen, 5, 4, normalize=False)
    with pytest.raises(TypeError, match="NTXentLoss or SupConLoss"):
        pml.SelfSupervisedLoss(nn.MSELoss())
    with pytest.raises(ValueError, match="same batch size"):
        pml.SelfSupervisedLoss(pml.NTXentLoss())(x, x[:4])


def test_pml_supcon():
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 5, (15,), generator=gen)
    labels[0] = 99  # an anchor without positives: excluded from the mean
    x = _feats(gen, 15, 10, normalize=False)
    ours = pml.SupConLoss(temperature=0.1)(x, labels)
    ref, _ = reference.supcon(x, labels, 0.1)
    _compare("supcon/reference", ours, ref, [x])
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    _compare("supcon/pml", pml.SupConLoss(temperature=0.1)(x, labels),
             losses.SupConLoss(temperature=0.1)(x, labels), [x], tol=1e-8)
    with pytest.raises(ValueError, match="labels"):
        pml.SupConLoss()(x, None)
    with pytest.raises(ValueError, match="not supported"):
        pml.NTXentLoss()(x, labels, (labels, labels, labels, labels))
    with pytest.raises(ValueError, match="ref_labels must be given"):
        pml.NTXentLoss()(x, labels, ref_emb=x)
    with pytest.raises(ValueError, match="ref_labels needs ref_emb"):
        pml.SupConLoss()(x, labels, ref_labels=labels)
    with pytest.raises(ValueError, match="feature dimension"):
        pml.SupConLoss()(x, labels, ref_emb=x[:, :4], ref_labels=labels)
    with pytest.raises(ValueError, match=r"ref_labels must have shape \(14,\)"):
        pml.SupConLoss()(x, labels, ref_emb=x[:14], ref_labels=labels)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_pml_reference_set(backend):
    """pml's ``ref_emb`` / ``ref_labels``: the batch against a reference set (a cross-batch
    memory, say): every pair, no self-exclusion, rectangular fused sweeps."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (9,), generator=gen)
    ref_labels = torch.randint(0, 5, (13,), generator=gen)
    ref_labels[0] = labels[0]  # at least one positive pair
    dt, tol = (torch.float64, 1e-8) if backend == "torch" else (torch.float32, 2e-5)
    x = _feats(gen, 9, 10, normalize=False).to(dt).detach().requires_grad_()
    r = _feats(gen, 13, 10, normalize=False).to(dt).detach().requires_grad_()
    kw = dict(ref_emb=r, ref_labels=ref_labels)
    ntx = lambda: pml.NTXentLoss(temperature=0.2, backend=backend)(x, labels, **kw)  # noqa: E731
    sup = lambda: pml.SupConLoss(temperature=0.1, backend=backend)(x, labels, **kw)  # noqa: E731
    _compare("ntxent/ref/transcription", ntx(), _pml_ntxent_formula(x, labels, 0.2, r, ref_labels),
             [x, r], tol=tol)
    ref, _ = reference.supcon(x.double(), labels, 0.1, keys=r.double(), key_labels=ref_labels)
    _compare("supcon/ref/reference", sup(), ref.to(dt), [x, r], tol=tol)
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    _compare("ntxent/ref/pml", ntx(), losses.NTXentLoss(temperature=0.2)(x, labels, **kw), [x, r],
             tol=tol)
    _compare("supcon/ref/pml", sup(), losses.SupConLoss(temperature=0.1)(x, labels, **kw), [x, r],
             tol=tol)


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("masked", [False, True])
def test_pml_cross_batch_memory(backend, masked):
    """pml's CrossBatchMemory around the drop-ins, step by step through the memory's wrap-around
    (B = 4 into 10 slots) and with an enqueue mask (MoCo style: only the masked rows are queued,
    the others are the queries): the same loss and gradients as pml's wrapper around its own
    losses, the same queue. Also a transcription of SupCon against a memory that holds the batch
    (each row's own slot left out), independent of pml."""
    gen = torch.Generator().manual_seed(9)
    dt, tol = (torch.float64, 1e-9) if backend == "torch" else (torch.float32, 2e-5)
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    for name in ("NTXentLoss", "SupConLoss"):
        ours = pml.CrossBatchMemory(getattr(pml, name)(backend=backend), 8, memory_size=10)
        theirs = losses.CrossBatchMemory(getattr(losses, name)(), 8, memory_size=10)
        for step in range(5):
            x = torch.randn(6 if masked else 4, 8, generator=gen, dtype=torch.float64).to(dt)
            y = torch.randint(0, 3, (x.shape[0],), generator=gen)
            mask = torch.arange(x.shape[0]) < 4 if masked else None
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            a, b = ours(xa, y, enqueue_mask=mask), theirs(xb, y, enqueue_mask=mask)
            assert abs(a.item() - b.item()) <= tol * max(1.0, abs(b.item())), (name, step)
            ga = torch.autograd.grad(a, xa, allow_unused=True)[0]
            gb = torch.autograd.grad(b, xb, allow_unused=True)[0] if b.requires_grad else None
            ga = torch.zeros_like(x) if ga is None else ga
            gb = torch.zeros_like(x) if gb is None else gb
            assert (ga - gb).abs().max() <= tol * max(1.0, gb.abs().max().item()), (name, step)
            assert (ours.queue_idx, ours.has_been_filled) == (theirs.queue_idx, theirs.has_been_filled)
            assert torch.equal(ours.label_memory, theirs.label_memory)
        assert step == 4 and ours.has_been_filled  # the memory wrapped around
    # SupCon against a memory holding the batch at slot 3: the transcription
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 2, 1])
    mem = torch.randn(9, 8, generator=gen, dtype=torch.float64)
    mem[3:8] = x
    mem_y = torch.tensor([0, 1, 0, 0, 1, 0, 2, 1, 1])  # slots 3..7: y; label 2 only in row 3's own
    xn, mn = nn.functional.normalize(x, dim=1), nn.functional.normalize(mem, dim=1)
    own = torch.zeros(5, 9, dtype=torch.bool)
    own[torch.arange(5), torch.arange(5) + 3] = True
    pos = (y[:, None] == mem_y[None, :]) & ~own
    S = (xn @ mn.T / 0.1).masked_fill(own, -math.inf)
    logp = S - S.logsumexp(1, keepdim=True)
    per = -(logp.masked_fill(~pos, 0)).sum(1) / pos.sum(1).clamp(min=1)
    want = per[pos.any(1)].mean()  # rows with a positive
    assert not pos.any(1).all()  # (one row without: left out of the mean)
    xs = x.to(dt).requires_grad_()
    got = fastcl.supcon(xs, y, 0.1, keys=mem.to(dt), key_labels=mem_y, self_offset=3, backend=backend,
                         exact=True)
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    with pytest.raises(TypeError, match="loss must be"):
        pml.CrossBatchMemory(nn.MSELoss(), 8)
    with pytest.raises(ValueError, match="miner"):
        pml.CrossBatchMemory(pml.SupConLoss(), 8, miner=object())
    xbm = pml.CrossBatchMemory(pml.SupConLoss(), 8, memory_size=3)
    with pytest.raises(ValueError, match="indices_tuple"):
        xbm(x, y, indices_tuple=(y, y, y, y))
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        xbm(x[:, :4], y)
    with pytest.raises(ValueError, match="enqueue_mask"):
        xbm(x, y, enqueue_mask=y)
    with pytest.raises(ValueError, match="do not fit memory_size 3"):
        xbm(x, y)
    with pytest.raises(ValueError, match="self_offset"):
        fastcl.supcon(x, y, 0.1, keys=mem, key_labels=mem_y, self_offset=5)


@pytest.mark.parametrize("labels, ref_labels", [
    ([0, 0, 0, 0, 0], None),      # no negative pair: pml's loss is 0
    ([0, 1, 2, 3, 4], None),      # no positive pair
    ([0, 0, 1, 1, 2], [7, 8, 7]),  # none against the reference set
    ([0, 0, 1, 1, 2], [0, 0, 0]),  # SupCon has no negative in some rows only: a loss
    ([0], [0, 1]),                # one positive and one negative pair: pml returns 0
    ([0, 1], [0, 2]),             # one positive pair, three negatives
])
def test_pml_degenerate_batches(labels, ref_labels):
    """Where pml's pair losses return 0 (no positive pair, no negative pair, or at most one of
    each), so do the drop-ins, with a zero gradient; elsewhere they agree with pml."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    gen = torch.Generator().manual_seed(8)
    labels = torch.tensor(labels)
    x = _feats(gen, labels.shape[0], 6, normalize=False)
    kw, inputs = {}, [x]
    if ref_labels is not None:
        r = _feats(gen, len(ref_labels), 6, normalize=False)
        kw, inputs = dict(ref_emb=r, ref_labels=torch.tensor(ref_labels)), [x, r]
    for name in ("NTXentLoss", "SupConLoss"):
        ours = getattr(pml, name)(backend="torch")(x, labels, **kw)
        theirs = getattr(losses, name)()(x, labels, **kw)
        assert abs(ours.item() - theirs.item()) <= 1e-8 * max(1.0, abs(theirs.item())), \
            (name, ours.item(), theirs.item())
        grads = torch.autograd.grad(ours, inputs)
        assert all(torch.isfinite(g).all() for g in grads), name
        if theirs.item() == 0:
            assert all((g == 0).all() for g in grads), name


# ----------------------------------------------------------------------------------------------
# float32 accuracy where the positive dominates, and the drop-ins' float32 product precision
# ----------------------------------------------------------------------------------------------


def _near_duplicate_views(gen, n, d, views):
    z = nn.functional.normalize(torch.randn(n, d, dtype=torch.float64, generator=gen), dim=1)
    return [nn.functional.normalize(z + 0.05 * torch.randn(n, d, dtype=torch.float64, generator=gen),
                                    dim=1) for _ in range(views)]


def _float32_errors(ours, theirs, inputs):
    """Relative errors against float64 of the loss and each input's gradient: (ours, theirs in
    float32)."""
    def run(fn, dt):
        xs = [x.detach().to(dt).requires_grad_() for x in inputs]
        out = fn(*xs)
        out.backward()
        return [out.detach().double()] + [x.grad.double() for x in xs]
    want = run(theirs, torch.float64)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return ([rel(a, b) for a, b in zip(run(ours, torch.float32), want)],
            [rel(a, b) for a, b in zip(run(theirs, torch.float32), want)])


@pytest.mark.parametrize("backend", ["torch", TRITON])
@pytest.mark.parametrize("case", ["mnrl", "mnrl_all_directions", "mnrl_hard_negatives",
                                  "mnrl_in_batch_negatives", "mnrl_all_negatives",
                                  "ntxent_two_views", "ntxent_three_views"])
def test_drop_ins_float32_where_the_positive_dominates(case, backend):
    """Near-duplicate positives at scale 20: the loss ~1e-3 per anchor sits next to LSEs ~20.
    MNRL takes each direction holding the pair as the engine's own LSE - target (before: the LSE
    and the positive's logit computed apart, 3e-4 off in the loss, 1e-4 in the positives'
    gradient, PyTorch float32 1.5e-4 / 3e-5); pml's NT-Xent takes softplus(LSE over the other
    labels - S_ap) (before: 3e-4 / 1e-3, pml 1e-4 / 4e-4). Now within 2e-5 of float64 and 2x of
    the libraries' own float32 computation (both at the float32 floor for the hard negatives)."""
    gen = torch.Generator().manual_seed(3)
    if case.startswith("mnrl"):
        directions = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc") \
            if case == "mnrl_all_directions" else ("query_to_doc",)
        hardness = case[5:] if case.endswith("_negatives") else None  # (strength 3)
        inputs = _near_duplicate_views(gen, 40, 24, 2) + [torch.randn(40, 24, dtype=torch.float64,
                                                                       generator=gen)]
        def ours(*embs):
            return st.mnrl_from_embeddings(list(embs), scale=20.0, directions=directions,
                                           backend=backend, hardness_mode=hardness,
                                           hardness_strength=3.0)

        def theirs(*embs):
            return _mnrl_formula(list(embs), 20.0, directions, "joint", True, hardness, 3.0)
    else:
        views = 2 if case == "ntxent_two_views" else 3
        labels = torch.arange(30).repeat(views)
        inputs = [torch.cat(_near_duplicate_views(gen, 30, 24, views))]

        def ours(x):
            return pml.NTXentLoss(temperature=0.05, backend=backend)(x, labels)

        def theirs(x):
            return _pml_ntxent_formula(x, labels, 0.05)
    have, peer = _float32_errors(ours, theirs, inputs)
    for i, (e, e_peer) in enumerate(zip(have, peer)):
        assert e <= 2e-5 and e <= 2 * e_peer, (case, i, have, peer)


def test_drop_ins_follow_torchs_float32_matmul_precision(monkeypatch):
    """By default a drop-in forms float32 products as the library it replaces would: IEEE, or
    TF32 where torch allows it (``exact`` given overrides)."""
    from fastcl.integrations._common import exact_products
    assert exact_products(None) and exact_products(True) and not exact_products(False)
    seen = []
    real = st.row_gap

    def spy(*args, exact, **kw):
        seen.append(exact)
        return real(*args, exact=exact, **kw)
    monkeypatch.setattr(st, "row_gap", spy)
    embs = _near_duplicate_views(torch.Generator().manual_seed(0), 8, 6, 2)
    st.mnrl_from_embeddings(embs)
    matmul = torch.backends.cuda.matmul  # (a module-like object: set and restored by hand)
    before = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        assert not exact_products(None) and exact_products(True)
        st.mnrl_from_embeddings(embs)
        st.mnrl_from_embeddings(embs, exact=True)
    finally:
        matmul.allow_tf32 = before
    assert exact_products(None)
    assert seen == [True, False, True]


@pytest.mark.interpreter
def test_gist_triton_float32():
    """The drop-in's blocks on the Triton engine (the interpreter on CPU), float32 against the
    float64 transcription; one anchor's guide sees a duplicate of its positive (a tie: it stays)."""
    gen = torch.Generator().manual_seed(11)
    n, d, dg = 19, 24, 9
    embs = [torch.randn(n, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    gembs = [torch.randn(n, dg, generator=gen, dtype=torch.float64) for _ in range(3)]
    gembs[2][3] = gembs[1][3] * 2.0  # anchor 3's negative is, to the guide, its positive
    gembs[1][5] = gembs[1][4]  # positive 5 duplicates positive 4 to the guide
    e32 = [e.float().requires_grad_(True) for e in embs]
    ours = st.gist_from_embeddings(e32, [g.float() for g in gembs], temperature=0.05, backend="triton",
                                   exact=True)
    e64 = [e.clone().requires_grad_(True) for e in embs]
    ref = _gist_formula(e64[0], e64[1:], gembs[0], gembs[1:], 0.05)
    assert abs(ours.item() - ref.item()) <= 2e-6 * abs(ref.item())
    for a, b in zip(torch.autograd.grad(ours, e32), torch.autograd.grad(ref, e64)):
        assert ((a.double() - b).norm() / b.norm()).item() <= 2e-5


# ----------------------------------------------------------------------------------------------
# lightly
# ----------------------------------------------------------------------------------------------


def _lightly():
    try:
        from lightly import loss as lightly_loss
        return lightly_loss
    except Exception:
        pytest.skip("lightly is not installed: real-peer comparison skipped")


def test_lightly_ntxent_without_memory_bank():
    gen = torch.Generator().manual_seed(21)
    a, b = _feats(gen, 11, 7, normalize=False), _feats(gen, 11, 7, normalize=False)
    ours = ly.NTXentLoss(temperature=0.3)(a, b)
    # transcription: NT-Xent over both views, the other view the target (fastcl's reference)
    _compare("lightly/ntxent/reference", ours,
             reference.nt_xent(nn.functional.normalize(a, dim=1), nn.functional.normalize(b, dim=1), 0.3),
             [a, b])
    lightly_loss = _lightly()
    _compare("lightly/ntxent", ly.NTXentLoss(temperature=0.3)(a, b),
             lightly_loss.NTXentLoss(temperature=0.3)(a, b), [a, b])


def test_lightly_ntxent_memory_bank():
    """MoCo: the bank's entries are the negatives, the queue advances by out1's rows (wrapping)."""
    lightly_loss = _lightly()
    gen = torch.Generator().manual_seed(22)
    torch.manual_seed(5)
    ours = ly.NTXentLoss(temperature=0.2, memory_bank_size=(10, 6), exact=True)
    torch.manual_seed(5)  # the same random initial bank
    theirs = lightly_loss.NTXentLoss(temperature=0.2, memory_bank_size=(10, 6))
    assert torch.equal(ours.memory_bank.bank, theirs.memory_bank.bank)
    for step in range(4):  # 4 rows per step: the queue wraps on the third
        a = torch.randn(4, 6, generator=gen).requires_grad_(True)
        b = torch.randn(4, 6, generator=gen).requires_grad_(True)
        lo, lt = ours(a, b), theirs(a, b)
        assert abs(lo.item() - lt.item()) <= 2e-6 * abs(lt.item()), step
        for ga, gb in zip(torch.autograd.grad(lo, [a, b]), torch.autograd.grad(lt, [a, b])):
            assert (ga - gb).abs().max() <= 2e-6, step
        assert torch.allclose(ours.memory_bank.bank, theirs.memory_bank.bank, atol=1e-7), step
    # out0 without a gradient (evaluation): the bank stays
    before = ours.memory_bank.bank.clone()
    ours(torch.randn(4, 6), torch.randn(4, 6))
    assert torch.equal(before, ours.memory_bank.bank)


@pytest.mark.parametrize("weighted", [False, True])
def test_lightly_dcl(weighted):
    lightly_loss = _lightly()
    gen = torch.Generator().manual_seed(23)
    a, b = _feats(gen, 13, 9, normalize=False), _feats(gen, 13, 9, normalize=False)
    if weighted:
        with pytest.warns(UserWarning):  # (lightly copies its weights with torch.tensor)
            theirs = lightly_loss.DCLWLoss(temperature=0.2, sigma=0.4)(a, b)
        ours = ly.DCLWLoss(temperature=0.2, sigma=0.4)(a, b)
    else:
        fn = lambda x, y: ((x - y) ** 2).sum(1)  # noqa: E731 (a weight with a gradient)
        ours = ly.DCLLoss(temperature=0.2, weight_fn=fn)(a, b)
        theirs = lightly_loss.DCLLoss(temperature=0.2, weight_fn=fn)(a, b)
    _compare(f"lightly/dcl{'w' if weighted else ''}", ours, theirs, [a, b])


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["ntxent", "ntxent_bank", "dcl", "dclw"])
def test_lightly_triton(name):
    """The drop-ins on the Triton engine (the interpreter on CPU), float32, against float64."""
    gen = torch.Generator().manual_seed(24)
    a, b = _feats(gen, 17, 12, normalize=False), _feats(gen, 17, 12, normalize=False)
    make = {"ntxent": lambda **kw: ly.NTXentLoss(0.2, **kw),
            "ntxent_bank": lambda **kw: ly.NTXentLoss(0.2, memory_bank_size=(23, 12), **kw),
            "dcl": lambda **kw: ly.DCLLoss(0.2, **kw), "dclw": lambda **kw: ly.DCLWLoss(0.2, 0.5, **kw)}[name]
    torch.manual_seed(0)
    ref_loss = make(backend="torch")
    ref = ref_loss(a, b)
    torch.manual_seed(0)
    a32, b32 = (x.detach().float().requires_grad_(True) for x in (a, b))
    ours = make(backend="triton", exact=True)(a32, b32)
    assert abs(ours.item() - ref.item()) <= 2e-6 * abs(ref.item())
    for g, gr in zip(torch.autograd.grad(ours, [a32, b32]), torch.autograd.grad(ref, [a, b])):
        assert ((g.double() - gr).norm() / gr.norm()).item() <= 2e-5


@pytest.mark.parametrize("aligned", [False, True])
def test_lightly_macl(aligned):
    lightly_loss = _lightly()
    gen = torch.Generator().manual_seed(26)
    a = torch.randn(12, 8, generator=gen, dtype=torch.float64)
    b = a + (0.1 if aligned else 3.0) * torch.randn(12, 8, generator=gen, dtype=torch.float64)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    _compare("lightly/macl", ly.MACLLoss(0.1, 0.5, 0.2)(a, b), lightly_loss.MACLLoss(0.1, 0.5, 0.2)(a, b),
             [a, b])


@pytest.mark.parametrize("name", ["directclr", "directclr_bank", "hypersphere"])
def test_lightly_directclr_and_hypersphere(name):
    lightly_loss = _lightly()
    gen = torch.Generator().manual_seed(25)
    a, b = (torch.randn(10, 3, 4, generator=gen, dtype=torch.float64).requires_grad_(True)
            for _ in range(2))
    if name == "hypersphere":
        a, b = (x.detach()[:, 0].clone().requires_grad_(True) for x in (a, b))
        ours = ly.HypersphereLoss(t=1.5, lam=0.7, alpha=3.0)(a, b)
        from lightly.loss.hypersphere_loss import HypersphereLoss
        theirs = HypersphereLoss(t=1.5, lam=0.7, alpha=3.0)(a, b)
        _compare("lightly/hypersphere", ours, theirs, [a, b])
        return
    kw = dict(memory_bank_size=(12, 5)) if name == "directclr_bank" else {}
    torch.manual_seed(1)
    ours_fn = ly.DirectCLRLoss(loss_dim=5, temperature=0.3, **kw)
    torch.manual_seed(1)
    theirs_fn = lightly_loss.DirectCLRLoss(loss_dim=5, temperature=0.3, **kw)
    if kw:  # (lightly's bank is float32)
        a, b = (x.detach().float().requires_grad_(True) for x in (a, b))
    lo, lt = ours_fn(a, b), theirs_fn(a, b)
    assert abs(lo.item() - lt.item()) <= 2e-6 * abs(lt.item())
    for ga, gb in zip(torch.autograd.grad(lo, [a, b]), torch.autograd.grad(lt, [a, b])):
        assert gb.abs().max() > 0 and (ga - gb).abs().max() <= 2e-6


def test_lightly_errors():
    with pytest.raises(ValueError, match="does not specify the feature dimension"):
        ly.NTXentLoss(memory_bank_size=128)
    with pytest.raises(ValueError, match="Illegal temperature"):
        ly.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="same shape"):
        ly.NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="sigma"):
        ly.DCLWLoss(sigma=0.0)


def _lightly_worker(r, W):
    from lightly import loss as lightly_loss

    gen = torch.Generator().manual_seed(8)
    n, d = 5, 6
    A = torch.randn(W * n, d, generator=gen, dtype=torch.float64)
    B = torch.randn(W * n, d, generator=gen, dtype=torch.float64)
    for name, make in (("ntxent", lambda L: L.NTXentLoss(temperature=0.3, gather_distributed=True)),
                       ("dcl", lambda L: L.DCLLoss(temperature=0.3, gather_distributed=True))):
        a, b = (x[r * n:(r + 1) * n].clone().requires_grad_(True) for x in (A, B))
        a2, b2 = (x.detach().clone().requires_grad_(True) for x in (a, b))
        ours, theirs = make(ly)(a, b), make(lightly_loss)(a2, b2)
        if abs(ours.item() - theirs.item()) > TOL:
            raise AssertionError(f"lightly/{name}/gather: {ours.item()} vs {theirs.item()}")
        for k, (ga, gb) in enumerate(zip(torch.autograd.grad(ours, [a, b]),
                                         torch.autograd.grad(theirs, [a2, b2]))):
            if gb.abs().max() == 0 or (ga - gb).abs().max() > TOL:
                raise AssertionError(f"lightly/{name}/gather: grad {k} off by {(ga - gb).abs().max():.3e}")
    # the memory bank filled from every rank's rows
    torch.manual_seed(3)
    ours = ly.NTXentLoss(temperature=0.3, memory_bank_size=(3 * W * n, d), gather_distributed=True)
    torch.manual_seed(3)
    theirs = lightly_loss.NTXentLoss(temperature=0.3, memory_bank_size=(3 * W * n, d),
                                     gather_distributed=True)
    for step in range(4):
        a, b = (torch.randn(n, d, generator=gen).requires_grad_(True) for _ in range(2))
        lo, lt = ours(a, b), theirs(a, b)
        if abs(lo.item() - lt.item()) > 2e-6 * abs(lt.item()):
            raise AssertionError(f"lightly/memory bank/gather step {step}: {lo.item()} vs {lt.item()}")
        if not torch.allclose(ours.memory_bank.bank, theirs.memory_bank.bank, atol=1e-7):
            raise AssertionError(f"lightly/memory bank/gather step {step}: banks differ")


def test_lightly_distributed():
    _lightly()
    run_gloo(_lightly_worker, 2)


# ----------------------------------------------------------------------------------------------
# info-nce-pytorch
# ----------------------------------------------------------------------------------------------


def _info_nce_formula(q, p, neg, t, reduction, mode):
    """info-nce-pytorch's info_nce, transcribed."""
    q, p = nn.functional.normalize(q, dim=-1), nn.functional.normalize(p, dim=-1)
    if neg is None:
        return nn.functional.cross_entropy(q @ p.T / t, torch.arange(len(q)), reduction=reduction)
    neg = nn.functional.normalize(neg, dim=-1)
    negs = q @ neg.T if mode == "unpaired" else torch.einsum("nd,nmd->nm", q, neg)
    logits = torch.cat([(q * p).sum(1, keepdim=True), negs], 1) / t
    return nn.functional.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long), reduction=reduction)


@pytest.mark.parametrize("mode", [None, "unpaired", "paired"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_pytorch(mode, reduction):
    gen = torch.Generator().manual_seed(27)
    q, p = _feats(gen, 9, 7, normalize=False), _feats(gen, 9, 7, normalize=False)
    neg = None
    if mode == "unpaired":
        neg = _feats(gen, 13, 7, normalize=False)
    elif mode == "paired":
        neg = torch.randn(9, 4, 7, generator=gen, dtype=torch.float64).requires_grad_(True)
    kw = dict(temperature=0.2, reduction=reduction, negative_mode=mode or "unpaired")
    inputs = [q, p] + ([neg] if neg is not None else [])
    g = torch.tensor(0.7, dtype=torch.float64) if reduction != "none" else \
        torch.rand(9, generator=gen, dtype=torch.float64) + 0.5

    def check(name, ours, theirs):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=TOL, rtol=TOL), name
        for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
            assert b.abs().max() > 0 and (a - b).abs().max() <= TOL, name

    check("info_nce/transcription", infonce.InfoNCE(**kw)(q, p, neg), _info_nce_formula(q, p, neg, 0.2, reduction,
                                                                                    kw["negative_mode"]))
    try:
        import info_nce as peer
    except Exception:
        pytest.skip("info-nce-pytorch is not installed: real-peer comparison skipped")
    check("info_nce/info-nce-pytorch", infonce.info_nce(q, p, neg, **kw), peer.info_nce(q, p, neg, **kw))


@pytest.mark.interpreter
def test_info_nce_pytorch_triton():
    """The unpaired negatives' sweep on the Triton engine (the interpreter on CPU), float32."""
    gen = torch.Generator().manual_seed(28)
    q, p, neg = (torch.randn(n, 16, generator=gen, dtype=torch.float64) for n in (11, 11, 29))
    ref = _info_nce_formula(q, p, neg, 0.1, "none", "unpaired")
    ours = infonce.info_nce(q.float(), p.float(), neg.float(), temperature=0.1, reduction="none",
                        backend="triton", exact=True)
    assert ((ours.double() - ref).norm() / ref.norm()).item() <= 2e-6


def test_info_nce_pytorch_without_negatives_rows():
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for neg in (torch.randn(0, 3, dtype=torch.float64), torch.randn(4, 0, 3, dtype=torch.float64)):
        mode = "unpaired" if neg.dim() == 2 else "paired"
        out = infonce.info_nce(q, q, neg, negative_mode=mode, reduction="none")
        assert torch.equal(out, torch.zeros(4, dtype=torch.float64))
        try:
            import info_nce as peer
        except Exception:
            continue
        assert torch.allclose(out, peer.info_nce(q, q, neg, negative_mode=mode, reduction="none"))


def test_info_nce_pytorch_errors():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="negative_mode"):
        infonce.InfoNCE(negative_mode="shared")
    with pytest.raises(ValueError, match="must have 3 dimensions"):
        infonce.info_nce(q, q, torch.randn(5, 3), negative_mode="paired")
    with pytest.raises(ValueError, match="same number of samples"):
        infonce.info_nce(q, q[:3])
    with pytest.raises(ValueError, match="temperature"):
        infonce.info_nce(q, q, temperature=0.0)
