# Fresh machine: `make demo` (set up .venv + run the MovieLens comparison), `make test`.
# `make test-latest`: the same suite on the current TorchRec release, in .venv-latest.
# Needs only python3 (3.10+), pip and gcc. Override the interpreter with `make PYTHON=python3.11`.
# Outside this project's machines (no local torch CPU wheel), add the PyTorch CPU index:
#     make venv PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# See docs/install.md.

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.stamp
# Re-install only when one of these changes; otherwise `make venv` is a no-op.
SETUP_INPUTS := requirements/cpu.txt requirements/torchrec.txt pyproject.toml

# The second tested stack: torch 2.14, fbgemm-gpu-cpu 1.9, torchrec 1.9 (requirements/latest.txt).
VENV_LATEST ?= .venv-latest
LPY := $(VENV_LATEST)/bin/python
LATEST_STAMP := $(VENV_LATEST)/.stamp
LATEST_INPUTS := requirements/latest.txt requirements/torchrec-latest.txt pyproject.toml
# The demo trains each side for DEMO_STEPS batches of 1024 (a few minutes in all on 2 cores);
# `make demo-full` (or DEMO_STEPS=0) trains a whole epoch per side.
DEMO_STEPS ?= 40

.PHONY: venv venv-latest demo demo-full test test-latest bench apidoc clean distclean

venv: $(STAMP)

# $(1): venv folder, $(2): requirements file, $(3): torchrec requirements file (--no-deps:
# torchrec's metadata asks for the CUDA fbgemm-gpu; its real needs are in $(2)).
define make_venv
	@test -x $(1)/bin/python || { echo "creating $(1) with $(PYTHON)"; $(PYTHON) -m venv $(1); }
	$(1)/bin/python -m pip install --upgrade pip
	$(1)/bin/python -m pip install -r $(2)
	$(1)/bin/python -m pip install --no-deps -r $(3)
	$(1)/bin/python -m pip install --no-deps -e .
	touch $@
endef

$(STAMP): $(SETUP_INPUTS)
	$(call make_venv,$(VENV),requirements/cpu.txt,requirements/torchrec.txt)

venv-latest: $(LATEST_STAMP)

$(LATEST_STAMP): $(LATEST_INPUTS)
	$(call make_venv,$(VENV_LATEST),requirements/latest.txt,requirements/torchrec-latest.txt)

# Both runs share one process and allocator settings (see docs/benchmarks.md for why).
# Then the advisor on the same data (docs/analyze.md): its report (analyze_out/report.html),
# the recommended flag, and its predictions next to the benchmarks' measured speed-ups.
demo: venv
	MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=1073741824 \
		$(VPY) examples/movielens/train.py --compare --epochs 1 --max-steps $(DEMO_STEPS)
	$(VENV)/bin/recd-plugin analyze movielens-100k --out analyze_out

demo-full:
	$(MAKE) demo DEMO_STEPS=0

test: venv
	$(VPY) -m pytest -q tests integration_tests

test-latest: venv-latest
	$(LPY) -m pytest -q tests integration_tests

# Every benchmark; each rewrites its section of docs/benchmarks.md and recd_plugin/bench/results/<name>.json.
bench: venv
	for b in dedup storage dist fae des models; do $(VPY) -m recd_plugin.bench $$b || exit 1; done

# API reference: docs/api/*.md from the docstrings (tools/apidoc.py).
apidoc: venv
	$(VPY) tools/apidoc.py docs/api

# Build/test leftovers. Keeps .venv (use `make distclean` to remove it too).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis analyze_out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VENV_LATEST)
