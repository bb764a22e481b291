# make demo: install, build the sst2 exit store from bundled data, classify a few sentences.
# make test: install, lint (ruff, mypy) and run the whole test suite; make test-fast: the inner loop (no slow or
# real-model tests, no lint), under a minute.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STORE := stores/sst2
# Extra raee-index build flags for the demo store (default: none; the build calibrates the served policy itself).
SST2_SETTINGS ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install proto demo lint test test-fast store-sst2 tune-sst2 eval-sst2 clean

# The generated gRPC code (service/generated/, not committed) has one route: this step, from proto/, whenever the
# proto is newer. Importing never generates; service.api says to run `make install` when the code is missing.
GENERATED := service/generated/raee/v1/raee_pb2_grpc.py

install: $(VENV)/.installed $(GENERATED)

# torch is pinned here: 2.13.0 has a CPU build on disk; an open range would pull CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $@

$(GENERATED): proto/raee/v1/raee.proto | $(VENV)/.installed
	$(BIN)/python -m service.protos

proto: install
	$(BIN)/python -m service.protos

$(STORE)/CURRENT: | $(VENV)/.installed
	$(BIN)/raee-index build --task sst2 --train data/sst2/train.jsonl --out $(STORE) $(SST2_SETTINGS)

store-sst2: install
	$(BIN)/raee-index build --task sst2 --train data/sst2/train.jsonl --out $(STORE) $(SST2_SETTINGS)

demo: install $(STORE)/CURRENT
	$(BIN)/python examples/demo.py --store $(STORE)

# ruff lints and sorts imports (format checking is left out: formatting the whole tree would touch every line);
# mypy is strict on raee/, indexer/ and service/ alike (pyproject.toml; the generated protobuf code is skipped).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

PYTEST_ARGS ?=  # e.g. make test PYTEST_ARGS="--durations=20 -x"
test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not real_model" $(PYTEST_ARGS)

tune-sst2: install
	$(BIN)/raee-index tune --task sst2 --train data/sst2/train.jsonl --keys prefix:0,prefix:1,prefix:2,prefix:3,embedder \
	  --depth-budget 0.75

eval-sst2: install $(STORE)/CURRENT
	$(BIN)/raee-eval --store $(STORE) --test data/sst2/test.jsonl --policies raee,full,static:2,static:4

clean:
	rm -rf $(VENV) stores .pytest_cache .mypy_cache .ruff_cache

# The seven-task suite of docs/RESULTS.md: one store per task at default settings (the build calibrates the served
# policy: match-full), every policy on every test file once, the cross-domain table over the tasks that share labels
# (sst2, mr, cr, mpqa), and one store's calibration curve as a plot.
DATA ?= ../shared/data
SUITE_TASKS := sst2 sst5 mr cr mpqa subj cola
SUITE_OUT ?= out/suite
.PHONY: results
results: install
	mkdir -p $(SUITE_OUT)
	for t in $(SUITE_TASKS); do \
	  [ -f $(SUITE_OUT)/stores/$$t/CURRENT ] || $(BIN)/raee-index build --task $$t --train $(DATA)/$$t/train.jsonl \
	    --out $(SUITE_OUT)/stores/$$t --no-progress > $(SUITE_OUT)/build-$$t.txt || exit 1; done
	$(BIN)/raee-eval --suite --cross-domain --no-progress \
	  $(foreach t,$(SUITE_TASKS),--store $(SUITE_OUT)/stores/$(t) --test $(DATA)/$(t)/test.jsonl) \
	  --json $(SUITE_OUT)/results.json --plot $(SUITE_OUT)/policies.png | tee $(SUITE_OUT)/results.md
	$(BIN)/raee-index inspect $(SUITE_OUT)/stores/sst2 --calibration-plot $(SUITE_OUT)/calibration-sst2.png \
	  > $(SUITE_OUT)/inspect-sst2.txt

# raee against the whole model on onnxruntime and torch, one process, interleaved (docs/PERFORMANCE.md).
# make bench-baselines                                  sst2 from data/, the demo's settings
# make bench-baselines TASK=mr TRAIN=../shared/data/mr/train.jsonl TEST=../shared/data/mr/test.jsonl BUILD_ARGS=
TASK ?= sst2
TRAIN ?= data/$(TASK)/train.jsonl
TEST ?= data/$(TASK)/test.jsonl
BUILD_ARGS ?= $(SST2_SETTINGS)
BASELINES := out/baselines/$(TASK)
.PHONY: bench-baselines
bench-baselines: install
	mkdir -p $(BASELINES)
	[ -f $(BASELINES)/fp32/CURRENT ] || $(BIN)/raee-index build --task $(TASK) --train $(TRAIN) \
	  --out $(BASELINES)/fp32 --precision fp32 --no-progress $(BUILD_ARGS)
	[ -f $(BASELINES)/int8/CURRENT ] || $(BIN)/raee-index build --task $(TASK) --train $(TRAIN) \
	  --out $(BASELINES)/int8 --precision int8 --no-progress $(BUILD_ARGS)
	$(BIN)/python bench/baselines.py --store $(BASELINES)/fp32 --store-int8 $(BASELINES)/int8 --test $(TEST) \
	  --json $(BASELINES)/baselines.json | tee $(BASELINES)/baselines.md

# Issue-5 tools: figures for docs/PERFORMANCE.md and docs/RELIABILITY.md (each prints the table it writes).
.PHONY: bench-load bench-cost bench-faiss bench-keys reliability reliability-quick
bench-load: install $(STORE)/CURRENT
	mkdir -p out && $(BIN)/python bench/load.py --store $(STORE) --concurrency 8 --seconds 30 --json out/load.json
bench-cost: install
	mkdir -p out && $(BIN)/python bench/cost_curve.py --repeats 3 \
	  --exit-fractions "raee=0.85,calibrated=0.50,calibrated:best=0.60,oracle=0.27" --json out/cost_curve.json
bench-faiss: install
	mkdir -p out && $(BIN)/python bench/faiss_scale.py --n 1000000 --json out/faiss_scale.json
bench-keys: install
	mkdir -p out && $(BIN)/python bench/key_cost.py --json out/key_cost.json
reliability: install $(STORE)/CURRENT
	mkdir -p out && $(BIN)/python bench/reliability.py --store $(STORE) --soak-seconds 600 --split-cpus \
	  --json out/reliability.json
reliability-quick: install $(STORE)/CURRENT
	$(BIN)/python bench/reliability.py --store $(STORE) --quick --split-cpus
