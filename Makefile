# nextbest — every step a user or CI needs; `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
NEXTBEST := $(VENV)/bin/nextbest
SHARED ?= ../shared/data
DATA ?= data
MODELS ?= models
# HTML reports of `make evaluate` / `evaluate-cj` / `evaluate-lgsr` (index.html and PNG figures;
# ignored by git).
REPORTS ?= reports
# The public data sets carry no consent records; the demo and evaluation treat every customer as
# having consented. Production runs keep the privacy-by-default `deny`.
DEMO_CONSENT := --default-consent allow
# The consent and event store of the demo and `make serve` (SQLite; see README for PostgreSQL).
STORE ?= sqlite:///$(DATA)/store.db
OR_EVENTS := $(DATA)/online-retail/events.parquet
OR_CONTENT := $(DATA)/online-retail/content.parquet
CJ_EVENTS := $(DATA)/complete-journey/events.parquet
CJ_CONTENT := $(DATA)/complete-journey/content.parquet
LGSR_EVENTS := $(DATA)/lgsr/events.parquet
LGSR_CONTENT := $(DATA)/lgsr/content.parquet
OR_CUTOFF := 2011-11-01
CJ_CUTOFF := 2017-12-01
# dunnhumby Let's Get Sort-of-Real: 4 shop weeks are missing, the last 28 (2007-10-29 ..
# 2008-07-06) have no gap; the cutoff sits in them.
LGSR_CUTOFF := 2008-04-01
CDNOW_EVENTS := $(DATA)/cdnow/events.parquet
AUDIT_MODELS ?= als bpr cosine bm25
# What fits ALS in `make train`: implicit (this machine) or spark (Apache Spark MLlib ALS on
# SPARK_MASTER, local[*] by default; README "Training on Apache Spark").
ENGINE ?= implicit
SPARK_MASTER ?= local[*]

.PHONY: install install-dev install-report install-spark install-all test lint mutate train evaluate evaluate-cj evaluate-lgsr evaluate-lifecycle bench-train bench-serve bench-aio bench-swap bench-overload bench-scale bench-soak audit-privacy replay prepare clean demo serve proto docs chromium java parity-spark

# The runtime alone (what the demo, train, serve and the benchmarks need); each extra on top when a
# target needs it: dev (tests, lint, make proto), report (evaluate's HTML report: matplotlib),
# spark (--engine spark: pyspark, about 400 MB). `make test` installs all of them.
$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e .
	rm -f $(VENV)/.installed-*
	touch $@

$(VENV)/.installed-%: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-report: $(VENV)/.installed-report
install-spark: $(VENV)/.installed-spark
install-all: install-dev install-report install-spark

# Headless Chromium renders the evaluation report in tests/test_report.py: Debian's `chromium`
# package, installed here when missing (as root, else through sudo). When CI is true the test fails
# without it; elsewhere it skips and says why.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { \
		echo "installing Debian's chromium (headless browser for the report test)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# The Node.js example client's packages (examples/node, pinned by its package-lock.json), for
# tests/test_node_client.py. Without npm: an error when CI is true (true, 1 or yes); elsewhere a warning (the test skips).
NODE_DEPS := examples/node/node_modules/.package-lock.json
$(NODE_DEPS): examples/node/package.json examples/node/package-lock.json
	@command -v npm >/dev/null || { \
		case "$${CI,,}" in 1|true|yes) echo "error: npm not found (Node.js 20+ is required in CI)"; exit 1;; esac; \
		echo "warning: npm not found: the Node.js client tests will be skipped"; exit 0; }; \
	cd examples/node && npm ci --ignore-scripts --no-audit --no-fund && touch node_modules/.package-lock.json

# Java for the Spark engine and tests/test_spark.py (Spark 4 runs on Java 17 or 21): Debian's
# headless JRE, installed here when missing.
java:
	@command -v java >/dev/null || { \
		echo "installing Debian's openjdk-17-jre-headless (Java for the Spark engine)"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }

test: install-all chromium java $(NODE_DEPS)
	$(PY) -m pytest

# Mutation testing (README "Tests"): mutmut on the privacy, consent, auth and request-validation
# rules against the fast in-process tests that reach them; prints the score per module group,
# the equivalent mutants by reason and every other survivor; fails under 90%. About 13 minutes
# here (mutants/ is rebuilt each time; ignored by git).
mutate: install-dev
	$(PY) benchmarks/mutate.py

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

# One prepare run writes both (grouped target): a data/ prepared before content existed is redone.
$(OR_EVENTS) $(OR_CONTENT) &: | install
	$(NEXTBEST) prepare online-retail --source $(SHARED)/online_retail_uci --out $(DATA)/online-retail

$(CJ_EVENTS) $(CJ_CONTENT) &: | install
	$(NEXTBEST) prepare complete-journey --source $(SHARED)/dunnhumby_complete_journey --out $(DATA)/complete-journey

$(LGSR_EVENTS) $(LGSR_CONTENT) &: | install
	$(NEXTBEST) prepare lgsr --source $(SHARED)/dunnhumby_lgsr_sample --out $(DATA)/lgsr

$(CDNOW_EVENTS): | install
	$(NEXTBEST) prepare cdnow --source $(SHARED)/cdnow --out $(DATA)/cdnow

# Churn risk (EVALUATION.md): AUC against recency alone and BG/NBD, calibration by decile, at a
# cutoff 90 days (lifecycle.horizon_days) before each data set's end; on CDNOW at the BG/NBD
# paper's week 39, with its 39-week holdout check.
evaluate-lifecycle: install $(OR_EVENTS) $(CJ_EVENTS) $(LGSR_EVENTS) $(CDNOW_EVENTS)
	$(NEXTBEST) lifecycle evaluate --events $(OR_EVENTS) --cutoff 2011-09-10
	$(NEXTBEST) lifecycle evaluate --events $(CJ_EVENTS) --cutoff 2017-10-03
	$(NEXTBEST) lifecycle evaluate --events $(LGSR_EVENTS) --cutoff 2008-04-08
	$(NEXTBEST) lifecycle evaluate --events $(CDNOW_EVENTS) --cutoff 1997-10-01 --holdout-days 273

prepare: $(OR_EVENTS) $(CJ_EVENTS) $(LGSR_EVENTS)

train: install $(OR_EVENTS) $(OR_CONTENT) $(if $(filter spark,$(ENGINE)),java install-spark)
	$(NEXTBEST) train --events $(OR_EVENTS) --catalog $(DATA)/online-retail/catalog.parquet \
		--content $(OR_CONTENT) --models-dir $(MODELS) --store $(STORE) $(DEMO_CONSENT) \
		--engine $(ENGINE) $(if $(filter spark,$(ENGINE)),--spark-master '$(SPARK_MASTER)')

# The time-split evaluation: prints the tables and writes the HTML report (metrics at k = 1..20
# per model against the baselines, coverage and popularity bias, active days in the last 30 days,
# monthly cohort retention) to $(REPORTS)/online-retail/index.html.
evaluate: install-report $(OR_EVENTS)
	$(NEXTBEST) evaluate --events $(OR_EVENTS) --catalog $(DATA)/online-retail/catalog.parquet \
		--cutoff $(OR_CUTOFF) $(DEMO_CONSENT) --report $(REPORTS)/online-retail

evaluate-cj: install-report $(CJ_EVENTS)
	$(NEXTBEST) evaluate --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet \
		--cutoff $(CJ_CUTOFF) $(DEMO_CONSENT) --report $(REPORTS)/complete-journey

# The held-out check: every default was chosen on Online Retail and Complete Journey and is run
# unchanged here, on a UK grocer's loyalty sample (dunnhumby LGSR, 2006-2008) they were not tuned
# on, with the cutoff in its gap-free last 28 weeks.
evaluate-lgsr: install-report $(LGSR_EVENTS)
	$(NEXTBEST) evaluate --events $(LGSR_EVENTS) --catalog $(DATA)/lgsr/catalog.parquet \
		--cutoff $(LGSR_CUTOFF) $(DEMO_CONSENT) --report $(REPORTS)/lgsr

# The Spark engine against implicit on Complete Journey at 2017-12-01 (EVALUATION.md): both
# `nextbest evaluate` runs, NDCG@10 of the blend and ALS in both protocols, fit time and peak memory
# (JVM included); fails when Spark's blend falls below 0.95 of implicit's. About 20 minutes here.
parity-spark: install-spark java $(CJ_EVENTS)
	$(PY) benchmarks/parity_spark.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet \
		--cutoff $(CJ_CUTOFF) --spark-master '$(SPARK_MASTER)'

bench-train: install $(CJ_EVENTS)
	$(PY) benchmarks/bench_train.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet

# The server under load against a bare gRPC echo server and a bare implicit batch recommend, all in
# one run; trains its own ALS-only model into $(DATA)/bench-serve once, updates BENCHMARKS.md.
bench-serve: install-dev $(CJ_EVENTS)
	$(PY) benchmarks/bench_serve.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet --write

# grpcio's sync server against grpc.aio (answers in the event loop, or in a thread pool), one
# process each, the same bare answer path: decides issue #13's "sync or asyncio" by measurement.
bench-aio: install-dev $(CJ_EVENTS)
	$(PY) benchmarks/aio_probe.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet

# A model swap under 80% of the measured load: refusals and p99 per 5 s around it.
bench-swap: install-dev $(CJ_EVENTS) $(NODE_DEPS)
	$(PY) benchmarks/bench_swap.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet

# RecommendProducts at 3× the measured capacity for 60 s between two spells at 80%, with admission
# control (as shipped) and without: p99 of admitted calls, how fast refusals come, recovery time.
bench-overload: install-dev $(CJ_EVENTS) $(NODE_DEPS)
	$(PY) benchmarks/bench_overload.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet --write

# The chain at 10k, 100k and 1M customers of a synthetic retailer (benchmarks/synth.py, 100k
# products, 50 events per customer): train (ALS only), server start, RSS, RecommendProducts p50/p99,
# a stream; updates BENCHMARKS.md. Data and models stay in $(DATA)/bench-scale. About 30 minutes.
SCALE_SIZES ?= 10000 100000 1000000
bench-scale: install
	$(PY) benchmarks/bench_scale.py --sizes $(SCALE_SIZES) --work-dir $(DATA)/bench-scale --write

# Ten minutes of mixed traffic (recommendations, content, similar products, events, consent
# changes, erasures, streams, audiences, model info) in the production configuration: two replicas
# (`nextbest serve` with TLS, a bearer token and serve.processes as shipped) on one PostgreSQL that
# the run starts itself (initdb in a temporary directory, its own port; needs PostgreSQL's server
# programs), open loop at 80% of the capacity measured first in the same run; faults at minutes 3
# (PostgreSQL restart), 5 (kill -9 of a replica), 7 (a corrupt model published) and 8 (token
# rotation by SIGHUP), a model swap at 6; then every acknowledged write is read back from the store.
# Per-minute calls, failures by cause, failovers, p50/p99 and each replica's memory; updates
# BENCHMARKS.md; fails on a failed call outside the faults, a lost write or a wrong answer
# (`benchmarks/bench_soak.py --minutes 2` for a short run, the faults scaled).
bench-soak: install-dev $(CJ_EVENTS) $(CJ_CONTENT)
	$(PY) benchmarks/bench_soak.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet \
		--content $(CJ_CONTENT) --write

# The privacy rules (SPEC §5) through the running server on Complete Journey: baby, health and
# tobacco categories and the SPIRITS department sensitive, half the households without sensitive
# consent; once per servable model (AUDIT_MODELS: every train.cf_model), each trained into
# $(DATA)/audit-privacy/<model>; prints the counts, fails on a leak (the first model that leaks
# stops the run).
# The content is written by the same `nextbest prepare` as the events (redone for a
# data/complete-journey prepared before content existed).
audit-privacy: install $(CJ_EVENTS) $(CJ_CONTENT)
	@set -e; for model in $(AUDIT_MODELS); do \
		echo "== make audit-privacy: train.cf_model = $$model"; \
		$(PY) benchmarks/audit_privacy.py --events $(CJ_EVENTS) \
			--catalog $(DATA)/complete-journey/catalog.parquet --content $(CJ_CONTENT) \
			--cf-model $$model --work-dir $(DATA)/audit-privacy/$$model; \
	done

# Real history through the live server (EVALUATION.md, "Replay"): trains on Complete Journey before
# 2017-12-01, serves it with an experiment (the served model against a best-seller holdout) and
# walks day by day through every household's December purchases: recommendations (web) before
# each shopping day, then that day's purchases through Events.RecordEvents; prints `nextbest
# experiments report` and fails on a failed call. Work files in $(DATA)/replay. About 10 minutes.
replay: install $(CJ_EVENTS)
	$(PY) benchmarks/replay.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet \
		--work-dir $(DATA)/replay

clean:
	rm -rf $(VENV) $(DATA) $(REPORTS) build src/*.egg-info examples/node/node_modules

# The quick start: install, prepare the real Online Retail data, train and publish, start the gRPC
# server on a free port, query it with the example client (three real customers, similar products
# for a real product, scores of generated guides), then stop the server with SIGTERM.
DEMO_LOG := $(DATA)/demo-server.log
demo: train
	@set -e; \
	$(NEXTBEST) serve --insecure --models-dir $(MODELS) --port 0 --metrics-port 0 --store $(STORE) $(DEMO_CONSENT) \
		> $(DEMO_LOG) 2>&1 & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null || true; wait $$pid || true' EXIT; \
	for i in $$(seq 300); do \
		grep -q '^nextbest serving on' $(DEMO_LOG) && break; \
		kill -0 $$pid 2>/dev/null || { cat $(DEMO_LOG); echo "error: the server stopped"; exit 1; }; \
		sleep 0.2; \
	done; \
	addr=$$(sed -n 's/^nextbest serving on //p' $(DEMO_LOG)); \
	test -n "$$addr" || { cat $(DEMO_LOG); echo "error: the server did not start"; exit 1; }; \
	echo "server on $$addr (log: $(DEMO_LOG))"; \
	$(PY) examples/client.py --address $$addr --customers 12347 14911 17850 --product 85123A \
		--content guide-mug guide-holder guide-bag guide-sign guide-candles

# Run the server on the CURRENT model (settings: CONFIG=path/to/nextbest.toml; see README).
# Without CONFIG it runs plaintext without tokens (--insecure): a local development server.
serve: install
	$(NEXTBEST) serve --models-dir $(MODELS) --store $(STORE) $(if $(CONFIG),--config $(CONFIG),--insecure) \
		$(DEMO_CONSENT)

# Regenerate README's configuration reference from src/nextbest/config.py (a test checks it).
docs: install
	$(PY) -m nextbest.config README.md

# Regenerate the Python code of protos/ into src/nextbest/v1 (committed; a test checks it).
proto: install-dev
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=src --pyi_out=src --grpc_python_out=src \
		protos/nextbest/v1/*.proto
