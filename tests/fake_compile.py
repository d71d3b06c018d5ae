"""torch.compile of the Triton backend's losses without a GPU (run as a module, with
TRITON_INTERPRET unset: dynamo traces Triton's JIT kernels, not the interpreter's):
``python -m tests.fake_compile [--dynamic] [--float32] LOSS ...`` prints a JSON report {loss:
{"ok", "error", "graphs", "kernels"}} used by tests/test_gpu_plan.py (``--dynamic``:
``dynamic=True``, symbolic sizes and floats; ``--float32``: float32 features, which take the
wide-feature backward at D = 200, instead of bfloat16 ones).

Each loss of tests/_utils.LOSSES is compiled as one graph (``fullgraph=True``, forward and the
autograd Function's backward) on fake CUDA tensors of an H100, then run on them (nothing runs:
on fake tensors each operator computes only shapes). Dynamo only treats Triton kernels as such where torch
finds a GPU for Triton, and Triton's launcher asks its driver for the device, so both are told
of an sm_90 one. What this catches: Python in the launchers that dynamo cannot trace into one
graph (module state changed inside the autograd Function, host reads, unsupported calls)."""
import importlib
import json
import sys
import traceback

import torch


class _Driver:
    """The Triton driver calls made while dynamo traces a launch, answered for an sm_90 device."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, *args):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda

    @staticmethod
    def is_active():
        return True


def _pretend_gpu(monkeypatch) -> None:
    """Dynamo's check for a Triton-capable GPU answered yes, in every module that imported it."""
    import torch.utils._triton as tt

    yes = lambda: True  # noqa: E731
    monkeypatch.setattr(tt, "has_triton", yes)
    for name, mod in list(sys.modules.items()):
        if name.startswith("torch") and mod is not tt and getattr(mod, "has_triton", None) is not None:
            monkeypatch.setattr(mod, "has_triton", yes)
    driver = importlib.import_module("triton.runtime.driver").driver
    fake = _Driver()
    monkeypatch.setattr(driver, "_default", fake)
    driver.set_active(fake)


def compile_report(names, dynamic: bool = False, dtype: torch.dtype = torch.bfloat16) -> dict:
    from bench.launch_plan import FakeGPU, Patcher
    from ._utils import LOSSES, loss_inputs

    monkeypatch = Patcher()
    # (the kernels' launches not replaced: dynamo must see the JIT kernels themselves; run on
    # fake tensors, the compiled graph launches nothing)
    gpu = FakeGPU(monkeypatch, 90, record_launches=False)
    _pretend_gpu(monkeypatch)
    x = loss_inputs(gpu.tensor, 1004, 200, dtype)
    report = {}
    for name in names:
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        entry = {"ok": False, "error": "", "graphs": 0, "kernels": 0}
        try:
            with gpu.mode:
                out = torch.compile(lambda: LOSSES[name](x), backend=backend, fullgraph=True,
                                    dynamic=dynamic)()
            entry["ok"] = out.shape == () and out.device.type == "cuda"
            if not entry["ok"]:
                entry["error"] = f"output {tuple(out.shape)} on {out.device}"
        except Exception as e:  # reported, the next loss goes on
            entry["error"] = "".join(traceback.format_exception_only(type(e), e))[-3000:]
        entry["graphs"] = len(graphs)
        code = "".join(m.code for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule))
        entry["kernels"] = code.count("higher_order.triton_kernel_wrapper")
        report[name] = entry
    monkeypatch.undo()
    return report


if __name__ == "__main__":
    from ._utils import LOSSES

    names = [a for a in sys.argv[1:] if not a.startswith("--")]
    dtype = torch.float32 if "--float32" in sys.argv else torch.bfloat16
    print(json.dumps(compile_report(names or list(LOSSES), dynamic="--dynamic" in sys.argv,
                                    dtype=dtype)))
