# The two front-door commands: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on the CI machine and the normal (CUDA) build elsewhere; override freely,
# e.g. `make demo TORCH="torch>=2.4"`.
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

install: $(VENV)/.core

# SEGBOOK_REQUIRE_TOOLS: a missing validator fails its tests instead of skipping them
test: $(VENV)/.test dicom-tools
	SEGBOOK_REQUIRE_TOOLS=1 $(PY) -m pytest -q Testing

demo: $(VENV)/.core
	$(PY) -m segbook.demo --out demo_output

.PHONY: install test demo dicom-tools
