# The two front-door commands: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU wheel on the CI machine and the normal build elsewhere; override freely.
TORCH ?= torch==2.13.0

$(VENV)/.installed: SegBookCore/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e "SegBookCore[test]"
	# the nnU-Net v2 reference, without its timm/torchvision chain (see SegBookCore/pyproject.toml)
	$(PY) -m pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 acvl-utils==0.2.6
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q Testing

demo: install
	$(PY) -m segbook.demo --out demo_output

.PHONY: install test demo
