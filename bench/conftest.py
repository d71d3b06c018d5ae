"""pytest configuration for bench/.

``pytest bench/`` runs the harness tests and calls every benchmarked function once (as with
``--benchmark-disable``); ``pytest bench/ --benchmark-only`` runs the pytest-benchmark set with
full statistics. Nothing here touches CUDA at import.
"""
import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return
    only = config.getoption("benchmark_only", False)
    enable = config.getoption("benchmark_enable", False)
    if not only and not enable:
        bs.disabled = True
