"""Tests of ``python -m bench.targets`` on synthetic result files (CPU, no timing)."""
import os
import tarfile

from bench import report, targets

PROV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
        "git_sha": "0123456789abcdef", "date": "2026-12-01T10:00:00Z"}
HEAD = dict(loss="clip", mode="fwdbwd", N=32768, M=32768, dtype="bfloat16")


def _row(provider, ms, status="ok", mem=None, tflops=None, pct=None, **case):
    r = dict(HEAD)
    r.update(case)
    r.update(provider=provider, ms=ms, status=status, peak_extra_mib=mem, tflops=tflops, pct_peak=pct)
    return r


def _write(path, rows, **prov):
    report.write_results(str(path), rows, dict(PROV, **prov))


def _lines(tmp_path):
    runs, junits = targets.load_runs([str(tmp_path)])
    return {line[0].strip(): line for line in targets.target_lines(runs, junits)}


def _headline_rows():
    # D: (compiled ms, fastcl-triton ms, fastcl memory) -> ratios 2.5, 1.2, 1.1, 0.5
    spec = {256: (7.5, 3.0, 100), 512: (9.6, 8.0, 150), 768: (11.0, 10.0, 180), 1024: (14.0, 28.0, 250)}
    rows = []
    for D, (comp, ours, mem) in spec.items():
        rows += [_row("compiled", comp, mem=4032, D=D), _row("fastcl-triton", ours, mem=mem, tflops=1, pct=50, D=D),
                 _row("fastcl-cuda", ours * 2, mem=mem, D=D), _row("infcl", ours * 30, D=D)]
    rows.append(_row("fastcl-triton@dense", 20.0, D=1024))
    rows += [_row("fastcl-triton", 1.0, mode="fwd", tflops=500, pct=70, D=512, host_ms=0.2),
             _row("fastcl-triton", 3.0, mode="bwd", tflops=400, pct=55, D=512, host_ms=2.8),
             _row("compiled", 3.0, mode="bwd", D=512)]
    return rows


def test_headline_verdicts(tmp_path):
    _write(tmp_path / "bench", _headline_rows())
    lines = _lines(tmp_path)
    assert lines["CLIP bf16 fwd+bwd N = 32768, D = 256 vs torch.compile"][3] == "met"
    assert "2.50x" in lines["CLIP bf16 fwd+bwd N = 32768, D = 256 vs torch.compile"][1]
    d512 = lines["CLIP bf16 fwd+bwd N = 32768, D = 512 vs torch.compile"]
    assert d512[3].startswith("not met: 7.38 ms needed")  # 9.6 / 1.3
    assert lines["CLIP bf16 fwd+bwd N = 32768, D = 768 vs torch.compile"][3] == "met"  # exactly 1.1
    # an engine configuration faster than the default never counts towards the target
    assert lines["CLIP bf16 fwd+bwd N = 32768, D = 1024 vs torch.compile"][3].startswith("not met")
    assert lines["extra memory, D = 256"][3] == "met"  # 100 <= 4032 / 20
    assert lines["extra memory, D = 1024"][3] == "not met"  # 250 > 201.6
    inf = [v for k, v in lines.items() if k.startswith("infcl:")]
    assert len(inf) == 4 and all(v[3] == "met" for v in inf)  # 30x each
    assert lines["SigLIP bf16 fwd+bwd N = 32768, D = 512 vs torch.compile"][3] == "not measured"
    assert lines["CLIP fwd+bwd at N = 2^20, D = 512"][3] == "not measured"
    text = targets.build_report([str(tmp_path)])
    assert "fastcl-triton@dense 20 ms" in text  # shown beside the default, at D = 1024
    assert "| 512 | fwd | fastcl-triton | 1 ms | 500 | 70 | 0.2 ms |" in text
    # a step the host issues in nearly its device time is flagged; no host time: a dash
    assert "| 512 | bwd | fastcl-triton | 3 ms | 400 | 55 | 2.8 ms (host-bound) |" in text
    assert "| 512 | bwd | compiled | 3 ms |  | — | — |" in text
    assert "NVIDIA H100 80GB HBM3 (torch 2.11.0, triton 3.6.0, git 0123456)" in text


def test_ratios_never_cross_runs(tmp_path):
    """The baseline of one run and fastcl of another are never compared; the newest run that
    holds both is."""
    D = dict(D=512)
    _write(tmp_path / "a", [_row("compiled", 10.0, **D)], date="2026-12-01T10:00:00Z")
    _write(tmp_path / "b", [_row("fastcl-triton", 1.0, **D)], date="2026-12-01T11:00:00Z")
    key = "CLIP bf16 fwd+bwd N = 32768, D = 512 vs torch.compile"
    assert _lines(tmp_path)[key][3] == "not measured"
    _write(tmp_path / "c", [_row("compiled", 10.0, **D), _row("fastcl-triton", 9.0, **D)],
           date="2026-12-01T12:00:00Z")
    _write(tmp_path / "d", [_row("compiled", 10.0, **D), _row("fastcl-triton", 5.0, **D)],
           date="2026-12-01T09:00:00Z")
    line = _lines(tmp_path)[key]
    assert "1.11x" in line[1] and line[3].startswith("not met")  # run c, the newest


def test_other_targets_and_archives(tmp_path):
    rows = [_row("compiled", 12.0, loss="siglip", D=512), _row("fastcl-triton", 7.0, loss="siglip", D=512),
            _row("naive", 30.0, dtype="float32", D=512), _row("fastcl-triton", 11.0, dtype="float32", D=512),
            _row("fastcl-triton", 0.0, status="oom", N=2**20, M=2**20, D=512)]
    out = tmp_path / "out"
    _write(out / "targets", rows)
    (out / "junit_gpu.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase name="test_64bit_offsets_keys[256]"/><testcase name="test_64bit_offsets_keys[512]"/>'
        '<testcase name="test_64bit_offsets_queries[256]"/>'
        '<testcase name="test_64bit_offsets_queries[512]"><failure message="x"/></testcase>'
        '</testsuite></testsuites>')
    lines = _lines(out)
    assert lines["SigLIP bf16 fwd+bwd N = 32768, D = 512 vs torch.compile"][3] == "met"  # 1.71x
    assert lines["CLIP fp32 (TF32) fwd+bwd N = 32768, D = 512 vs naive fp32"][3] == "not met: 10 ms needed, -9%"  # 2.73x
    assert lines["CLIP fwd+bwd at N = 2^20, D = 512"][3] == "not measured (fastcl rows: oom)"
    assert lines["N*D > 2^31 matches the reference (sampled rows)"][3] == "not met"

    # the same files packed as scripts/gpu_run.sh packs them, and the huge run completed
    _write(out / "huge", [_row("fastcl-triton", 900.0, mem=3072, N=2**20, M=2**20, D=512)],
           date="2026-12-02T00:00:00Z")
    arch = tmp_path / "extras.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(out / "huge" / "bench.csv", arcname="huge/bench.csv")
    os.remove(out / "huge" / "bench.csv")
    report_path = tmp_path / "targets.md"
    assert targets.main([str(out), str(arch), "--out", str(report_path)]) == 0
    text = report_path.read_text()
    assert "| CLIP fwd+bwd at N = 2^20, D = 512 | 900 ms, bfloat16, 3.00 GiB extra | completes | met |" in text
