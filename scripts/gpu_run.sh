#!/usr/bin/env bash
# One-call GPU run: build + install fastcl, the GPU checks, the headline benchmark sweep, the rest
# of the test suite, the issue's other targets and a compute-sanitizer memcheck of the CUDA
# extension, in that order, within one time budget; everything lands under $OUT.
#
#   OUT=/path/to/results bash scripts/gpu_run.sh
#
# Files under $OUT (at most 8 come back, so the logs share one file):
#   gpu_run.log          environment, build, tests, bench and sanitizer output, phase summary
#   junit_gpu.xml        the GPU checks (tests/test_gpu.py, the CUDA extension's tests)
#   junit.xml            the rest of the test suite (tests not started by the deadline: skipped)
#   bench/bench.csv      the sweep (provenance in '# ' lines), bench/bench.json, bench/*.png
#   targets.md           each of the issue's targets: measured, needed, verdict (python -m bench.targets)
#   extras.tar.gz        only when more than 8 files were produced: everything beyond the first 7
#
# Default phases, in order (PHASES="..." picks a subset; each phase is time-limited, its failure
# is logged, and the script always goes on and exits 0):
#   install   pip install -e . (the CUDA extension for this GPU's architecture); wheels found in
#             .whl/ (e.g. Inf-CL's, which is pure Python) are installed first into a folder
#             put on PYTHONPATH: `pip download --no-deps -d .whl inf-cl==1.2.1` beforehand
#   gputests  tests/test_gpu.py and the CUDA extension's tests (memory bounds, no host sync in
#             any loss, 64-bit offsets, larger shapes in low precision), under a deadline too
#   bench     the headline sweep: symmetric CLIP, bf16, N = 32768, D in {256, 512, 768, 1024},
#             fwd / bwd / fwd+bwd, every provider, and fastcl-triton@dense (the wide-feature
#             backward at every D); BENCH_ARGS replaces these arguments
#   tests     the rest of the suite on the GPU, most GPU-relevant files first, on pytest-xdist
#             workers when it is installed; tests not started by the phase's deadline are
#             skipped (FASTCL_TEST_DEADLINE) so the junit report is always written
#   huge      symmetric CLIP fwd+bwd at N = 2^20, D = 512 (time and peak memory)
#   targets   SigLIP bf16, CLIP fp32 (TF32) and guided InfoNCE (gist) bf16 at N = 32768, D = 512
#             against their peers
#   memcheck  compute-sanitizer over a tiny fastcl-cuda run
# Other phases (a second call on a warm machine): "variants", "variants_general",
# "variants_siglip", "variants_targets", "variants_self" (below), e.g. PHASES="install variants",
# and "self": NT-Xent, DCL and SupCon against naive and torch.compile (self/bench.csv).
# Environment knobs: PYTHON, CUDA_HOME, MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: this GPU's),
# GPU_RUN_BUDGET_S (total seconds, default 570), TESTS_MAX_S (default 150), TEST_WORKERS
# (pytest-xdist workers, default 8), BENCH_ARGS, SKIP_TESTS=1, SKIP_SANITIZER=1.
# Phase "variants" times fastcl-triton's engine configurations against
# each other at the headline shape (variants/bench.csv): interior-tile launch shapes and its
# resident query block, D chunks through tensor descriptors (TMA), its column sums by reductions
# instead of the tensor cores, the lean path off, the backward's split launches, resident feature
# blocks and D step, and the fused / wide-feature backward at each D (the latter's dS tiles in
# one launch, or 128 x 64 interior tiles); a configuration whose launch plan at a shape is one
# already timed there is reported as the same, not timed again (bench/launch_plan.py). Phase
# "variants_general" times the masked path's tile shape, D step and tensor descriptors on the
# SupCon forward with the lean path off (variants_general/bench.csv); phases "variants_siglip"
# and "variants_targets" time SigLIP's and SupCon's forward and backward on the lean path (the
# default; SupCon's targets summed beside the forward sweep and compared in the backward's
# tiles) against the masked path everywhere (variants_siglip/, variants_targets/bench.csv), and
# SigLIP's fwd+bwd with its step (the loss from the backward's sweep, the default) against the
# forward and backward sweeps (two_sweeps: STEP false). Phase
# "variants_self" times the self-similarities' wide-feature backward (SupCon L_out and L_in,
# D = 768) with the dS block alone (DENSE_ROWS false: dK's slab sums; L_in both GEMMs) against
# the default, dS + dS^T in the block and one GEMM into the rows' float32 sums
# (variants_self/bench.csv).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 0
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT/bench"
LOG="$OUT/gpu_run.log"
: >"$LOG"

T0=$(date +%s)
BUDGET="${GPU_RUN_BUDGET_S:-570}"
DEADLINE=$((T0 + BUDGET))
SUMMARY=""

PY="${PYTHON:-$(command -v python || command -v python3)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the source tree imports even if pip fails

log() { echo "$*" | tee -a "$LOG"; }
left() { echo $((DEADLINE - $(date +%s))); }

# phase NAME LIMIT_S CMD...: run CMD with a time limit, output into the log, record rc and time
phase() {
  local name="$1" limit="$2"; shift 2
  if [ "$limit" -lt 10 ]; then
    log "=== [$name] skipped: ${limit}s left in the budget"
    SUMMARY+="$name: skipped (budget)"$'\n'
    return 124
  fi
  local t=$(date +%s)
  log "=== [$name] $(date -u +%FT%TZ) limit ${limit}s: $*"
  timeout -k 20 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t ))
  local what="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="rc=$rc (time limit)"
  log "=== [$name] $what in ${dt}s"
  SUMMARY+="$name: $what, ${dt}s"$'\n'
  return $rc
}

PHASES=" ${PHASES:-install gputests bench tests huge targets memcheck} "
want() { case "$PHASES" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

# wheels carried in .whl/ (packages the GPU image lacks, e.g. Inf-CL): into a folder on PYTHONPATH
if want install && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  SITE=/tmp/fastcl-site
  if phase wheels "$(min 120 "$(left)")" "$PY" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
fi

# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
{
  echo "=== environment $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>&1
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  "$PY" -c "import inf_cl; print('inf_cl importable')" 2>&1 | tail -n 1
} >>"$LOG" 2>&1

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}.{c[1]}')" 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST="${ARCH:-8.0;9.0}"
fi
log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME budget=${BUDGET}s"

# ---------------------------------------------------------------------------------------------
# build + install
# ---------------------------------------------------------------------------------------------
PIP_FLAGS=(--no-build-isolation --no-deps --no-index -e .)
if ! want install; then
  log "=== [install] not requested (PHASES=$PHASES); using the source tree as is"
elif ! phase install "$(min 300 "$(left)")" "$PY" -m pip install "${PIP_FLAGS[@]}"; then
  # retried only where pip itself refused (a system Python); a failed build is not rebuilt (the
  # source tree on PYTHONPATH still serves the Triton backend)
  if grep -q "externally-managed-environment" "$LOG"; then
    phase install-system "$(min 300 "$(left)")" "$PY" -m pip install --break-system-packages "${PIP_FLAGS[@]}"
  elif ! grep -q "ninja: build stopped\|error: command .* failed\|Error compiling objects" "$LOG"; then
    phase build-inplace "$(min 300 "$(left)")" "$PY" setup.py build_ext --inplace
  fi
fi
EXT=0
if "$PY" -c "import fastcl._C" >>"$LOG" 2>&1; then
  EXT=1
  log "fastcl._C: built ($("$PY" -c "import fastcl._C as m; print(m.__file__)" 2>/dev/null))"
else
  log "fastcl._C: not built (fastcl-cuda is skipped by the bench)"
fi

# ---------------------------------------------------------------------------------------------
# the GPU checks
# ---------------------------------------------------------------------------------------------
# pytest_phase NAME LIMIT_S ARGS...: pytest on pytest-xdist workers when installed (most of a
# first run's time is compiling kernels: CPU work), no test started after the deadline
# (FASTCL_TEST_DEADLINE), so pytest ends on its own within the limit and writes its report
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-8}" --dist loadgroup)
pytest_phase() {
  local name="$1" limit="$2"; shift 2
  FASTCL_TEST_DEADLINE=$(( $(date +%s) + limit - 30 )) phase "$name" "$limit" "$PY" -m pytest \
    "$@" ${XDIST[@]+"${XDIST[@]}"} -q -ra -p no:cacheprovider
}

if [ "${SKIP_TESTS:-0}" != "1" ] && want gputests; then
  pytest_phase gputests "$(min 120 $(( $(left) - 300 )))" tests/test_gpu.py tests/test_cpp_ops.py \
    -m gpu --junitxml="$OUT/junit_gpu.xml"
fi

# ---------------------------------------------------------------------------------------------
# the headline sweep
# ---------------------------------------------------------------------------------------------
# time kept for the phases after it: some of the rest of the tests and N = 2^20 (the other
# targets and memcheck take what is left; when GPU time is short, a second call runs them)
RESERVE=20
want tests && [ "${SKIP_TESTS:-0}" != "1" ] && RESERVE=$((RESERVE + 50))
want huge && RESERVE=$((RESERVE + 60))
BENCH_LIMIT=$(min 300 $(( $(left) - RESERVE )))
# stop starting new shapes early enough to finish the current one and write the plots
BENCH_BUDGET=$(( BENCH_LIMIT > 120 ? BENCH_LIMIT - 75 : BENCH_LIMIT / 2 ))
# beside the defaults, the wide-feature backward at every D (the default beyond D = 256): at
# D = 256 it does 8 N^2 D FLOPs + dS traffic against the fused kernels' 10 N^2 D
BENCH_DEFAULT=(--N 32768 --D 256 512 768 1024 --triton-config 'dense={"DENSE": true}')
if [ -n "${BENCH_ARGS:-}" ]; then
  # shellcheck disable=SC2206
  BENCH_DEFAULT=($BENCH_ARGS)
fi
want bench && phase bench "$BENCH_LIMIT" "$PY" -m bench --out "$OUT/bench" --budget-s "$BENCH_BUDGET" \
  "${BENCH_DEFAULT[@]}"

# ---------------------------------------------------------------------------------------------
# the rest of the tests, on the GPU
# ---------------------------------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" != "1" ] && want tests; then
  LATER=0
  want huge && LATER=$((LATER + 60))
  TLIMIT=$(min "${TESTS_MAX_S:-150}" $(( $(left) - LATER - 20 )))
  # the Triton kernels' numerics first (every closure compiled and run natively), then the C++
  # extension and the API; the AOT compile checks (tests/test_triton_compile.py) and the launch
  # plans on fake CUDA tensors (tests/test_gpu_plan.py) need no GPU
  FIRST=(tests/test_triton.py tests/test_plain_tiles.py tests/test_family.py tests/test_cpp_ops.py)
  REST=()
  for f in tests/test_*.py; do
    case " ${FIRST[*]} tests/test_gpu.py tests/test_triton_compile.py tests/test_gpu_plan.py " in
      *" $f "*) ;;
      *) REST+=("$f") ;;
    esac
  done
  pytest_phase tests "$TLIMIT" "${FIRST[@]}" ${REST[@]+"${REST[@]}"} -m "not gpu" --junitxml="$OUT/junit.xml"
fi

# ---------------------------------------------------------------------------------------------
# the issue's other targets: N = 2^20, SigLIP, fp32 inputs
# ---------------------------------------------------------------------------------------------
if want huge; then
  HLIMIT=$(min 120 $(( $(left) - 20 )))
  phase huge "$HLIMIT" "$PY" -m bench --out "$OUT/huge" --provider fastcl-triton --loss clip \
    --N 1048576 --D 512 --dtype bf16 --mode fwdbwd --repeats 3 --warmup 1 --no-plots
fi
if want targets; then
  # SigLIP bf16 against torch.compile; CLIP with float32 inputs (TF32) against naive float32;
  # InfoNCE with guided false negatives (GISTEmbed: the guide's products in the tiles) in bf16
  for what in "siglip bf16" "clip fp32" "gist bf16"; do
    set -- $what
    XLIMIT=$(min 90 $(( $(left) - 20 )))
    phase "targets_$1_$2" "$XLIMIT" "$PY" -m bench --out "$OUT/targets_$1_$2" \
      --provider naive compiled fastcl-triton --loss "$1" --dtype "$2" --N 32768 --D 512 \
      --mode fwdbwd --no-plots
  done
fi

# ---------------------------------------------------------------------------------------------
# engine configurations against each other (same run, same inputs)
# ---------------------------------------------------------------------------------------------
VARIANTS=(
  --triton-config 'general={"PLAIN": false}'
  --triton-config 'fwd_stream={"fwd_plain.RESIDENT": false}'
  --triton-config 'fwd_w4={"fwd_plain.num_warps": 4}'
  --triton-config 'fwd_256x128={"fwd_plain.BLOCK_M": 256, "fwd_plain.RESIDENT": false}'
  --triton-config 'fwd_d128={"fwd_plain.BLOCK_D": 128, "fwd_plain.num_stages": 2}'
  --triton-config 'fwd_128x64={"fwd_plain.BLOCK_N": 64}'
  --triton-config 'fwd_tma={"TMA": true}'
  --triton-config 'colsum_sum={"fwd_plain.COLSUM_MMA": false}'
  --triton-config 'bwd_unsplit={"SPLIT": false}'
  --triton-config 'bwd_rows_64={"bwd_rows_plain.BLOCK_N": 64}'
  --triton-config 'bwd_stream={"SPLIT": false, "bwd.RESIDENT": false}'
  --triton-config 'bwd_d32={"SPLIT": false, "bwd.BLOCK_D": 32}'
  --triton-config 'dense={"DENSE": true}'
  --triton-config 'dense_unsplit={"DENSE": true, "SPLIT": false}'
  --triton-config 'dense_128x64={"DENSE": true, "dense_plain.BLOCK_N": 64}'
  --triton-config 'fused={"DENSE": false}'
)
# the general (masked) path's tile and D step: it is the whole forward of the closures with masks
# off the band (SupCon L_in, HCL, false-negative masking, distillation), where CLIP, SigLIP and
# SupCon L_out only send their band tiles through it; SupCon with the lean path off stands in
GENERAL_VARIANTS=(
  --triton-config 'masked={"PLAIN": false}'
  --triton-config 'gen_d128={"PLAIN": false, "fwd.BLOCK_D": 128}'
  --triton-config 'gen_n128={"PLAIN": false, "fwd.BLOCK_N": 128}'
  --triton-config 'gen_n128_d128={"PLAIN": false, "fwd.BLOCK_N": 128, "fwd.BLOCK_D": 128, "fwd.num_stages": 2}'
  --triton-config 'gen_tma={"PLAIN": false, "fwd.TMA": true}'
  --triton-config 'gen_tma_d128={"PLAIN": false, "fwd.TMA": true, "fwd.BLOCK_D": 128}'
)
if want variants_general; then
  GLIMIT=$(min 300 $(( $(left) - 20 )))
  phase variants_general "$GLIMIT" "$PY" -m bench --out "$OUT/variants_general" --provider fastcl-triton \
    --loss supcon --N 32768 --D 128 512 --dtype bf16 --mode fwd --no-plots \
    --budget-s $(( GLIMIT > 90 ? GLIMIT - 60 : GLIMIT / 2 )) "${GENERAL_VARIANTS[@]}"
fi
if want variants_siglip; then
  SLIMIT=$(min 240 $(( $(left) - 20 )))
  phase variants_siglip "$SLIMIT" "$PY" -m bench --out "$OUT/variants_siglip" --provider fastcl-triton \
    --loss siglip --N 32768 --D 256 768 --dtype bf16 --mode fwd fwdbwd --no-plots \
    --budget-s $(( SLIMIT > 90 ? SLIMIT - 60 : SLIMIT / 2 )) \
    --triton-config 'masked={"PLAIN": false}' --triton-config 'fwd_tma={"TMA": true}' \
    --triton-config 'two_sweeps={"STEP": false}'
fi
if want variants_targets; then
  TLIMIT=$(min 240 $(( $(left) - 20 )))
  phase variants_targets "$TLIMIT" "$PY" -m bench --out "$OUT/variants_targets" --provider fastcl-triton \
    --loss supcon --N 32768 --D 256 768 --dtype bf16 --mode fwd bwd --no-plots \
    --budget-s $(( TLIMIT > 90 ? TLIMIT - 60 : TLIMIT / 2 )) \
    --triton-config 'masked={"PLAIN": false}'
fi
if want self; then
  # the self-similarities against their peers: NT-Xent and DCL (16384 pairs: 32768 rows) and
  # SupCon (32768 rows), bf16, fwd+bwd
  SLIMIT=$(min 240 $(( $(left) - 20 )))
  phase self "$SLIMIT" "$PY" -m bench --out "$OUT/self" --provider naive compiled fastcl-triton \
    --loss nt_xent dcl supcon --N 16384 32768 --D 512 --dtype bf16 --mode fwdbwd --no-plots \
    --budget-s $(( SLIMIT > 90 ? SLIMIT - 60 : SLIMIT / 2 ))
fi
if want variants_self; then
  ELIMIT=$(min 240 $(( $(left) - 20 )))
  phase variants_self "$ELIMIT" "$PY" -m bench --out "$OUT/variants_self" --provider fastcl-triton \
    --loss supcon supcon_in --N 32768 --D 768 --dtype bf16 --mode bwd --no-plots \
    --budget-s $(( ELIMIT > 90 ? ELIMIT - 60 : ELIMIT / 2 )) \
    --triton-config 'dense_cols={"DENSE_ROWS": false}'
fi
if want variants; then
  VLIMIT=$(min 420 $(( $(left) - 20 )))
  # shellcheck disable=SC2086
  phase variants "$VLIMIT" "$PY" -m bench --out "$OUT/variants" --provider fastcl-triton \
    --loss clip --N 32768 --D 256 512 1024 --dtype bf16 --mode fwd bwd --no-plots \
    --budget-s $(( VLIMIT > 90 ? VLIMIT - 60 : VLIMIT / 2 )) "${VARIANTS[@]}" ${VARIANT_ARGS:-}
fi

# ---------------------------------------------------------------------------------------------
# compute-sanitizer memcheck of the CUDA extension on a tiny run
# ---------------------------------------------------------------------------------------------
SAN="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
if [ "$EXT" = 1 ] && [ "${SKIP_SANITIZER:-0}" != "1" ] && want memcheck && [ -x "$SAN" ]; then
  phase memcheck "$(min 150 $(( $(left) - 15 )))" "$SAN" --tool memcheck --error-exitcode 99 \
    "$PY" -m bench --quick --device cuda --provider fastcl-cuda --loss clip info_nce siglip \
    --mode fwdbwd --N 256 --D 64 --dtype bf16 fp32 --repeats 1 --warmup 0 --no-save
else
  log "=== [memcheck] not run (extension built: $EXT, compute-sanitizer: $SAN)"
fi

# ---------------------------------------------------------------------------------------------
# summary + packaging (at most 8 files come back, at most 2 folders deep)
# ---------------------------------------------------------------------------------------------
log "=== summary (total $(( $(date +%s) - T0 ))s)"
printf "%s" "$SUMMARY" | tee -a "$LOG"
for csv in "$OUT"/bench/bench.csv "$OUT"/huge/bench.csv "$OUT"/targets_*/bench.csv "$OUT"/variants*/bench.csv; do
  [ -f "$csv" ] && grep -v '^#' "$csv" | cut -d, -f1-13 | tee -a "$LOG"
done

# the issue's targets: measured value, threshold and verdict per target, and the headline table
"$PY" -m bench.targets "$OUT" --out "$OUT/targets.md" >>"$LOG" 2>&1 || log "bench.targets failed"

mapfile -t FILES < <(cd "$OUT" && find . -type f ! -name extras.tar.gz | sed 's|^\./||' | sort)
DEEP=0
for f in "${FILES[@]}"; do
  slashes="${f//[^\/]/}"
  [ "${#slashes}" -gt 2 ] && DEEP=1
done
if [ "${#FILES[@]}" -gt 8 ] || [ "$DEEP" = 1 ]; then
  KEEP=()
  for f in gpu_run.log targets.md bench/bench.csv bench/bench.json junit.xml variants/bench.csv; do
    [ -f "$OUT/$f" ] && KEEP+=("$f")
  done
  # then the plots, then the rest in name order; files more than 2 folders deep go in the archive
  for f in $(printf "%s\n" "${FILES[@]}" | grep '\.png$') $(printf "%s\n" "${FILES[@]}" | grep -v '\.png$'); do
    [ "${#KEEP[@]}" -ge 7 ] && break
    slashes="${f//[^\/]/}"
    [ "${#slashes}" -gt 2 ] && continue
    case " ${KEEP[*]} " in *" $f "*) ;; *) KEEP+=("$f") ;; esac
  done
  REST=()
  for f in "${FILES[@]}"; do
    case " ${KEEP[*]} " in *" $f "*) ;; *) REST+=("$f") ;; esac
  done
  echo "packing ${#REST[@]} files into extras.tar.gz: ${REST[*]}" >>"$LOG"
  if (cd "$OUT" && tar czf extras.tar.gz "${REST[@]}"); then
    (cd "$OUT" && rm -f "${REST[@]}")
    find "$OUT" -mindepth 1 -type d -empty -delete 2>/dev/null
  fi
fi
exit 0
