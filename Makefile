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

.PHONY: venv demo test bench clean distclean

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
demo: venv
	MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=1073741824 \
		$(VPY) examples/movielens/train.py --compare --epochs 1

test: venv
	$(VPY) -m pytest -q tests integration_tests

bench: venv
	$(VPY) -m recd_plugin.bench dedup

# Build/test leftovers. Keeps .venv (use `make distclean` to remove it too).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
