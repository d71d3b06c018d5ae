# make test   create .venv, install torch + triton + test deps, build fastcl (and its extension), run every test
# make bench  the benchmark suite on the best local device (a small CPU run when there is no GPU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
DEPS   := "$(TORCH)" "triton>=3.0" ninja pybind11 pytest pytest-benchmark numpy matplotlib rich tqdm
# peer libraries the integration tests compare against (installed with the pinned torch)
PEERS  := open_clip_torch sentence-transformers pytorch-metric-learning lightly info-nce-pytorch
# the oldest supported Triton (a CPU torch beside it): every kernel variant is compiled with it for
# sm_90 / sm_80, and the Triton tests run on its interpreter (which needs numpy 1.x)
FLOOR  ?= .venv-triton3.0
FLOOR_DEPS := torch==2.13.0 triton==3.0.0 "numpy<2" pytest
FLOOR_TESTS := tests/test_triton.py tests/test_plain_tiles.py tests/test_family.py
CUDA_HOME ?= $(wildcard /usr/local/cuda)
export CUDA_HOME
export MAX_JOBS ?= 2

.PHONY: test bench install clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS) $(PEERS)
	touch $@

$(FLOOR)/.deps: Makefile
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q $(FLOOR_DEPS)
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: install $(FLOOR)/.deps
	FASTCL_TRITON_FLOOR_PYTHON=$(abspath $(FLOOR))/bin/python $(PY) -m pytest tests -q -ra
	PYTHONPATH=$(CURDIR) $(FLOOR)/bin/python -m pytest $(FLOOR_TESTS) -q -p no:cacheprovider -p no:warnings
	$(PY) -m pytest bench -q
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j$(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

bench: install
	$(PY) -m bench

clean:
	rm -rf build *.egg-info fastcl/*.so .pytest_cache $(FLOOR)
