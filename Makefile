# hpcllm — the two commands of the README:
#   make demo   prepare the embedded corpus, train a small GPT on 2 MPI ranks, plot, sample
#   make test   system packages, venv, Horovod build, the local Slurm clusters (1 and 2 nodes), then the
#               whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMP_NUM_THREADS ?= 1
SLURM_BASE ?= /tmp/hpcllm-slurm
SLURM_BASE_2NODE ?= /tmp/hpcllm-slurm-2node
PYTEST_ARGS ?=
# two pytest-xdist workers on this 2-core machine (alone, the suite left a third of it idle): the Slurm
# tests run as one group on one worker, each file's tests together; tests/conftest.py groups them
TEST_WORKERS ?= 2

.PHONY: demo test system-deps venv horovod slurm-up slurm-up-2node slurm-down bench clean

system-deps:
	bash scripts/install_system_deps.sh

# mpi4py is built from source so it links the system Open MPI that mpirun and srun use
$(VENV)/.installed: setup.py constraints.txt | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-binary mpi4py "mpi4py>=3.1"
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

horovod: venv
	bash scripts/build_horovod.sh $(PY)

# the local test clusters (slurm/local): one node, and two fake nodes n1, n2 beside it (own ports)
slurm-up: system-deps
	HPCLLM_SLURM_BASE=$(SLURM_BASE) bash slurm/local/start.sh

slurm-up-2node: system-deps
	HPCLLM_SLURM_NODES=2 HPCLLM_SLURM_BASE=$(SLURM_BASE_2NODE) bash slurm/local/start.sh

slurm-down:
	HPCLLM_SLURM_BASE=$(SLURM_BASE) bash slurm/local/stop.sh
	HPCLLM_SLURM_NODES=2 HPCLLM_SLURM_BASE=$(SLURM_BASE_2NODE) bash slurm/local/stop.sh

# tests pick a cluster through SLURM_CONF (tests/slurm_util.py: slurm_env(two_node=True))
test: venv horovod slurm-up slurm-up-2node
	. $(SLURM_BASE)/env.sh && HPCLLM_SLURM_BASE=$(SLURM_BASE) HPCLLM_SLURM_BASE_2NODE=$(SLURM_BASE_2NODE) \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/hpcllm demo

bench: venv
	mpirun -np 2 --bind-to none $(VENV)/bin/hpcllm bench allreduce --backend mpi,torch

clean:
	rm -rf $(VENV) build *.egg-info runs
