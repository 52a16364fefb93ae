# Fresh machine: `make demo` (set up .venv + run the MovieLens comparison), `make test`.
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

.PHONY: venv demo test bench apidoc clean distclean

venv: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(VPY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements/cpu.txt
	@# torchrec's metadata asks for the CUDA fbgemm-gpu; its real needs are in cpu.txt.
	$(PIP) install --no-deps -r requirements/torchrec.txt
	$(PIP) install --no-deps -e .
	touch $@

# Both runs share one process and allocator settings (see docs/benchmarks.md for why).
# Then the advisor on the same data (docs/analyze.md): its report (analyze_out/report.html),
# the recommended flag, and its predictions next to the benchmarks' measured speed-ups.
demo: venv
	MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=1073741824 \
		$(VPY) examples/movielens/train.py --compare --epochs 1
	$(VENV)/bin/recd-plugin analyze movielens-100k --out analyze_out --no-progress

test: venv
	$(VPY) -m pytest -q tests integration_tests

# Every benchmark; each rewrites its section of docs/benchmarks.md and docs/bench/<name>.json.
bench: venv
	for b in dedup storage dist fae des; do $(VPY) -m recd_plugin.bench $$b || exit 1; done

# API reference: docs/api/*.md from the docstrings (recd_plugin/analyze/apidoc.py).
apidoc: venv
	$(VPY) -m recd_plugin.analyze.apidoc docs/api

# Build/test leftovers. Keeps .venv (use `make distclean` to remove it too).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis analyze_out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
