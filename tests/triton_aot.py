"""Compile the Triton kernels of the engine for GPU targets without a GPU (run as a module in a
process where TRITON_INTERPRET is unset): ``python -m tests.triton_aot`` prints a JSON report
{variant: {"ok", "error", "usage"}} used by tests/test_triton_compile.py."""
import json
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastcl.ops.triton import engine as E

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_FEATURE_PTRS = ("q_ptr", "k_ptr", "dq_ptr", "dk_ptr")
_INDEX_PTRS = ("pos_ptr", "cpos_ptr", "rlab_ptr", "clab_ptr", "rid_ptr", "cid_ptr", "idx_ptr")

_PLAIN = dict(KIND=0, SYMMETRIC=False, HAS_BIAS=False, HAS_POS=False, HAS_CPOS=False, LABELS=False,
              EXCLUDE_SELF=False, EXCLUDE_TARGETS=False, TARGET_LSE=False, FN_SPACE=0, FN_IDS=False,
              SOFT_SIM=False, LSE2=False)
CLOSURES = {
    "clip": dict(_PLAIN, SYMMETRIC=True, HAS_BIAS=True),
    "info_nce": dict(_PLAIN, HAS_POS=True),
    "supcon": dict(_PLAIN, LABELS=True, EXCLUDE_SELF=True),
    "supcon_in": dict(_PLAIN, LABELS=True, EXCLUDE_SELF=True, TARGET_LSE=True),
    "dcl_sym": dict(_PLAIN, SYMMETRIC=True, EXCLUDE_TARGETS=True),
    "siglip": dict(_PLAIN, KIND=1, HAS_BIAS=True),
    "info_nce_fn": dict(_PLAIN, HAS_POS=True, FN_SPACE=1, FN_IDS=True),
    "distill": dict(_PLAIN, HAS_POS=True, SOFT_SIM=True),
    "hcl": dict(_PLAIN, HAS_POS=True, EXCLUDE_SELF=True, EXCLUDE_TARGETS=True, LSE2=True),
}
KERNELS = {
    "fwd": (E._forward_kernel, "fwd", dict(COUNT=False)),
    "count": (E._forward_kernel, "fwd", dict(COUNT=True)),
    "bwd_rows": (E._backward_rows_kernel, "bwd", dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=False)),
    "bwd_gram": (E._backward_rows_kernel, "bwd_gram", dict(COMPUTE_DQ=True, COMPUTE_SB=True, GRAM=True)),
    "bwd_cols": (E._backward_cols_kernel, "bwd", dict(COMPUTE_SB=False)),
    "grad_tiles": (E._grad_tiles_kernel, "fwd", dict(COMPUTE_SB=True)),
    "topk": (E._top_negatives_kernel, "fwd", dict(K=10, KP=16, BLOCK_M=64, num_stages=2)),
}


def _compile(kernel_name, closure, dtype, D=512, cc=90):
    fn, pass_, extra = KERNELS[kernel_name]
    cfg = dict(E.config_for("cuda", dtype, D, pass_))
    cfg.update({k: v for k, v in extra.items() if k in cfg})  # the launcher's own block sizes
    consts = dict(CLOSURES[closure], **extra, UPCAST=False,
                  PRECISION="tf32" if dtype == torch.float32 else "ieee")
    consts.update({k: v for k, v in cfg.items() if k in fn.arg_names})
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
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride"):
            sig[name] = "i64"  # the 64-bit path: strides as large as N * D allows
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


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


_GRAM_CLOSURES = ("supcon", "supcon_in", "info_nce", "hcl")  # self-similarity closures (no column stats)
VARIANTS = ([(k, c, d, 90) for d in ("bfloat16", "float16", "float32") for k in KERNELS for c in CLOSURES
             if (k != "bwd_gram" or c in _GRAM_CLOSURES) and (k not in ("count", "topk") or c == "info_nce")]
            + [(k, "clip", "bfloat16", 80) for k in KERNELS if k not in ("bwd_gram", "count", "topk")])


def variant_name(kernel, closure, dtype, cc):
    return f"{kernel}-{closure}-{dtype}-sm{cc}"


def main():
    report = {}
    for kernel, closure, dtype, cc in VARIANTS:
        name = variant_name(kernel, closure, dtype, cc)
        try:
            compiled = _compile(kernel, closure, getattr(torch, dtype), cc=cc)
            report[name] = {"ok": bool(compiled.asm["cubin"]), "error": "",
                            "usage": _resource_usage(compiled)}
        except Exception as exc:  # reported, and failed, by the test
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "usage": None}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
