# The two commands: `make demo` and `make test`.  Each sets up .venv by itself (idempotent: the
# stamp below is only rebuilt when a file that defines the environment changes).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.quantnoise-stamp
CORPUS ?=
PYTEST_ARGS ?=

.PHONY: demo test peers venv kernels clean

$(STAMP): setup.py scripts/requirements.txt scripts/constraints.txt scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $@

venv: $(STAMP)

# quantnoise.runtime's compiled look-up-table kernel (~20 s once; skipped when built; without a compiler
# the runtime keeps its pure PyTorch kernels)
kernels: $(STAMP)
	$(PY) -m quantnoise.runtime

demo test: kernels

demo: $(STAMP)
	CORPUS="$(CORPUS)" bash recipes/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal $(PYTEST_ARGS) tests

# The optional peers (not needed by `make test`): llama-cpp-python built from source (llama.cpp, CPU; minutes, once),
# torchao, optimum-quanto (scripts/setup_peers.sh); then the tests marked `peers` (GGUF files run in llama.cpp, the
# peers' rows of benchmarks/peers.py)
PEERS_STAMP := $(VENV)/.quantnoise-peers-stamp
$(PEERS_STAMP): $(STAMP) scripts/requirements-peers.txt scripts/setup_peers.sh
	bash scripts/setup_peers.sh
	touch $@

peers: $(PEERS_STAMP) kernels
	$(PY) -m pytest -q -p no:xdist -m peers $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info quantnoise/runtime/csrc/build
