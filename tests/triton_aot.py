"""Compile the Triton kernels of the engine for GPU targets without a GPU (run as a module in a
process where TRITON_INTERPRET is unset): ``python -m tests.triton_aot`` prints a JSON report
{variant: {"ok", "error", "usage"}} used by tests/test_triton_compile.py."""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcl.ops.triton import engine as E

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_FEATURE_PTRS = ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr", "ds_ptr")
_INDEX_PTRS = ("pos_ptr", "cpos_ptr", "idx_ptr")
_ID_PTRS = ("rlab_ptr", "clab_ptr", "rid_ptr", "cid_ptr")  # labels and ids as the launchers pass them: int32

_PLAIN = dict(KIND=0, SYMMETRIC=False, HAS_BIAS=False, HAS_POS=False, HAS_CPOS=False, LABELS=False,
              EXCLUDE_SELF=False, EXCLUDE_TARGETS=False, TARGET_LSE=False, FN_SPACE=0, FN_IDS=False,
              SOFT_SIM=False, LSE2=False, TARGET_K=0, PLAIN=False, SELF_SYM=False)
CLOSURES = {
    "clip": dict(_PLAIN, SYMMETRIC=True, HAS_BIAS=True, PLAIN=True),
    "clip_masked": dict(_PLAIN, SYMMETRIC=True, HAS_BIAS=True),
    "info_nce": dict(_PLAIN, HAS_POS=True),
    "supcon": dict(_PLAIN, LABELS=True, EXCLUDE_SELF=True),
    # SupCon L_in, MV-InfoNCE with V > 2: the negatives' LSE and the targets' LSE apart
    "supcon_in": dict(_PLAIN, LABELS=True, EXCLUDE_SELF=True, EXCLUDE_TARGETS=True, TARGET_LSE=True),
    "dcl_sym": dict(_PLAIN, SYMMETRIC=True, EXCLUDE_TARGETS=True, PLAIN=True),
    "siglip": dict(_PLAIN, KIND=1, HAS_BIAS=True, PLAIN=True),
    "info_nce_fn": dict(_PLAIN, HAS_POS=True, FN_SPACE=1, FN_IDS=True),
    # false negatives by a guide's products, recomputed in the tiles (GISTEmbed)
    "info_nce_guide": dict(_PLAIN, HAS_POS=True, FN_SPACE=3),
    "distill": dict(_PLAIN, HAS_POS=True, SOFT_SIM=True),
    "hcl": dict(_PLAIN, HAS_POS=True, EXCLUDE_SELF=True, EXCLUDE_TARGETS=True, LSE2=True),
    # self-similarities: the forward's row LSE over j != i (NT-Xent, SupCon L_out, whose targets
    # are summed beside it; MV-InfoNCE, uniformity), and their backward as the symmetric sweep
    # with the rows' statistics on both sides: without targets, with index targets (NT-Xent), with
    # label targets (SupCon)
    "self_lse": dict(_PLAIN, EXCLUDE_SELF=True, PLAIN=True),
    "self_lse_sym": dict(_PLAIN, SYMMETRIC=True, SELF_SYM=True, EXCLUDE_SELF=True, PLAIN=True),
    "nt_xent_sym": dict(_PLAIN, SYMMETRIC=True, SELF_SYM=True, EXCLUDE_SELF=True, HAS_POS=True,
                        HAS_CPOS=True, PLAIN=True),
    "supcon_sym": dict(_PLAIN, SYMMETRIC=True, SELF_SYM=True, EXCLUDE_SELF=True, LABELS=True,
                       PLAIN=True),
    # the lean backward of one-way losses with index / label targets (compared in the tile)
    "info_nce_lean": dict(_PLAIN, HAS_POS=True, PLAIN=True),
    "supcon_lean": dict(_PLAIN, LABELS=True, PLAIN=True),
    # weighted index targets (soft_info_nce, K = 2 per row), compared in the backward's tiles
    "soft_k2": dict(_PLAIN, HAS_POS=True, TARGET_K=2, PLAIN=True),
    # each row's LSE over the other labels (pytorch-metric-learning's NT-Xent drop-in)
    "other_labels": dict(_PLAIN, LABELS=True, EXCLUDE_SELF=True, EXCLUDE_TARGETS=True),
    # NT-Xent with IEEE float32 products (its dS tiles with the transposed term, GRAM)
    "nt_xent_gram": dict(_PLAIN, HAS_POS=True, EXCLUDE_SELF=True),
}
_SELF_BWD = ("bwd_rows", "bwd_rows_in", "grad_tiles", "grad_tiles_in")
_LEAN_BWD = _SELF_BWD + ("bwd_cols", "bwd_cols_in")
_ONLY = {"self_lse": ("fwd", "fwd_plain", "fwd_resident"), "self_lse_sym": _SELF_BWD,
         "nt_xent_sym": _SELF_BWD, "supcon_sym": _SELF_BWD, "info_nce_lean": _LEAN_BWD,
         "supcon_lean": _LEAN_BWD, "soft_k2": _LEAN_BWD,
         "other_labels": ("fwd", "bwd_gram", "grad_tiles", "grad_tiles_gram"),
         "nt_xent_gram": ()}  # (its _lines kernel below)
KERNELS = {
    # the forward of closures with PLAIN: the band-and-edge launch (TILES=1, with the interior
    # launch's tile shape) and the interior launch (fwd_plain, TILES=2); else one launch (TILES=0)
    "fwd": (E._forward_kernel, "fwd", dict(COUNT=0)),
    "fwd_plain": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=2)),
    "fwd_resident": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=2)),
    "fwd_fixup": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=3)),
    # TMA: True (opt-in): the streamed D chunks through tensor descriptors (Triton with them only)
    "fwd_tma": (E._forward_kernel, "fwd", dict(COUNT=0)),
    "fwd_plain_tma": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=2)),
    "count": (E._forward_kernel, "fwd", dict(COUNT=2, PLAIN=False)),
    # float32 with IEEE products: the LSEs' rounding errors beside them (EngineStats.row_lse_lo)
    "fwd_lo": (E._forward_kernel, "fwd", dict(COUNT=0, LSE_LO=True, PRECISION="ieee")),
    "fwd_plain_lo": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=2, LSE_LO=True,
                                                          PRECISION="ieee")),
    "fwd_fixup_lo": (E._forward_kernel, "fwd_plain", dict(COUNT=0, TILES=3, LSE_LO=True,
                                                          PRECISION="ieee")),
    "bwd_rows": (E._backward_rows_kernel, "bwd", dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False)),
    "bwd_gram": (E._backward_rows_kernel, "bwd_gram",
                 dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=True, PLAIN=False)),
    "bwd_cols": (E._backward_cols_kernel, "bwd", dict(COMPUTE_SB=False)),
    # the interior tiles' launches of the split backward (lean closures, 16-bit, Hopper, D <= 256);
    # "bwd_rows" / "bwd_cols" are then its band launches
    "bwd_rows_in": (E._backward_rows_kernel, "bwd_rows_plain",
                    dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False, TILES=2)),
    "bwd_cols_in": (E._backward_cols_kernel, "bwd_cols_plain", dict(COMPUTE_SB=False, TILES=2)),
    # the fused backward beyond one feature block (D split across programs: not a default path)
    "bwd_rows_split": (E._backward_rows_kernel, "bwd", dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False)),
    "bwd_cols_split": (E._backward_cols_kernel, "bwd", dict(COMPUTE_SB=False)),
    # the column kernel with the scale sums (only dK needed)
    "bwd_cols_sb": (E._backward_cols_kernel, "bwd", dict(COMPUTE_SB=True)),
    # the wide-feature backward's dS tiles: for lean closures the band launch (TILES=1, with the
    # interior's rows per tile) and the launch over plain spans (grad_tiles_in, TILES=2)
    "grad_tiles": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True)),
    "grad_tiles_in": (E._grad_tiles_kernel, "dense_plain", dict(COMPUTE_SB=True, TILES=2)),
    # float32 with IEEE products: the lines' sums of dS (correct_line_totals), beside the
    # gradients or alone (the other side's kernel, when only one gradient is needed)
    "bwd_rows_lines": (E._backward_rows_kernel, "bwd", dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False,
                                                          LINE_SUMS=True, PRECISION="ieee")),
    "bwd_rows_only_lines": (E._backward_rows_kernel, "bwd",
                            dict(COMPUTE_DQ=False, COMPUTE_SB=False, GRAM=False, LINE_SUMS=True,
                                 PRECISION="ieee")),
    "bwd_cols_lines": (E._backward_cols_kernel, "bwd", dict(COMPUTE_SB=False, LINE_SUMS=True,
                                                          PRECISION="ieee")),
    "bwd_cols_only_lines": (E._backward_cols_kernel, "bwd",
                            dict(COMPUTE_SB=False, COMPUTE_DK=False, LINE_SUMS=True,
                                 PRECISION="ieee")),
    "grad_tiles_lines": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True, LINE_SUMS=True,
                                                          PRECISION="ieee")),
    # the self-similarities' dS tiles with the transposed term, on the masked path (GRAM: DCL,
    # HCL, SupCon L_in; with IEEE float32 products, NT-Xent and SupCon L_out)
    "grad_tiles_gram": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True, GRAM=True)),
    "grad_tiles_gram_lines": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True, GRAM=True, LINE_SUMS=True,
                                                               PRECISION="ieee")),
    "topk": (E._top_negatives_kernel, "fwd", dict(K=10, KP=16, BLOCK_M=64, num_stages=2)),
    # the sigmoid closure's step (E.step): the row kernel (its band and interior launches) and the
    # dS tiles (band and plain spans) also sum each row's loss
    "bwd_rows_loss": (E._backward_rows_kernel, "bwd", dict(COMPUTE_DQ=True, COMPUTE_SB=True,
                                                         GRAM=False, ROW_LOSS=True)),
    "bwd_rows_in_loss": (E._backward_rows_kernel, "bwd_rows_plain",
                         dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False, TILES=2, ROW_LOSS=True)),
    "grad_tiles_loss": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True, ROW_LOSS=True)),
    "grad_tiles_in_loss": (E._grad_tiles_kernel, "dense_plain", dict(COMPUTE_SB=True, TILES=2,
                                                                     ROW_LOSS=True)),
}


# What Triton's JIT specialises on a launch with contiguous, 16-byte aligned features whose sizes
# are multiples of 16 (the benchmark shapes): pointers and these integers divisible by 16, unit
# feature strides as constants, and the unit strides of the backward's per-row / per-column
# weights (the launcher makes them contiguous). Without these hints the compiler cannot vectorise
# the tile loads into asynchronous copies and does not pipeline the D loop.
_ALIGNED_INTS = ("N", "M", "D", "DT", "stride_qn", "stride_kn", "stride_tqn", "stride_tkn",
                 "stride_dqn", "stride_dkn", "stride_ds", "row_start", "col_start")
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_tqd", "stride_tkd", "stride_gr", "stride_grp",
                 "stride_gc", "stride_gcp", "stride_gl2")


def _compile(kernel_name, closure, dtype, D=512, cc=90, aligned=True):
    """The sm_``cc`` kernel of ``kernel_name`` for ``closure`` (a name in CLOSURES, or its flags)."""
    fn, pass_, extra = KERNELS[kernel_name]
    flags = CLOSURES[closure] if isinstance(closure, str) else closure
    saved = E.config_override
    if kernel_name == "fwd_resident":  # the query block kept loaded (D <= 256)
        E.config_override = dict(saved, **{"fwd_plain.RESIDENT": True})
    if kernel_name.endswith("_tma"):
        E.config_override = dict(saved, TMA=True)
    lean = flags["PLAIN"] and kernel_name != "bwd_gram"
    # the launcher's split backward (E._split_backward): band launch + interior launch
    split = (fn is E._backward_rows_kernel or fn is E._backward_cols_kernel) and (
        kernel_name != "bwd_gram" and lean and dtype != torch.float32 and cc >= 90 and D <= 256)
    try:
        band = split and "TILES" not in extra  # the band launch: masked path, not resident
        exact = extra.get("PRECISION") == "ieee" and dtype == torch.float32
        cfg = dict(E.config_for("cuda", dtype, D, pass_, cc, lean=lean and not band, exact=exact))
        if split:
            cfg_in = E.config_for("cuda", dtype, D, "bwd_rows_plain" if fn is E._backward_rows_kernel
                                  else "bwd_cols_plain", cc)
            if "TILES" not in extra:  # the band launch: the interior's D chunks and spans
                cfg = dict(E._band_config(cfg, cfg_in["BLOCK_M"], cfg_in["BLOCK_N"]),
                           BLOCK_DV=cfg_in["BLOCK_DV"])
    finally:
        E.config_override = saved
    cfg.update({k: v for k, v in extra.items() if k in cfg})  # the launcher's own block sizes
    consts = dict(flags, UPCAST=False, PRECISION="tf32" if dtype == torch.float32 else "ieee",
                  LINE_SUMS=False, COMPUTE_DK=True, LSE_LO=False, GRAM=False, ROW_LOSS=False)
    consts.update(extra)
    if fn is not E._forward_kernel:  # as the launchers: the series with the step's float32 loss
        consts["SP_SERIES"] = consts["ROW_LOSS"] and dtype == torch.float32
    # as the launcher: a symmetric closure's scale sums in two centred parts for float32 features
    if fn is E._backward_rows_kernel or fn is E._grad_tiles_kernel:
        consts.setdefault("COMPUTE_SBC", bool(consts["COMPUTE_SB"] and flags["SYMMETRIC"]
                                              and not flags["SELF_SYM"] and dtype == torch.float32))
    if fn is E._forward_kernel:  # as the launcher: the partials' tiling is the interior launch's
        consts.setdefault("TILES", 1 if consts["PLAIN"] else 0)
        consts.setdefault("SP_SERIES", dtype == torch.float32 and consts.get("KIND") == E.KIND_SIGMOID
                          and not consts.get("COUNT"))
        consts.setdefault("RESIDENT", False)
        consts["TILE_N"] = cfg["BLOCK_N"]
        if consts["TILES"] == 1:
            plain_cfg = E.config_for("cuda", dtype, D, "fwd_plain", cc, exact=exact)
            cfg = E._band_config(cfg, plain_cfg["BLOCK_M"], plain_cfg["BLOCK_N"], same_rows=True)
            consts["TILE_N"] = plain_cfg["BLOCK_N"]
    if fn is E._grad_tiles_kernel:  # as _backward_dense: split launches for lean closures
        consts.setdefault("TILES", 1 if lean else 0)
        span = E.config_for("cuda", dtype, D, "dense_plain", cc)
        consts["SPAN_M"], consts["SPAN_N"] = span["BLOCK_M"], span["BLOCK_N"]
        if consts["TILES"] == 1:
            cfg = E._band_config(cfg, span["BLOCK_M"], span["BLOCK_N"])
    elif fn is not E._forward_kernel:
        consts.setdefault("TILES", 1 if split else 0)
        consts["SPAN_M"], consts["SPAN_N"] = (cfg_in["BLOCK_M"], cfg_in["BLOCK_N"]) if split else (1, 1)
    consts.update({k: v for k, v in cfg.items() if k in fn.arg_names})
    if aligned:
        consts.update({k: 1 for k in _UNIT_STRIDES})
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    missing = [n for n in fn.arg_names if n.isupper() and n not in ("N", "M", "D", "DT") and n not in consts]
    if missing:
        raise ValueError(f"no value for the constexpr parameters {missing}")
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _FEATURE_PTRS or name in ("tq_ptr", "tk_ptr"):
            sig[name] = _PTR[dtype]
        elif name in _INDEX_PTRS:
            sig[name] = "*i64"
        elif name == "flag_ptr" or name in _ID_PTRS:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"  # the 64-bit path: strides as large as N * D allows
        else:
            sig[name] = "i32"
    if consts.get("TMA"):  # features as tensor descriptors of the launch's blocks
        elt = _PTR[dtype][1:]
        sig["q_ptr"] = f"tensordesc<{elt}[{cfg['BLOCK_M']}, {cfg['BLOCK_D']}]>"
        sig["k_ptr"] = f"tensordesc<{elt}[{cfg['BLOCK_N']}, {cfg['BLOCK_D']}]>"
    aligned_args = [name for name in fn.arg_names if aligned and name not in consts
                    and (sig[name].startswith("*") or name in _ALIGNED_INTS)]
    src = _source(fn, sig, consts, aligned_args)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


# Triton 3.0 (the oldest supported) keys signatures and constants by argument index and takes
# alignment hints as an AttrsDescriptor; later versions key by name, list constexprs in the
# signature and take hints as attributes. (3.1 and 3.2 are not handled here.)
_LEGACY_API = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 1)


def _source(fn, sig, consts, aligned_args=()):
    """The ASTSource of `fn` with argument types `sig` (name -> type, "constexpr" for `consts`),
    constexpr values `consts` and 16-divisibility hints on `aligned_args`, for this Triton."""
    index = {name: i for i, name in enumerate(fn.arg_names)}
    if _LEGACY_API:
        from triton.compiler.compiler import AttrsDescriptor
        return ASTSource(fn, {index[n]: t for n, t in sig.items() if n not in consts},
                         {index[n]: v for n, v in consts.items()},
                         AttrsDescriptor(divisible_by_16={index[n] for n in aligned_args}))
    return ASTSource(fn=fn, signature=sig, attrs={(index[n],): [["tt.divisibility", 16]] for n in aligned_args},
                     constexprs={(index[n],): v for n, v in consts.items()})


def _resource_usage(compiled):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            return dict(item.split(":", 1) for item in line.split() if ":" in item)
    return None


TMA_VARIANTS = E._TensorDescriptor is not None  # Triton with host-side tensor descriptors
# self-similarity closures (no column stats)
_GRAM_CLOSURES = ("supcon", "supcon_in", "info_nce", "hcl", "other_labels")
_LINE_CLOSURES = ("clip", "clip_masked", "info_nce", "info_nce_lean", "supcon", "supcon_lean", "soft_k2")
_GRAM_LINE_CLOSURES = ("nt_xent_gram", "supcon")  # (NT-Xent and SupCon L_out, IEEE float32)
VARIANTS = ([(k, c, "float32", 90) for k in KERNELS if k.endswith("_lines")
             for c in _LINE_CLOSURES + ("nt_xent_gram",)
             if (k != "bwd_cols_only_lines" or CLOSURES[c]["SYMMETRIC"])
             and (c in _GRAM_LINE_CLOSURES if k == "grad_tiles_gram_lines" else c in _LINE_CLOSURES)]
            + [(k, c, "float32", 90) for k in KERNELS if k.endswith("_lo") for c in _LINE_CLOSURES
               if (k == "fwd_lo" or CLOSURES[c]["PLAIN"]) and (k != "fwd_fixup_lo" or CLOSURES[c]["SYMMETRIC"])]
            + [(k, "siglip", d, 90) for d in ("bfloat16", "float32") for k in KERNELS
               if k.endswith("_loss") and (not k.startswith("bwd_rows_in") or d != "float32")]
            + [(k, c, d, 90) for d in ("bfloat16", "float16", "float32") for k in KERNELS for c in CLOSURES
             if not k.endswith(("_lines", "_lo", "_loss"))
             and (k not in ("bwd_gram", "grad_tiles_gram") or c in _GRAM_CLOSURES)
             and (k not in ("count", "topk") or c == "info_nce")
             and k in _ONLY.get(c, (k,))
             and (k not in ("fwd_plain", "fwd_resident", "fwd_fixup", "bwd_rows_in", "bwd_cols_in",
                            "grad_tiles_in") or CLOSURES[c]["PLAIN"])
             and (k != "fwd_fixup" or CLOSURES[c]["SYMMETRIC"])
             and (k not in ("bwd_rows_in", "bwd_cols_in", "fwd_resident") or d != "float32")
             and (not k.endswith(("_split", "_sb")) or c == "clip")
             and (not k.endswith("_tma") or (TMA_VARIANTS and c in ("clip", "info_nce", "supcon", "siglip")
                                             and (k == "fwd_tma" or c == "clip") and d != "float16"))]
            + [(k, "clip", "bfloat16", 80) for k in KERNELS
               if k not in ("bwd_gram", "grad_tiles_gram", "count", "topk")
               and not k.endswith(("_split", "_in", "_tma", "_sb", "_lines", "_lo", "_loss"))])


def variant_D(kernel):
    """The feature dim each kernel is compiled at: the fused backward and the resident forward
    where they are the default (D <= 256), the rest at 512."""
    return 256 if kernel in ("bwd_rows", "bwd_gram", "bwd_cols", "bwd_rows_in", "bwd_cols_in",
                             "bwd_cols_sb", "fwd_resident", "bwd_rows_loss", "bwd_rows_in_loss") else 128 if kernel.startswith("bwd_") and (
        kernel.endswith("_lines")) else 512


def variant_name(kernel, closure, dtype, cc):
    return f"{kernel}-{closure}-{dtype}-sm{cc}"


# ----------------------------------------------------------------------------------------------
# static cost model: issued instructions per tile from the SASS of the compiled kernels
# ----------------------------------------------------------------------------------------------


def _sass(compiled):
    """[(address, opcode)] of the kernel's SASS (cuobjdump shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    ins = []
    for line in out.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return ins


def _loops(ins):
    """(start, end) address ranges of the backward branches, widest first."""
    spans = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) <= addr:
            spans.append((int(target.group(1), 16), addr))
    return sorted(spans, key=lambda s: s[0] - s[1])


def _per_tile(compiled):
    """(instructions per thread per tile outside the D loop, per D chunk, opcode mix per tile)."""
    ins = _sass(compiled)
    spans = _loops(ins)
    outer = spans[0]
    inner = [s for s in spans[1:] if outer[0] <= s[0] and s[1] <= outer[1]]
    in_inner = lambda a: any(lo <= a <= hi for lo, hi in inner)  # noqa: E731
    body = [op for a, op, _ in ins if outer[0] <= a <= outer[1] and not in_inner(a)]
    chunk = sum(1 for a, _, _ in ins if in_inner(a))
    mix = collections.Counter(op.split(".")[0] if not op.startswith("MUFU") else op for op in body)
    return len(body), chunk, mix


def loop_local_accesses(compiled):
    """Local-memory instructions (spill loads / stores) inside the kernel's outermost loop: the
    column-tile sweep, or the D loop of a one-tile kernel. Spills outside it cost once per
    program; inside it, on every tile."""
    ins = _sass(compiled)
    spans = _loops(ins)
    if not spans:
        return 0
    lo, hi = spans[0]
    return sum(1 for a, op, _ in ins if lo <= a <= hi and op.startswith(("LDL", "STL")))


@triton.jit
def _always_tile(row0, col0, N, M, offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    return True


@triton.jit
def _always_close(r2, c2):
    return True


@triton.jit
def _never_underflow(flags):
    return False


def cost_report(path, D=256, loss="clip"):
    """Per-tile issue cost of the forward, fused backward and dS-tile kernels (bf16, sm_90, the closure of
    ``loss``: "clip" or "siglip") on the general (masked) path, or on the lean path of interior
    tiles ("plain": the branch
    predicates are pinned so that only that path is compiled; call in a fresh process, since
    Triton memoises a kernel's dependencies). issue_clk = instructions per thread x warps / 4
    schedulers; tensor_clk = the tile's MMA FLOPs / 4096 per clock (dense bf16 per SM). SigLIP
    also gets the step's row kernel and dS tiles (``bwd_rows_loss``, ``ds_tiles_loss``: the loss
    summed in the same tiles, E.step)."""
    if path == "plain":
        E._plain_tile, E._lses_close, E._any_underflow = _always_tile, _always_close, _never_underflow
    closure = CLOSURES[loss] if path == "plain" else dict(CLOSURES[loss], PLAIN=False)
    report = {}
    step = ("_loss",) if loss == "siglip" else ()
    for kernel in ("fwd", "bwd_rows", "bwd_cols") + tuple("bwd_rows" + x for x in step):
        base = kernel[:-len("_loss")] if kernel.endswith("_loss") else kernel
        # the lean path is the interior tiles' launches, with their own tile shapes (the backward
        # splits its launches for D <= 256)
        name, pass_ = {"fwd": ("fwd", "fwd"), "bwd_rows": ("bwd_rows", "bwd"),
                       "bwd_cols": ("bwd_cols", "bwd")}[base]
        if path == "plain":
            name, pass_ = {"fwd": ("fwd_plain", "fwd_plain"),
                           "bwd_rows": ("bwd_rows_in", "bwd_rows_plain") if D <= 256 else
                                       ("bwd_rows", "bwd"),
                           "bwd_cols": ("bwd_cols_in", "bwd_cols_plain") if D <= 256 else
                                       ("bwd_cols", "bwd")}[base]
        compiled = _compile(name + kernel[len(base):], closure, torch.bfloat16, D=D)
        body, chunk, mix = _per_tile(compiled)
        cfg = E.config_for("cuda", torch.bfloat16, D, pass_, lean=closure["PLAIN"])
        chunks = -(-D // cfg["BLOCK_D"])
        flops = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * D
        if base != "fwd":
            flops += 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * min(D, cfg["BLOCK_DV"])
        issue = (body + chunks * chunk) * cfg["num_warps"] / 4
        report[kernel] = dict(body=body, entries=cfg["BLOCK_M"] * cfg["BLOCK_N"],
                              per_entry=body / (cfg["BLOCK_M"] * cfg["BLOCK_N"]),
                              per_chunk=chunk, chunks=chunks, issue_clk=issue,
                              tensor_clk=flops / 4096, ratio=issue / (flops / 4096),
                              mufu_ex2=mix["MUFU.EX2"], shfl=mix["SHFL"], bar=mix["BAR"],
                              tile=f'{cfg["BLOCK_M"]}x{cfg["BLOCK_N"]}x{cfg["BLOCK_D"]}')
    # the wide-feature backward's dS tiles: one tile per program, so everything outside the D
    # loop (statistics and weights, the epilogue, the store) is paid per tile
    name, pass_ = ("grad_tiles_in", "dense_plain") if path == "plain" else ("grad_tiles", "fwd")
    for suffix in ("",) + step:
        compiled = _compile(name + suffix, closure, torch.bfloat16, D=D)
        ins = _sass(compiled)
        lo, hi = _loops(ins)[0]
        loop = sum(1 for a, _, _ in ins if lo <= a <= hi)
        cfg = E.config_for("cuda", torch.bfloat16, D, pass_, lean=closure["PLAIN"])
        chunks = -(-D // cfg["BLOCK_D"])
        issue = (len(ins) - loop + chunks * loop) * cfg["num_warps"] / 4
        tensor = 2 * cfg["BLOCK_M"] * cfg["BLOCK_N"] * D / 4096
        report["ds_tiles" + suffix] = dict(outside=len(ins) - loop, per_chunk=loop, chunks=chunks,
                                           issue_clk=issue, tensor_clk=tensor, ratio=issue / tensor,
                                           tile=f'{cfg["BLOCK_M"]}x{cfg["BLOCK_N"]}x{cfg["BLOCK_D"]}')
    return report


def main():
    if "--cost" in sys.argv:  # python -m tests.triton_aot --cost general|plain [D [clip|siglip]]
        args = sys.argv[sys.argv.index("--cost") + 1:]
        json.dump(cost_report(args[0], D=int(args[1]) if len(args) > 1 else 256,
                              loss=args[2] if len(args) > 2 else "clip"), sys.stdout)
        return
    report = {}
    # the column-partials merge of the symmetric forward (merge_lo: with the LSEs' lo parts)
    for name, cc, lo in (("merge", 90, False), ("merge", 80, False), ("merge_lo", 90, True)):
        fn = E._merge_column_partials_kernel
        sig = dict(part_ptr="*fp32", ref_ptr="*fp32", out_ptr="*fp32", lo_ptr="*fp32",
                   out_lo_ptr="*fp32", n_blocks="i32", M="i32", n_col_tiles="i32",
                   TILE_N="constexpr", BLOCK="constexpr", LSE_LO="constexpr")
        try:
            src = _source(fn, sig, dict(TILE_N=64, BLOCK=E._MERGE_BLOCK, LSE_LO=lo))
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4))
            report[f"{name}-sm{cc}"] = {"ok": bool(compiled.asm["cubin"]), "error": "",
                                        "usage": _resource_usage(compiled)}
        except Exception as exc:
            report[f"{name}-sm{cc}"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                        "usage": None}
    for kernel, closure, dtype, cc in VARIANTS:
        name = variant_name(kernel, closure, dtype, cc)
        try:
            compiled = _compile(kernel, closure, getattr(torch, dtype), cc=cc, D=variant_D(kernel))
            usage = _resource_usage(compiled)
            # (no stack frame, no spills: the loop needs no disassembly)
            loop_local = None if usage is None else (
                loop_local_accesses(compiled) if int(usage.get("STACK", 0)) else 0)
            report[name] = {"ok": bool(compiled.asm["cubin"]), "error": "", "usage": usage,
                            "shared": compiled.metadata.shared, "loop_local": loop_local}
        except Exception as exc:  # reported, and failed, by the test
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "usage": None,
                            "shared": None, "loop_local": None}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
