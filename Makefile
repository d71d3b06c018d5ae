# make test   create .venv, install torch + triton + test deps, build fastcl (and its extension), run every test
# make bench  the benchmark suite on the best local device (a small CPU run when there is no GPU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
DEPS   := "$(TORCH)" "triton>=3.0" ninja pybind11 pytest pytest-benchmark numpy matplotlib rich tqdm
# peer libraries the integration tests compare against (installed with the pinned torch)
PEERS  := open_clip_torch sentence-transformers pytorch-metric-learning lightly info-nce-pytorch
# the oldest supported torch and Triton: torch 2.4.1 with its Triton 3.0 (whose interpreter needs
# numpy 1.x). The main suite compiles every kernel variant with that Triton for sm_90 / sm_80; a
# copy of the sources, its CPU extension built against that torch, runs the Triton tests on that
# interpreter and the tests of what meets torch's API (custom ops, opcheck, torch.compile, gloo)
FLOOR  ?= .venv-floor
FLOOR_DEPS := torch==2.4.1 triton==3.0.0 "numpy<2" pytest ninja pybind11 setuptools wheel
FLOOR_SRC := build/floor
FLOOR_TESTS := tests/test_triton.py tests/test_plain_tiles.py tests/test_family.py tests/test_api.py \
	tests/test_cpp_ops.py tests/test_distributed.py tests/test_validation.py tests/test_reference.py \
	tests/test_train.py tests/test_random_cases.py
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
	rm -rf $(FLOOR_SRC) && mkdir -p $(FLOOR_SRC)
	cp -r setup.py pytest.ini csrc fastcl tests examples $(FLOOR_SRC)/
	rm -f $(FLOOR_SRC)/fastcl/*.so
	cd $(FLOOR_SRC) && FASTCL_SKIP_CUDA_BUILD=1 $(abspath $(FLOOR))/bin/python setup.py -q build_ext --inplace
	cd $(FLOOR_SRC) && $(abspath $(FLOOR))/bin/python -m pytest $(FLOOR_TESTS) -q -p no:cacheprovider -p no:warnings
	$(PY) -m pytest bench -q
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j$(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

bench: install
	$(PY) -m bench

clean:
	rm -rf build *.egg-info fastcl/*.so .pytest_cache $(FLOOR)
