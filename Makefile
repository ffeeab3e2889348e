# nextbest — every step a user or CI needs; `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
NEXTBEST := $(VENV)/bin/nextbest
SHARED ?= ../shared/data
DATA ?= data
MODELS ?= models
# The public data sets carry no consent records; the demo and evaluation treat every customer as
# having consented. Production runs keep the privacy-by-default `deny`.
DEMO_CONSENT := --default-consent allow
OR_EVENTS := $(DATA)/online-retail/events.parquet
OR_CONTENT := $(DATA)/online-retail/content.parquet
CJ_EVENTS := $(DATA)/complete-journey/events.parquet
OR_CUTOFF := 2011-11-01
CJ_CUTOFF := 2017-12-01

.PHONY: install test lint train evaluate evaluate-cj bench-train prepare clean demo

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==25.3
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# One prepare run writes both (grouped target): a data/ prepared before content existed is redone.
$(OR_EVENTS) $(OR_CONTENT) &: | install
	$(NEXTBEST) prepare online-retail --source $(SHARED)/online_retail_uci --out $(DATA)/online-retail

$(CJ_EVENTS): | install
	$(NEXTBEST) prepare complete-journey --source $(SHARED)/dunnhumby_complete_journey --out $(DATA)/complete-journey

prepare: $(OR_EVENTS) $(CJ_EVENTS)

train: install $(OR_EVENTS) $(OR_CONTENT)
	$(NEXTBEST) train --events $(OR_EVENTS) --catalog $(DATA)/online-retail/catalog.parquet \
		--content $(OR_CONTENT) --models-dir $(MODELS) $(DEMO_CONSENT)

evaluate: install $(OR_EVENTS)
	$(NEXTBEST) evaluate --events $(OR_EVENTS) --catalog $(DATA)/online-retail/catalog.parquet \
		--cutoff $(OR_CUTOFF) $(DEMO_CONSENT)

evaluate-cj: install $(CJ_EVENTS)
	$(NEXTBEST) evaluate --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet \
		--cutoff $(CJ_CUTOFF) $(DEMO_CONSENT)

bench-train: install $(CJ_EVENTS)
	$(PY) benchmarks/bench_train.py --events $(CJ_EVENTS) --catalog $(DATA)/complete-journey/catalog.parquet

clean:
	rm -rf $(VENV) $(DATA) build src/*.egg-info

# The quick start: install, prepare the real Online Retail data, train and publish, then export the
# served ranking for three real customers. (The gRPC server joins the demo with the serving issue.)
demo: train
	@printf 'customer_id\n12347\n14911\n17850\n' > $(DATA)/demo-customers.csv
	$(NEXTBEST) recommend --models-dir $(MODELS) --customers $(DATA)/demo-customers.csv --limit 5 \
		--output $(DATA)/demo-recommendations.csv $(DEMO_CONSENT)
	@$(PY) -c "import pyarrow.csv as c, pyarrow.parquet as q; \
	r = c.read_csv('$(DATA)/demo-recommendations.csv', convert_options=c.ConvertOptions(column_types={'customer_id': 'string', 'product_id': 'string'})); \
	t = dict(zip(*q.read_table('$(DATA)/online-retail/catalog.parquet', columns=['product_id','title']).to_pydict().values())); \
	[print(f\"{x['customer_id']}  #{x['rank']}  {x['product_id']:<7} {x['score']:.3f}  {t.get(x['product_id'], '')}\") for x in r.to_pylist()]"
