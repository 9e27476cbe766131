# optiscope: two commands do everything (`make demo`, `make test`); each sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build on this machine; CUDA users override, e.g. TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
DEBIAN_DATA := dataset-fashion-mnist fortunes
# headless Chromium and its WebDriver for tests/test_report_browser.py (the HTML report checked in a real browser)
DEBIAN_BROWSER := chromium chromium-driver
STAMP := $(VENV)/.optiscope-installed
OUT ?= runs/demo

.PHONY: setup data browser demo test test-all bench lint clean docs papers results-table

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/torch.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned, so that pip never resolves a multi-GB CUDA build for the package's "torch>=2.4"
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	@# the integrations extra (TensorBoard, Hugging Face, Lightning) so that the examples and callbacks are tested
	@$(PIP) install -q -c constraints/torch.txt -e '.[dev,integrations]'
	@touch $(STAMP)

# Debian data packages (DESIGN.md "Data available offline"); installed when missing and we are root.
data:
	@missing=""; for p in $(DEBIAN_DATA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian data packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  else echo "warning: Debian packages missing:$$missing (run as root or: sudo apt-get install -y$$missing)"; fi; \
	fi

# Debian browser packages for the report's browser test; installed when missing and we are root, like `data`.
browser:
	@missing=""; for p in $(DEBIAN_BROWSER); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian browser packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	  else echo "warning: Debian packages missing:$$missing (run as root or: sudo apt-get install -y$$missing)"; fi; \
	fi

demo: setup data
	$(VENV)/bin/optiscope demo --out $(OUT)

test: setup data browser
	$(PY) -m pytest

test-all: setup data browser
	$(PY) -m pytest -m ""

bench: setup data
	@# -c: the baselines must not replace the pinned torch (a naive install pulls a multi-GB CUDA build)
	@$(PIP) install -q -c constraints/torch.txt -e '.[bench]' || echo "warning: some benchmark baselines failed to install; they will be skipped"
	@# BackPACK pulls in PyPI's torchvision, which does not import beside the pinned CPU torch and then breaks
	@# Lightning (through torchmetrics); BackPACK's DiagHessian runs without it
	@$(PY) -c "import torchvision" 2>/dev/null || $(PIP) uninstall -q -y torchvision 2>/dev/null || true
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# API reference (HTML, from the docstrings) into docs/api/ (not committed; open docs/api/index.html).
docs: setup
	@$(PY) -c "import pdoc" 2>/dev/null || $(PIP) install -q -c constraints/torch.txt 'pdoc>=14'
	$(PY) -m pdoc --docformat restructuredtext -o docs/api $$($(PY) -c "import pkgutil, optiscope; print(' '.join(\
	  ['optiscope'] + [m.name for m in pkgutil.walk_packages(optiscope.__path__, 'optiscope.') \
	  if not any(p.startswith('_') for p in m.name.split('.'))]))")
	@echo "API reference: docs/api/index.html"

# docs/papers.md: per paper every claim (src/optiscope/coverage/*.toml), the experiment that tests it and its latest
# verdict from the results under RESULTS (highest tier, then newest), and the functions citing the paper.
RESULTS ?= docs/results/data
papers: setup
	$(PY) -m optiscope.report.paper_index docs/papers.md --results $(RESULTS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# The README's results table, generated from results.json files (never typed by hand): the newest run of the highest
# tier per experiment under RESULTS (default: runs/ and the committed copies in docs/results/data), copied into
# docs/results/data so that the table can be regenerated from the repository alone.
RESULTS ?= $(wildcard runs) docs/results/data
results-table: setup
	@mkdir -p docs/results/data
	$(PY) -m optiscope.report.results_table $(RESULTS) --collect docs/results/data --readme README.md
