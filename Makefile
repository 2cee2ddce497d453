# The two commands: `make run` and `make test`. Both create their virtualenvs and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVER_STAMP := $(VENV)/.server
HOST ?= 127.0.0.1
PORT ?= 8080
PIP_INSTALL = -m pip install --quiet --disable-pip-version-check

# The second test leg: the newest Python here that is 3.12+ (App Engine runs 3.13; Django 6 needs 3.12+).
PYTHON_NEW ?= $(shell for p in python3.13 python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.13*/bin/python \
	$${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
VENV_NEW ?= .venv-new
STAMP_NEW := $(VENV_NEW)/.installed

.PHONY: run test lint test-main test-new bench keys-new keys-list keys-retire deploy clean

# `make run` needs only the server's dependencies; the tests add their tools to the same virtualenv.
$(SERVER_STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) -r requirements.txt -e .
	touch $@

$(STAMP): $(SERVER_STAMP)
	$(PY) $(PIP_INSTALL) -r requirements.txt -e '.[test]' 'django>=5.2,<6'
	touch $@

$(STAMP_NEW): pyproject.toml requirements.txt
	$(PYTHON_NEW) -m venv $(VENV_NEW)
	$(VENV_NEW)/bin/python $(PIP_INSTALL) -r requirements.txt -e '.[test]' 'django>=6,<7'
	touch $@

run: $(SERVER_STAMP)
	$(PY) mailer.py --host $(HOST) --port $(PORT) --create-dev-key

# The two legs run side by side (CI has two cores; much of a leg waits on real servers and sockets).
test: lint
	$(MAKE) -j2 --output-sync=target test-main test-new

# Style and types, as the model codebases check them: on every `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test-main: $(STAMP)
	$(PY) -m pytest -q

ifeq ($(PYTHON_NEW),)
test-new:
	@echo "SKIPPED the Python 3.12+/Django 6 leg: no python3.12 or newer on this machine (set PYTHON_NEW=...)"
else
test-new: $(STAMP_NEW)
	$(VENV_NEW)/bin/python -m pytest -q -p no:cacheprovider
endif

bench: $(STAMP)
	$(PY) bench/bench_server.py
	$(PY) bench/bench_client.py

keys-new: $(SERVER_STAMP)
	$(PY) mailer.py keys new

keys-list: $(SERVER_STAMP)
	$(PY) mailer.py keys list

keys-retire: $(SERVER_STAMP)
	@test -n "$(FP)" || { echo "usage: make keys-retire FP=<fingerprint from make keys-list>"; exit 64; }
	$(PY) mailer.py keys retire $(FP)

deploy:
	@test -n "$(PROJECT)" || { echo "usage: make deploy PROJECT=<your Google Cloud project id>"; exit 64; }
	@test -s keys/GMAIL_SECRET_KEY || { echo "no keys/GMAIL_SECRET_KEY: run make keys-new first"; exit 78; }
	gcloud app deploy app.yaml --project "$(PROJECT)"

clean:
	rm -rf $(VENV) $(VENV_NEW) .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
