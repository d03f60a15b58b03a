# The two front-door commands: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on the CI machine and the normal (CUDA) build elsewhere; override freely,
# e.g. `make demo TORCH="torch>=2.2"`.
TORCH ?= torch==2.13.0

# core + training extras: what `make demo` needs
$(VENV)/.core: SegBookCore/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e "SegBookCore[train,dicom]"
	touch $@

# test tools and the references the tests compare against
$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e "SegBookCore[test]"
	# nnU-Net v2 without its timm -> torchvision chain, which would replace torch (see pyproject.toml)
	$(PY) -m pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6
	touch $@

# dciodvfy (Debian's dicom3tools), the DICOM standard's validator the DICOM SEG tests run: installed with apt
# where we may (root or sudo); elsewhere the tests that need it fail and say what to install.
dicom-tools:
	@command -v dciodvfy >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	    $$SUDO apt-get install -y -q dicom3tools >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dicom3tools >/dev/null; } ; \
	  else echo "dciodvfy missing: install dicom3tools (Debian/Ubuntu: apt-get install dicom3tools)"; fi; }

# The oldest supported versions (the floors of pyproject.toml, pinned in Testing/oldest/) on Python 3.9, as in
# Slicer 5.8. PyPI's Linux torch 2.2 is a CUDA build: installed --no-deps, with stubs for the GPU libraries
# it links and a CPU run never calls (Testing/oldest/cuda_stubs.py) instead of ~1.7 GB of NVIDIA packages.
# (pyenv's shim for python3.9 fails unless 3.9 is selected, hence the explicit paths first)
PYTHON_OLDEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9*/bin/python3.9 /usr/bin/python3.9 \
                   /usr/local/bin/python3.9) python3.9)
VENV_OLDEST ?= .venv-oldest
PY_OLDEST := $(VENV_OLDEST)/bin/python
$(VENV_OLDEST)/.ready: Testing/oldest/requirements.txt Testing/oldest/no-deps.txt Testing/oldest/cuda_stubs.py
	rm -rf $(VENV_OLDEST)
	$(PYTHON_OLDEST) -m venv $(VENV_OLDEST)
	$(PY_OLDEST) -m pip install -q --upgrade pip
	$(PY_OLDEST) -m pip install -q -r Testing/oldest/requirements.txt
	$(PY_OLDEST) -m pip install -q --no-deps -r Testing/oldest/no-deps.txt -e SegBookCore
	$(PY_OLDEST) Testing/oldest/cuda_stubs.py
	touch $@

install: $(VENV)/.core

# No silent skips: a skip fails the run unless its kind is allowed (Testing/skip_policy.py). No CUDA on CI;
# the oldest run also has no nnU-Net (Python >= 3.10) and no slicer-core (no Python 3.9 wheel); its DICOM SEG
# tests run on Slicer 5.8's stack (highdicom 0.22, pydicom's floor, pinned in Testing/oldest/).
test: $(VENV)/.test dicom-tools
	SEGBOOK_NO_SKIPS=1 SEGBOOK_ALLOW_SKIPS=cuda $(PY) -m pytest -q Testing
	$(MAKE) test-oldest

test-oldest: $(VENV_OLDEST)/.ready dicom-tools
	SEGBOOK_NO_SKIPS=1 SEGBOOK_ALLOW_SKIPS=cuda,nnunet,slicer $(PY_OLDEST) -m pytest -q Testing

demo: $(VENV)/.core
	$(PY) -m segbook.demo --out demo_output

# What SegBook does on this machine's GPU, step by step into gpu_check_out/ (see benchmarks/gpu_check.sh)
gpu-check: $(VENV)/.test
	PY=$(PY) bash benchmarks/gpu_check.sh

.PHONY: install test test-oldest demo dicom-tools gpu-check
