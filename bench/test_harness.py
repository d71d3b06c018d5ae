"""Tests of the benchmark harness itself (CPU, a few seconds): timing, metrics, files, CLI,
OOM and failure handling, provider wiring against the float64 reference."""
import builtins
import json
import math
import os

import pytest
import torch

from bench import cli, providers as P, report, timing
from fastcl import reference

CPU = torch.device("cpu")


def _args(tmp_path, *extra):
    return cli.parse_args(["--device", "cpu", "--N", "48", "--D", "16", "--repeats", "3",
                           "--warmup", "1", "--out", str(tmp_path), *extra])


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_flop_formula():
    N, M, D = 3000, 5000, 70
    assert timing.flops("fwd", N, M, D) == 2 * N * M * D
    assert timing.flops("bwd", N, M, D) == 6 * N * M * D
    assert timing.flops("fwdbwd", N, M, D) == 8 * N * M * D
    # 8 * 1e9 FLOPs in 4 ms = 2 TFLOP/s
    assert timing.tflops("fwdbwd", 1000, 1000, 1000, 4.0) == pytest.approx(2.0)
    assert timing.tflops("fwd", 8192, 8192, 512, 1.0) == pytest.approx(2 * 8192 * 8192 * 512 / 1e9)
    with pytest.raises(ValueError, match="mode"):
        timing.flops("train", 1, 1, 1)
    with pytest.raises(ValueError, match="ms"):
        timing.tflops("fwd", 1, 1, 1, 0.0)
    assert "8*N*M*D" in timing.FLOP_CONVENTION
    # the two-view self-similarities count their 2N x 2N matrix of N pairs
    assert P.similarity_shape("nt_xent", 64, 64) == (128, 128)
    assert P.similarity_shape("dcl", 64, 64) == (128, 128)
    assert P.similarity_shape("clip", 64, 64) == (64, 64)


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(1)
    xs = (torch.rand(37, generator=g) * 10 + 0.5).tolist()
    for q in (0, 20, 50, 80, 100):
        assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_copies_exceed_cache():
    for nbytes in (1, 10_000, 3 * 2**20, 49 * 2**20, 2**30):
        n = timing.copies_for(nbytes, timing.H100_L2_BYTES)
        assert 2 <= n <= 32
        assert n * nbytes > timing.H100_L2_BYTES or n == 32


def test_ratios():
    def row(p, ms, status="ok"):
        r = {c: None for c in report.COLUMNS}
        r.update(loss="clip", provider=p, mode="fwd", N=8, M=8, D=4, dtype="float32", status=status, ms=ms)
        return r
    rows = [row("naive", 10.0), row("compiled", 4.0), row("fastcl-torch", 2.0), row("x", None, "OOM")]
    other = row("fastcl-torch", 5.0)
    other["D"] = 8  # another case: no baseline
    rows.append(other)
    report.add_ratios(rows)
    assert rows[2]["x_vs_naive"] == pytest.approx(5.0)
    assert rows[2]["x_vs_compiled"] == pytest.approx(2.0)
    assert rows[0]["x_vs_naive"] == pytest.approx(1.0)
    assert rows[3]["x_vs_naive"] is None and rows[4]["x_vs_naive"] is None


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


class Counting:
    """A loss that counts its forward calls and records whether autograd was on."""

    def __init__(self):
        self.calls, self.grad_modes = 0, []

    def __call__(self, x):
        self.calls += 1
        self.grad_modes.append(torch.is_grad_enabled())
        return reference.clip_loss(x["queries"], x["keys"], 10.0)


@pytest.mark.parametrize("mode", timing.MODES)
def test_time_step_positive_and_ordered(mode):
    g = torch.Generator().manual_seed(0)
    sets = [P.make_inputs("clip", 64, 64, 16, torch.float32, CPU, g) for _ in range(3)]
    fn = Counting()
    t = timing.time_step(fn, sets, mode, CPU, warmup=2, repeats=7)
    assert t.repeats == 7 and len(t.times_ms) == 7
    assert all(x > 0 for x in t.times_ms)
    assert 0 < t.p20 <= t.ms <= t.p80
    assert t.ms == pytest.approx(sorted(t.times_ms)[3])
    assert fn.calls == 2 + 7  # warm-up steps + repeats: one forward each, never more
    assert t.host_ms is None  # (CUDA only: a CPU step runs where it is issued)
    assert all(m == (mode != "fwd") for m in fn.grad_modes)
    for x in sets:  # gradients are reset outside the timed region and left clean
        assert x["queries"].grad is None and x["keys"].grad is None


def test_bwd_times_backward_only():
    """In bwd mode the forward of a repeat runs in prepare(), before the timed run()."""
    x = P.make_inputs("clip", 32, 32, 8, torch.float32, CPU, torch.Generator().manual_seed(0))
    fn = Counting()
    step = timing.Step(fn, "bwd")
    step.prepare(x)
    assert fn.calls == 1 and x["queries"].grad is None
    step.run(x)
    assert fn.calls == 1 and x["queries"].grad is not None and x["keys"].grad is not None
    step.prepare(x)  # the next repeat starts from cleared gradients
    assert x["queries"].grad is None
    with pytest.raises(ValueError, match="mode"):
        timing.Step(fn, "forward")


def test_time_step_caps_repeats_by_time():
    x = P.make_inputs("clip", 32, 32, 8, torch.float32, CPU, torch.Generator().manual_seed(0))
    import time as _t

    def slow(inp):
        _t.sleep(0.02)
        return reference.clip_loss(inp["queries"], inp["keys"], 10.0)
    t = timing.time_step(slow, [x], "fwd", CPU, warmup=2, repeats=100, min_repeats=3, max_seconds=0.05)
    assert t.repeats == 3
    assert t.ms >= 20.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_and_memory():
    dev = torch.device("cuda")
    sets = [P.make_inputs("clip", 1024, 1024, 64, torch.float32, dev) for _ in range(2)]
    fn = P.naive_fn("clip")
    t = timing.time_step(fn, sets, "fwdbwd", dev, warmup=2, repeats=5)
    assert t.ms > 0 and 0 < t.host_ms

    import time as _t

    def host_bound(inp):  # the host's 20 ms, then a short kernel: the device waits on the host
        _t.sleep(0.02)
        return fn(inp)
    t = timing.time_step(host_bound, sets, "fwd", dev, warmup=2, repeats=3)
    assert t.host_ms >= 20.0 and t.host_ms >= 0.9 * t.ms
    extra = timing.peak_extra_bytes(fn, sets[0], "fwdbwd", dev)
    assert extra >= 1024 * 1024 * 4  # the materialised logits at least


def test_oom_detection():
    assert timing.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert timing.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not timing.is_oom(RuntimeError("shape mismatch"))
    assert not timing.is_oom(ValueError("out of range"))


# ----------------------------------------------------------------------------------------------
# the sweep: OOM, errors, skips, budget
# ----------------------------------------------------------------------------------------------


def test_oom_and_errors_are_rows_not_crashes(tmp_path, monkeypatch):
    real_build = P.build

    def fake_build(loss, provider, device, dtype):
        if provider == "fastcl-torch":  # stands in for a provider that runs out of memory
            def oom(x):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
            return oom
        if provider == "compiled":  # stands in for a provider that fails
            def bad(x):
                raise RuntimeError("kernel launch failed")
            return bad
        return real_build(loss, provider, device, dtype)

    monkeypatch.setattr(P, "build", fake_build)
    args = _args(tmp_path, "--provider", "naive", "fastcl-torch", "compiled", "--mode", "fwd", "fwdbwd")
    res = cli.run(args)
    by = {(r["provider"], r["mode"]): r for r in res["rows"]}
    assert len(by) == 6
    for mode in ("fwd", "fwdbwd"):
        assert by[("naive", mode)]["status"] == "ok" and by[("naive", mode)]["ms"] > 0
        assert by[("fastcl-torch", mode)]["status"] == "OOM"
        assert by[("fastcl-torch", mode)]["ms"] is None
        assert by[("compiled", mode)]["status"].startswith("error: RuntimeError: kernel launch failed")
    rows = report.read_csv(os.path.join(tmp_path, report.CSV_NAME))
    assert {r["status"] for r in rows} == {"ok", "OOM", by[("compiled", "fwd")]["status"]}


def test_unavailable_providers_are_skipped_with_reason(tmp_path, monkeypatch):
    import fastcl.reference as ref

    monkeypatch.delattr(ref, "siglip_loss")
    args = _args(tmp_path, "--loss", "clip", "siglip", "--provider", "naive", "fastcl-triton",
                 "--mode", "fwd", "--no-plots")
    res = cli.run(args)
    reasons = {(s["loss"], s["provider"]): s["reason"] for s in res["skipped"]}
    assert "CUDA" in reasons[("clip", "fastcl-triton")]
    assert "siglip_loss" in reasons[("siglip", "naive")]
    assert [(r["loss"], r["provider"]) for r in res["rows"]] == [("clip", "naive")]
    data = json.load(open(os.path.join(tmp_path, report.JSON_NAME)))
    assert len(data["skipped"]) == len(res["skipped"])
    with open(os.path.join(tmp_path, report.CSV_NAME)) as f:
        assert "# skipped: clip / fastcl-triton" in f.read()


def test_inf_cl_and_compiled_unavailable_on_cpu_paths():
    with pytest.raises(P.Unavailable, match="CUDA"):
        P.build("clip", "infcl", CPU, torch.float32)
    with pytest.raises(P.Unavailable, match="softmax"):
        P.infcl_fn("siglip", ring=False)
    if not P.extension_available():
        with pytest.raises(P.Unavailable, match="extension"):
            P.build("clip", "fastcl-cpu", CPU, torch.float32)
    with pytest.raises(ValueError, match="provider"):
        P.build("clip", "nope", CPU, torch.float32)


def test_budget_stops_the_sweep(tmp_path):
    res = cli.run(_args(tmp_path, "--budget-s", "0", "--N", "16", "32", "--provider", "naive",
                        "--no-plots"))
    assert res["rows"] == []
    assert any("budget" in s["reason"] for s in res["skipped"])


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

PROV_KEYS = ("device", "cpu", "torch", "triton", "fastcl", "cuda", "git_sha", "date", "command", "flops")


def test_results_files_with_provenance(tmp_path):
    pytest.importorskip("matplotlib")
    res = cli.run(_args(tmp_path, "--N", "32", "64", "--provider", "naive", "fastcl-torch"))
    names = sorted(os.path.basename(f) for f in res["files"])
    assert names == ["bench.csv", "bench.json", "time_clip_float32.png"]  # no memory plot on CPU
    rows = report.read_csv(os.path.join(tmp_path, "bench.csv"))
    assert len(rows) == 2 * 2 * 3 and set(rows[0]) == set(report.COLUMNS)
    assert all(float(r["ms"]) > 0 and float(r["tflops"]) > 0 for r in rows)
    assert all(r["peak_extra_mib"] == "" for r in rows)  # no memory figure on CPU
    with open(os.path.join(tmp_path, "bench.csv")) as f:
        head = [line for line in f if line.startswith("# ")]
    keys = {line[2:].split(":", 1)[0] for line in head}
    assert set(PROV_KEYS) <= keys
    data = json.load(open(os.path.join(tmp_path, "bench.json")))
    assert set(PROV_KEYS) <= set(data["provenance"])
    assert data["provenance"]["command"].startswith("python -m bench")
    assert len(data["provenance"]["git_sha"]) == 40 or data["provenance"]["git_sha"] == "unknown"
    assert len(data["rows"]) == 12
    # the two providers agree on the loss and the ratios refer to the same run
    vals = {(r["provider"], r["N"]): r["loss_value"] for r in data["rows"]}
    for n in (32, 64):
        assert vals[("naive", n)] == pytest.approx(vals[("fastcl-torch", n)], rel=1e-5)
    assert all(r["x_vs_naive"] is not None for r in data["rows"])
    from PIL import Image

    img = Image.open(os.path.join(tmp_path, "time_clip_float32.png"))
    assert img.size[0] > 100
    assert json.loads(img.info["Description"])["git_sha"] == data["provenance"]["git_sha"]


def test_memory_plot_and_plain_fallbacks(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    prov = report.provenance(CPU, argv=["bench"])
    rows = []
    for p, scale in (("naive", 1.0), ("fastcl-torch", 0.1)):
        for n in (1024, 4096):
            r = {c: None for c in report.COLUMNS}
            r.update(loss="clip", provider=p, mode="fwdbwd", N=n, M=n, D=64, dtype="bfloat16", status="ok",
                     ms=scale * n / 100, peak_extra_mib=scale * n * n * 4 / 2**20)
            rows.append(r)
    files = report.plot_results(str(tmp_path), rows, prov)
    assert sorted(os.path.basename(f) for f in files) == ["memory_clip_bfloat16.png",
                                                          "time_clip_bfloat16.png"]

    real_import = builtins.__import__

    def no_extras(name, *a, **k):
        if name.split(".")[0] in ("matplotlib", "rich"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_extras)
    assert report.plot_results(str(tmp_path / "none"), rows, prov) == []
    report.print_table(rows, prov, has_peak=False)
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out
    assert "fastcl-torch | fwdbwd | 4096" in out


def test_git_sha_outside_a_repository(tmp_path):
    assert report.git_sha(cwd=str(tmp_path)) == "unknown"
    sha = report.git_sha()
    assert sha == "unknown" or len(sha) == 40


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_defaults_on_cpu(tmp_path):
    a = cli.parse_args(["--device", "cpu"])
    assert a.loss == ["clip"] and a.mode == ["fwd", "bwd", "fwdbwd"]
    assert a.N == [512, 1024] and a.D == [128] and a.dtype == [torch.float32]
    assert a.provider[:3] == ["naive", "compiled", "fastcl-torch"] and "fastcl-triton" not in a.provider
    assert a.out.endswith(os.path.join("bench", "results", "cpu-" + a.out.split("cpu-")[-1]))
    q = cli.parse_args(["--device", "cpu", "--quick"])
    assert max(q.N) <= 256 and q.repeats <= 3


def test_cli_lists():
    a = cli.parse_args(["--device", "cpu", "--loss", "clip,siglip", "supcon", "--N", "8192,32768", "1024",
                        "--M", "2048", "--D", "256", "512,1024", "--dtype", "bf16", "fp32", "bfloat16",
                        "--provider", "naive", "compiled,fastcl-triton", "--mode", "fwd,bwd",
                        "--repeats", "9", "--warmup", "0", "--peak-tflops", "100"])
    assert a.loss == ["clip", "siglip", "supcon"]
    assert a.N == [8192, 32768, 1024] and a.M == [2048] and a.D == [256, 512, 1024]
    assert a.dtype == [torch.bfloat16, torch.float32]
    assert a.provider == ["naive", "compiled", "fastcl-triton"] and a.provider_explicit
    assert a.mode == ["fwd", "bwd"] and a.repeats == 9 and a.warmup == 0
    assert cli.peak_for(a, torch.float32) == 100.0
    assert cli.peak_for(cli.parse_args(["--device", "cpu"]), torch.float32) is None  # CPU: no peak
    with pytest.raises(ValueError, match="CUDA"):
        timing.matmul_tflops(torch.float32, torch.device("cpu"))
    # M != N only for the rectangular losses
    shapes = cli.plan_shapes(cli.parse_args(["--device", "cpu", "--loss", "clip", "info_nce", "--N", "64",
                                             "--M", "64", "128", "32"]))
    assert [(s[0], s[3], s[4]) for s in shapes] == [("clip", 64, 64), ("info_nce", 64, 64),
                                                    ("info_nce", 64, 128)]


def test_triton_config_variants_run_with_their_configuration(tmp_path, monkeypatch):
    """--triton-config NAME=JSON adds provider fastcl-triton@NAME; its cases (forward, backward,
    memory probe) run with that engine configuration, which is restored afterwards."""
    from fastcl.ops.triton import engine as E

    seen = []
    naive = P.naive_fn

    def recording_fastcl_fn(loss, backend):
        fn = naive(loss)

        def run(x):
            seen.append(dict(E.config_override))
            return fn(x)
        return run

    monkeypatch.setattr(P, "fastcl_fn", recording_fastcl_fn)
    monkeypatch.setattr(P, "check_backend", lambda backend, device, dtype: None)
    monkeypatch.setattr(P, "TRITON_VARIANTS", {})
    monkeypatch.setattr(E, "config_override", {"BLOCK_D": 16})
    args = _args(tmp_path, "--provider", "naive", "--mode", "fwd", "fwdbwd", "--no-plots",
                 "--triton-config", 'lean={"PLAIN": false, "fwd_plain.num_warps": 4}',
                 "--triton-config", 'dense={"DENSE": true}')
    assert args.provider == ["naive", "fastcl-triton@lean", "fastcl-triton@dense"]
    res = cli.run(args)
    by = {(r["provider"], r["mode"]): r for r in res["rows"]}
    assert all(by[(p, m)]["status"] == "ok" for p in args.provider for m in ("fwd", "fwdbwd"))
    assert {"PLAIN": False, "fwd_plain.num_warps": 4} in seen and {"DENSE": True} in seen
    assert {"BLOCK_D": 16} not in seen
    assert E.config_override == {"BLOCK_D": 16}


def _planned_run(tmp_path, monkeypatch, *argv):
    """cli.run at N = 640, bf16, fastcl-triton forward and backward, with the launch plans of an
    H100 deciding which configurations repeat another's; what is timed is the naive loss."""
    from torch._subclasses.fake_tensor import FakeTensor

    fastcl_fn, naive = P.fastcl_fn, P.naive_fn

    def planned_or_naive(loss, backend):  # the engine's plan; timed, the naive loss (no GPU here)
        fast, slow = fastcl_fn(loss, backend), naive(loss)
        return lambda x: fast(x) if isinstance(next(iter(x.values())), FakeTensor) else slow(x)

    monkeypatch.setattr(P, "fastcl_fn", planned_or_naive)
    monkeypatch.setattr(P, "check_backend", lambda backend, device, dtype: None)
    monkeypatch.setattr(P, "TRITON_VARIANTS", {})
    monkeypatch.setattr(cli, "PLAN_DEVICES", ("cpu",))
    monkeypatch.setattr(cli, "PLAN_ARCH", 90)
    return cli.run(_args(tmp_path, "--N", "640", "--dtype", "bf16", "--provider", "fastcl-triton",
                         "--mode", "fwd", "bwd", "--no-plots", *argv))


def test_engine_configurations_with_one_launch_plan_are_timed_once(tmp_path, monkeypatch):
    """Engine configurations whose launch plan at a shape is another's (bench/launch_plan.py,
    the Triton backend on fake CUDA tensors of an H100) are not timed again: their rows say
    whose launches they repeat. At D = 64 the fused backward is the default (``fused`` repeats
    it in both passes), ``dense`` changes only the backward and ``colsum`` only the forward."""
    res = _planned_run(tmp_path, monkeypatch, "--loss", "clip", "--D", "64",
                       "--triton-config", 'fused={"DENSE": false}', "--triton-config", 'dense={"DENSE": true}',
                       "--triton-config", 'colsum={"fwd_plain.COLSUM_MMA": false}')
    by = {(r["provider"], r["mode"]): r["status"] for r in res["rows"]}
    same = "same launches as fastcl-triton"
    assert by == {("fastcl-triton", "fwd"): "ok", ("fastcl-triton", "bwd"): "ok",
                  ("fastcl-triton@fused", "fwd"): same, ("fastcl-triton@fused", "bwd"): same,
                  ("fastcl-triton@dense", "fwd"): same, ("fastcl-triton@dense", "bwd"): "ok",
                  ("fastcl-triton@colsum", "fwd"): "ok", ("fastcl-triton@colsum", "bwd"): same}, by
    assert not [r for r in res["rows"] if r["status"] != "ok" and r["ms"] is not None]


@pytest.mark.parametrize("loss", ["supcon", "supcon_in"])
def test_self_similarity_block_variant(tmp_path, monkeypatch, loss):
    """SupCon's dS block without its transposed half (``DENSE_ROWS`` false: L_out's symmetric
    closure with dK's slab sums, L_in's dS alone with both GEMMs) changes only the wide-feature
    backward: timed there (D = 320 on an H100, bf16), the same launches elsewhere."""
    res = _planned_run(tmp_path, monkeypatch, "--loss", loss, "--D", "64", "320",
                       "--triton-config", 'dense_cols={"DENSE_ROWS": false}')
    by = {(r["provider"], r["mode"], r["D"]): r["status"] for r in res["rows"]}
    same = "same launches as fastcl-triton"
    variant = {k[1:]: v for k, v in by.items() if k[0] == "fastcl-triton@dense_cols"}
    assert variant == {("fwd", 64): same, ("bwd", 64): same, ("fwd", 320): same,
                       ("bwd", 320): "ok"}, by


def test_siglip_step_variant(tmp_path, monkeypatch):
    """SigLIP's forward and backward sweeps (``STEP`` false) against its step (the default):
    the same forward under no_grad, different launches wherever gradients are formed."""
    res = _planned_run(tmp_path, monkeypatch, "--loss", "siglip", "--D", "64", "320", "--mode",
                       "fwd", "bwd", "fwdbwd", "--triton-config", 'two_sweeps={"STEP": false}')
    by = {(r["provider"], r["mode"], r["D"]): r["status"] for r in res["rows"]}
    same = "same launches as fastcl-triton"
    variant = {k[1:]: v for k, v in by.items() if k[0] == "fastcl-triton@two_sweeps"}
    assert variant == {(m, D): same if m == "fwd" else "ok" for m in ("fwd", "bwd", "fwdbwd")
                       for D in (64, 320)}, by


def test_no_launch_plans_under_autotuning(monkeypatch):
    """With FASTCL_AUTOTUNE=1 no plan is made (the tuner would time launches that do not run
    and keep a winner): every case is timed."""
    monkeypatch.setenv("FASTCL_AUTOTUNE", "1")
    monkeypatch.setattr(cli, "PLAN_ARCH", 90)
    x = P.make_inputs("clip", 64, 64, 16, torch.bfloat16, CPU)
    seen = {}
    fn = P.fastcl_fn("clip", "triton")
    assert cli.same_launches("fastcl-triton", fn, x, "fwd", seen) is None
    assert cli.same_launches("fastcl-triton", fn, x, "fwd", seen) is None and seen == {}
    monkeypatch.delenv("FASTCL_AUTOTUNE")
    assert cli.same_launches("fastcl-triton", fn, x, "fwd", seen) is None
    assert cli.same_launches("fastcl-triton", fn, x, "fwd", seen) == "fastcl-triton"


@pytest.mark.parametrize("spec,match", [
    ("noequals", "NAME=JSON"), ("a b={}", "plain NAME"), ("x={bad", "not JSON"), ("x=[1]", "JSON object"),
    ('x={"BLOCK_Q": 64}', "unknown key"), ('x={"bwd2.BLOCK_M": 64}', "unknown key"),
    ('x={"BLOCK_M": 0}', "positive integer"), ('x={"num_warps": true}', "positive integer"),
    ('x={"DENSE": 1}', "true or false"), ('x={"DENSE_ROWS": 1}', "true or false"),
    ('x={"STEP": 0}', "true or false"), ('x={"fwd.TMA": 1}', "true or false")])
def test_triton_config_rejects_bad_specs(spec, match, monkeypatch, capsys):
    monkeypatch.setattr(P, "TRITON_VARIANTS", {})
    with pytest.raises(ValueError, match=match):
        P.add_triton_variant(spec)
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cpu", "--triton-config", spec])
    assert "--triton-config" in capsys.readouterr().err


def test_pass_scoped_engine_overrides(monkeypatch):
    from fastcl.ops.triton import engine as E

    monkeypatch.setattr(E, "config_override", {"num_warps": 2, "fwd_plain.num_warps": 4,
                                               "bwd.BLOCK_DV": 64})
    assert E.config_for("cuda", torch.bfloat16, 256, "fwd_plain")["num_warps"] == 4
    assert E.config_for("cuda", torch.bfloat16, 256, "fwd")["num_warps"] == 2
    assert E.config_for("cuda", torch.bfloat16, 256, "bwd")["BLOCK_DV"] == 64
    assert E.config_for("cuda", torch.bfloat16, 256, "bwd_gram")["BLOCK_DV"] == 256


@pytest.mark.parametrize("bad", [["--loss", "triplet"], ["--N", "0"], ["--N", "1e3"], ["--mode", "train"],
                                 ["--dtype", "int8"], ["--provider", "flash"], ["--warmup", "-1"]])
def test_cli_rejects_bad_values(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--device", "cpu", *bad])
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_cuda_without_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_main_no_save(tmp_path, capsys):
    out = tmp_path / "unused"
    assert cli.main(["--device", "cpu", "--N", "16", "--D", "8", "--repeats", "2", "--warmup", "0",
                     "--provider", "naive", "--mode", "fwd", "--no-save", "--out", str(out)]) == 0
    assert not out.exists()
    assert "naive" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# provider wiring: every (loss, provider) computes the loss it names
# ----------------------------------------------------------------------------------------------


def _reference64(loss, x):
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
         for k, v in x.items()}
    if loss == "clip":
        out = reference.clip_loss(d["queries"], d["keys"], P.CLIP_SCALE)
    elif loss == "info_nce":
        out = reference.info_nce(d["queries"], d["keys"], scale=P.CLIP_SCALE)
    elif loss == "gist":
        out = reference.info_nce(d["queries"], d["keys"], scale=P.CLIP_SCALE,
                                 guide=(d["guide_queries"], d["guide_keys"]))
    elif loss == "siglip":
        out = reference.siglip_loss(d["queries"], d["keys"], P.SIGLIP_SCALE, P.SIGLIP_BIAS)
    elif loss == "nt_xent":
        out = reference.nt_xent(d["queries"], d["keys"], P.NT_XENT_TEMPERATURE, normalize=False)
    elif loss == "dcl":
        out = reference.dcl(d["queries"], d["keys"], P.DCL_TEMPERATURE, normalize=False)
    else:
        out = reference.supcon(d["features"], d["labels"], P.SUPCON_TEMPERATURE, normalize=False,
                               variant="in" if loss == "supcon_in" else "out")[0]
    out.backward()
    return out.detach(), {k: v.grad for k, v in d.items() if v.is_floating_point() and v.requires_grad}


@pytest.mark.parametrize("loss", P.LOSSES)
@pytest.mark.parametrize("provider", ["naive", "fastcl-torch"])
def test_providers_match_float64_reference(loss, provider):
    if loss in ("siglip", "supcon", "supcon_in") and not hasattr(reference, P._REFERENCE_NAMES[loss]):
        pytest.skip(f"fastcl.reference has no {loss}")
    N, M, D = 40, (56 if loss in ("info_nce", "siglip", "gist") else 40), 24
    x = P.make_inputs(loss, N, M, D, torch.float32, CPU, torch.Generator().manual_seed(3))
    assert all(v.abs().sum() > 0 for v in x.values())
    fn = P.build(loss, provider, CPU, torch.float32)
    ref, grads = _reference64(loss, x)
    g = 1.7  # a non-unit output gradient
    out = fn(x)
    assert out.shape == () and math.isfinite(float(out.detach()))
    (g * out).backward()
    assert float(out.detach()) == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
    for k, gr in grads.items():
        torch.testing.assert_close(x[k].grad.double(), g * gr, rtol=1e-4, atol=1e-6)


def test_make_inputs_validation():
    with pytest.raises(ValueError, match="M == N"):
        P.make_inputs("clip", 8, 16, 4, torch.float32, CPU)
    with pytest.raises(ValueError, match="M >= N"):
        P.make_inputs("info_nce", 16, 8, 4, torch.float32, CPU)
    with pytest.raises(ValueError, match="loss"):
        P.make_inputs("triplet", 8, 8, 4, torch.float32, CPU)
    x = P.make_inputs("supcon", 64, 64, 8, torch.bfloat16, CPU, torch.Generator().manual_seed(0))
    assert x["features"].dtype == torch.bfloat16 and x["features"].requires_grad
    assert x["labels"].dtype == torch.int64 and not x["labels"].requires_grad
    torch.testing.assert_close(x["features"].float().norm(dim=1), torch.ones(64), atol=1e-2, rtol=0)


def test_input_oom_marks_the_shape(tmp_path, monkeypatch):
    real = P.make_inputs

    def big(loss, N, M, D, dtype, device, generator=None):
        if N > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real(loss, N, M, D, dtype, device, generator)
    monkeypatch.setattr(P, "make_inputs", big)
    res = cli.run(_args(tmp_path, "--N", "32", "64", "--provider", "naive", "--mode", "fwd", "bwd",
                        "--no-plots"))
    status = {(r["N"], r["mode"]): r["status"] for r in res["rows"]}
    assert status == {(32, "fwd"): "ok", (32, "bwd"): "ok", (64, "fwd"): "OOM", (64, "bwd"): "OOM"}


def test_two_view_rows_count_their_pairs_matrix(tmp_path):
    """nt_xent / dcl rows: N pairs, TFLOP/s of the 2N x 2N similarity matrix."""
    res = cli.run(_args(tmp_path, "--loss", "nt_xent", "dcl", "--N", "24", "--D", "8",
                        "--provider", "naive", "fastcl-torch", "--mode", "fwd", "--no-plots"))
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    assert {(r["loss"], r["provider"]) for r in rows} == {
        (loss, prov) for loss in ("nt_xent", "dcl") for prov in ("naive", "fastcl-torch")}
    for r in rows:
        assert r["tflops"] == pytest.approx(timing.tflops("fwd", 48, 48, 8, r["ms"]), rel=1e-3)


def test_json_is_strict_with_non_finite_values(tmp_path):
    r = {c: None for c in report.COLUMNS}
    r.update(loss="clip", provider="naive", mode="fwd", N=4, M=4, D=2, dtype="float32", status="ok",
             ms=1.0, loss_value=float("nan"), tflops=float("inf"))
    prov = report.provenance(CPU, argv=["bench"])
    report.write_json(str(tmp_path / "r.json"), [r], prov)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)["rows"][0]
    assert row["loss_value"] == "nan" and row["tflops"] == "inf"


def test_gpu_script_configurations_parse(monkeypatch):
    """Every engine configuration the GPU run script times is one --triton-config accepts (the
    script runs only on a GPU: a bad key would cost a whole phase there)."""
    import re
    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "scripts", "gpu_run.sh")).read()
    specs = re.findall(r"--triton-config '([^']+)'", script)
    assert len(specs) >= 10, specs
    monkeypatch.setattr(P, "TRITON_VARIANTS", {})
    for spec in specs:
        P.add_triton_variant(spec)
    assert len(P.TRITON_VARIANTS) == len(set(s.partition("=")[0] for s in specs))


def test_ring_bench_writes_both_rings(tmp_path):
    """python -m bench.ring over three gloo processes: the full and the mirrored ring, their
    tiles per rank (3 and 3 // 2 + 1), positive times and the provenance in both files."""
    from bench import ring
    assert ring.main(["--world", "3", "--n", "4", "--D", "8", "--repeats", "2", "--warmup", "0",
                      "--backend", "torch", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(str(tmp_path / "ring.csv"))
    assert [(r["ring"], int(r["tiles"])) for r in rows] == [("full", 3), ("mirrored", 2)]
    assert all(float(r["ms"]) > 0 and r["backend"] == "torch" for r in rows)
    data = json.load(open(tmp_path / "ring.json"))
    assert data["provenance"]["command"].startswith("python -m bench.ring --world 3")
    assert [r["tiles"] for r in data["rows"]] == [3, 2]
    assert (tmp_path / "ring.png").stat().st_size > 0


def test_ring_bench_times_siglip_step(tmp_path):
    """python -m bench.ring --loss siglip over two gloo processes (the C++ kernels' step): the two
    rings and the ring of steps, the tiles each sweeps per rank (2 W and W)."""
    from bench import ring
    pytest.importorskip("fastcl._C")
    assert ring.main(["--loss", "siglip", "--world", "2", "--n", "4", "--D", "8", "--repeats", "2",
                      "--warmup", "0", "--backend", "cpu", "--out", str(tmp_path)]) == 0
    rows = report.read_csv(str(tmp_path / "ring.csv"))
    assert [(r["loss"], r["ring"], int(r["tiles"]), int(r["rows"])) for r in rows] == [
        ("siglip", "two_rings", 4, 4), ("siglip", "step", 2, 4)]
    assert all(float(r["ms"]) > 0 and r["backend"] == "cpu" for r in rows)
