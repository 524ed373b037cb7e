# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and install what they need; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeship-installed
# Device-side code must run on Python 3.10 (JetPack 6): a second venv runs those tests there.
VENV310 := .venv-py310
STAMP310 := $(VENV310)/.edgeship-installed
PYTHON310 ?= $(shell for p in $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10 2>/dev/null) \
               $$(command -v python3.10); do "$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done)
# Devices that have only tflite-runtime 2.14 (numpy 1 only): a third venv runs the LiteRT backend there.
VENVTFL := .venv-tflite
STAMPTFL := $(VENVTFL)/.edgeship-installed
PIP_QUIET := -q --disable-pip-version-check
# One thread per test worker, no model hubs.
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
            OPENBLAS_NUM_THREADS=1 TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \
            TF_CPP_MIN_LOG_LEVEL=2 HYPOTHESIS_PROFILE=ci

.PHONY: demo test lint typecheck unit test310 install install310 installtfl mosquitto clean

demo: install mosquitto
	$(TEST_ENV) $(PY) -m examples.demo

test: install install310 installtfl mosquitto lint typecheck unit test310

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy -p edgeship

unit: install mosquitto
	$(TEST_ENV) $(VENV)/bin/pytest -n 2 -m "not py310_only"

test310: install310
	$(TEST_ENV) $(VENV310)/bin/pytest -m py310 -p no:cacheprovider -q -n 2

install: $(STAMP)
install310: $(STAMP310)
installtfl: $(STAMPTFL)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, from the CPU wheel: anything that pulls torch before would fetch a CUDA build.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install $(PIP_QUIET) --upgrade pip
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt torch==2.13.0
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e '.[all,dev]'
	touch $@

# onnx only for the tests, which build small models with it; the device-side code never imports it.
$(STAMP310): pyproject.toml constraints-py310.txt
	@if [ -z "$(PYTHON310)" ]; then \
	  echo "python3.10 not found: install it to run the device-side tests on Python 3.10" >&2; exit 1; \
	fi
	[ -x $(VENV310)/bin/python ] || $(PYTHON310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(VENV310)/bin/python -m pip install $(PIP_QUIET) -c constraints-py310.txt -e '.[litert,ort,agent]' pytest pytest-xdist hypothesis onnx
	touch $@

$(STAMPTFL): pyproject.toml constraints-tflite.txt
	[ -x $(VENVTFL)/bin/python ] || $(PYTHON) -m venv $(VENVTFL)
	$(VENVTFL)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(VENVTFL)/bin/python -m pip install $(PIP_QUIET) -c constraints-tflite.txt tflite-runtime==2.14.0 -e .
	touch $@

# Tests start their own broker on a free port; they only need the binary. strace records the agent's
# file-system calls for tests/device_agent/test_power_loss.py (skipped, not failed, without it).
# chromium is the browser the dashboard's tests drive with Playwright (tests/fleet/test_dashboard_browser.py,
# skipped, not failed, without /usr/bin/chromium); Playwright's own browser download is not used.
mosquitto:
	@pkgs=""; \
	{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || pkgs="mosquitto"; \
	{ command -v strace >/dev/null 2>&1 || [ -x /usr/bin/strace ]; } || pkgs="$$pkgs strace"; \
	[ -x /usr/bin/chromium ] || pkgs="$$pkgs chromium"; \
	pkgs="$${pkgs# }"; \
	if [ -z "$$pkgs" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "installing $$pkgs (apt-get)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkgs; \
	elif [ "$${pkgs#mosquitto}" = "$$pkgs" ]; then \
	  echo "$$pkgs missing and we are not root: the power-loss test (strace) or the dashboard's browser tests (chromium) will be skipped ('sudo apt-get install $$pkgs' runs them)" >&2; \
	else \
	  echo "$$pkgs is missing and we are not root: run 'sudo apt-get install $$pkgs', then retry" >&2; exit 1; \
	fi

clean:
	rm -rf $(VENV) $(VENV310) $(VENVTFL) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
