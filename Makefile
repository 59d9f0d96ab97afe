# Tandem: every target uses the project's own virtual environment in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TANDEM := $(VENV)/bin/tandem
STAMP  := $(VENV)/.installed
CERTS  ?= .certs
AGENTS ?= edge-1,edge-2,edge-3,edge-4
# Task packages to copy (examples/*/README.md), installed editable beside Tandem: their
# entry points (tandem.tasks) make `resnet` and `forecast` known to the cloud and agents.
EXAMPLES := examples/resnet examples/forecast examples/traffic

.PHONY: install protos certs run test test-quick lint typecheck traffic traffic-ablation bench-fl bench-fl-shaped bench-auto bench-infer bench-placement bench-scale reliability fuzz gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml $(EXAMPLES:%=%/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,traffic]'
	$(PY) -m pip install --quiet --disable-pip-version-check $(EXAMPLES:%=-e %)
	touch $(STAMP)

# Regenerate the checked-in Python code (messages, stubs, services) from protos/.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=services --pyi_out=services \
		--grpc_python_out=services protos/tandem/v1/*.proto

certs: $(STAMP)
	test -f $(CERTS)/ca.pem || $(TANDEM) certs init --dir $(CERTS) --agents $(AGENTS)

# The demo: a coordinator and 4 agents on loopback, 10 rounds of federated training.
run: $(STAMP) certs
	$(TANDEM) demo --certs $(CERTS) --agents 4 --rounds 10

# Strict typing of everything but the generated code (and of the examples).
typecheck: $(STAMP)
	$(VENV)/bin/mypy -p tandem -p cloud -p edge -p region -p tandem_cli -p tandem_lab
	$(VENV)/bin/mypy $(foreach e,$(EXAMPLES),$(e)/tandem_example_$(notdir $(e)))

# Lint rules (pyproject.toml [tool.ruff]): pyflakes, pycodestyle, bugbear, import order, naming.
lint: $(STAMP)
	$(VENV)/bin/ruff check services tests examples

test: lint typecheck
	$(PY) -m pytest -q

# The tests that neither take long nor start processes (pyproject.toml [tool.pytest.ini_options] markers).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not process"

# The traffic application (docs/traffic.md): SUMO history, federated forecaster across the
# district agents, every planning strategy on 20 days, district 0's link cut (12-17 minutes on 2 cores).
traffic: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,traffic]'
	$(PY) -m tandem_example_traffic.bench --out bench/results/traffic.json

# What planning needs: the planner's inputs varied one at a time on 20 days, in process (~15 minutes).
traffic-ablation: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,traffic]'
	$(PY) -m tandem_example_traffic.ablation --days 20 --out bench/results/traffic-ablation.json

# Federated training per codec with real processes (not part of `make test`). FLOWER=PYTHON (an
# interpreter with flwr==1.42.0 and torch==2.13.0, e.g. a venv of its own) runs Flower beside it.
FLOWER ?=
bench-fl: $(STAMP)
	$(PY) -m tandem_lab bench fl --clients 8 --rounds 20 --codec none,topk:0.01+int8 --rss-agents 64 \
		$(if $(FLOWER),--flower $(FLOWER)) --out bench/results/fl.json

# The same workload with every agent and every Flower client in a network namespace of its own
# behind a 20 Mbit/s link with 40 ms of round-trip time (needs root for ip netns and tc; refuses,
# exit 2, otherwise). FLOWER=PYTHON as above: without it only Tandem runs.
bench-fl-shaped: $(STAMP)
	$(PY) -m tandem_lab bench fl --clients 8 --rounds 20 --codec none,topk:0.01+int8 --rate 20mbit --rtt 40ms \
		$(if $(FLOWER),--flower $(FLOWER)) --out bench/results/fl-shaped.json

# Codec auto with two agents behind a bandwidth-shaped link (needs root for ip netns).
bench-auto: $(STAMP)
	$(PY) -m tandem_lab bench auto --rounds 6 --rate 1mbit --target 1.0 --out bench/results/auto.json

# Inference serving under load against an echo server and in-process forward passes,
# hot swaps, and edge placements and a cascade through an agent (~5 minutes).
bench-infer: $(STAMP)
	$(PY) -m tandem_lab bench infer --seconds 10 --swap-seconds 30 --out bench/results/infer.json

# Adaptive placement against every static placement on a weak edge whose shaped link follows
# a trace; then four agents (needs root for ip netns, tc and cgroups; about 24 minutes).
bench-placement: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(PY) -m tandem_lab.bench_placement --phase-seconds 30 --agents 1,4 --out bench/results/placement.json

# Regional aggregators (issue 20): 10,000 light agents over 20 `tandem region` processes against one flat
# coordinator, 8 real agents flat and under 2 regions, a region killed mid-round (about 6.5 minutes on 2 cores).
bench-scale: $(STAMP)
	$(PY) -m tandem_lab.bench_scale --agents 10000 --regions 20 --selected 300 --rounds 5 --heartbeat 20 \
		--out bench/results/scale.json

# Poisoning, churn, coordinator crashes, link faults, 500 agents, a 1 GB model, fuzzing: docs/reliability.md.
reliability: $(STAMP)
	$(PY) -m tandem_lab.reliability --out bench/results/reliability.json

# Hostile messages against every RPC of an in-process coordinator and edge agent (~70 s).
fuzz: $(STAMP)
	$(PY) -m tandem_lab.fuzz --cases 10000 --out bench/results/fuzz.json

# Cloud inference on cuda against CPU (relative error < 1e-4); skips without a GPU.
gpu-check: $(STAMP)
	$(PY) -m tandem_lab gpu-check --out bench/results/gpu.json

clean:
	rm -rf $(VENV) $(CERTS) .state .pytest_cache
