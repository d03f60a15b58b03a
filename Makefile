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
	$(PY) -m pip install -q -e "SegBookCore[train]"
	touch $@

# test tools and the references the tests compare against
$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e "SegBookCore[test]"
	# nnU-Net v2 without its timm -> torchvision chain, which would replace torch (see pyproject.toml)
	$(PY) -m pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6
	touch $@

install: $(VENV)/.core

test: $(VENV)/.test
	$(PY) -m pytest -q Testing

demo: $(VENV)/.core
	$(PY) -m segbook.demo --out demo_output

.PHONY: install test demo
