# edgediff: `make demo` and `make test` work on a fresh machine; every target prepares .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup cross-toolchain device-tools demo test lint bench clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned resolve pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# aarch64 cross compilers for the arm-a78 / arm-a55 / adreno-740 builds (Debian packages).
cross-toolchain:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { \
	  echo "installing g++-aarch64-linux-gnu"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }

# What the cross tests run the builds on: qemu-user + an arm64 Debian root for arm-a78 (scripts/arm64_root.py,
# cached in .cache/: about a minute the first time), PoCL for the adreno-740 OpenCL kernels (pyopencl is a dev
# dependency). apt runs only when a tool is missing.
device-tools: setup
	@{ command -v qemu-aarch64-static && test -x /usr/sbin/debootstrap && test -e /etc/OpenCL/vendors/pocl.icd; } \
	  >/dev/null 2>&1 || { \
	  echo "installing qemu-user-static debootstrap pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq qemu-user-static debootstrap \
	    pocl-opencl-icd ocl-icd-libopencl1 ocl-icd-opencl-dev >/dev/null; }
	$(PY) scripts/arm64_root.py build

demo: setup cross-toolchain
	$(PY) -m edgediff.tools.demo --output demo-out

# One pytest worker per core (pytest-xdist), a test file's tests on one worker: the suite is mostly
# single-threaded LLVM builds and qemu runs. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: setup cross-toolchain device-tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: setup
	$(PY) -m ruff check edgediff tests benchmarks scripts
	$(PY) -m ruff format --check edgediff tests benchmarks scripts

# What `make bench` prints (BENCHMARKS.md; BENCH_ARGS=--quick for a smoke run of the first two):
# speed against PyTorch eager and onnxruntime; every engine in turns (eager, edgediff fp32/w8/int8,
# onnxruntime fp32/int8, OpenVINO fp32/default) with 20-step latent PSNR; one multi-resolution artifact against builds specialised for
# each size; peak RSS of memory-capped generation against the cap; the NPU tiling DRAM table (analysis,
# ~2 min); linear attention against fused softmax at SD 1.5's 64x64 level (N = 4096), each feature map.
BENCH_RESOLUTIONS ?= 256x256,384x256
BENCH_PEERS ?= onnxruntime onnxruntime-int8 openvino-fp32 openvino
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m edgediff bench $(BENCH_ARGS)
	$(PY) -m edgediff bench --models sd15-unet --latent 32 --peers $(BENCH_PEERS) --precisions w8 int8 --runs 4 $(BENCH_ARGS)
	$(PY) -m edgediff bench --resolutions $(BENCH_RESOLUTIONS) $(BENCH_ARGS)
	$(PY) benchmarks/memory_cap.py --quick
	$(PY) benchmarks/tiling.py --l2-target host
	PYTHONPATH=. $(PY) benchmarks/linear_attention.py --tables attention

clean:
	rm -rf demo-out .pytest_cache build
