# mpfleet — `make demo` to see it work, `make test` to check it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mpfleet-installed
PYTEST_ARGS ?=
# The store's and the rollout engine's tests, run again with every Store on PostgreSQL
# (tests/conftest.py: MPFLEET_TEST_BACKEND); skipped, saying why, where no server answers.
PG_SUITE := tests/host/test_rollout.py tests/host/test_rollout_stuck.py tests/host/test_cert_scrub.py \
	tests/host/test_strangers.py tests/host/test_dispatchers.py tests/host/test_keys.py tests/host/test_registry.py
PG_STRESS_SUITE := $(PG_SUITE) tests/host/test_certs.py tests/host/test_images.py tests/host/test_export_columns.py \
	tests/host/test_job_truth.py tests/host/test_cli_jobs.py

.PHONY: help install lint test test-fast stress bench demo hil check-firmware clean

help:
	@echo "make test    create .venv, install mpfleet, ensure mosquitto, lint, run the test suite (then the store's tests on PostgreSQL)"
	@echo "make lint    ruff check of the Python code (rules in pyproject.toml)"
	@echo "make test-fast  the unit tests (tests/host, tests/firmware) and the docs parse checks, without the slow sweeps: under a minute"
	@echo "make stress  the long stress runs at full count (power-cut fuzz)"
	@echo "make bench   benchmarks: table on stdout, JSON in bench/results/"
	@echo "make demo    the fleet demo on virtual boards"
	@echo "make hil PORT=/dev/ttyUSB0 [BOARD=esp32-devkitc] [FIRMWARE=micropython.bin]"
	@echo "             flash, deploy and a USB job on a real board"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mpfleet needs Python >= 3.10")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check host_tools tests bench firmware

test: $(STAMP) lint
	@scripts/ensure-mosquitto
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	MPFLEET_TEST_BACKEND=postgresql $(BIN)/python -m pytest -q $(PG_SUITE) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests/host tests/firmware tests/docs $(PYTEST_ARGS)

stress: $(STAMP)
	@scripts/ensure-mosquitto
	MPFLEET_STRESS=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	MPFLEET_STRESS=1 MPFLEET_TEST_BACKEND=postgresql $(BIN)/python -m pytest -q $(PG_STRESS_SUITE) $(PYTEST_ARGS)

check-firmware: $(STAMP)
	$(BIN)/python -m mpfleet.tools.check_firmware

bench: $(STAMP)
	@scripts/ensure-mosquitto
	$(BIN)/python bench/run.py

demo: $(STAMP)
	@scripts/ensure-mosquitto || echo "mosquitto unavailable: the demo falls back to amqtt"
	$(BIN)/python -m mpfleet.demo

hil: $(STAMP)
	@test -n "$(PORT)" || { echo "usage: make hil PORT=/dev/ttyUSB0 [BOARD=esp32-devkitc] [FIRMWARE=micropython.bin]"; exit 2; }
	MPFLEET_HIL_PORT=$(PORT) MPFLEET_HIL_BOARD=$(BOARD) MPFLEET_HIL_FIRMWARE=$(FIRMWARE) \
		$(BIN)/python -m pytest -q -m hil tests/hil/test_hil.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info host_tools/*.egg-info
