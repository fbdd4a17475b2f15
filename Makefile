# hpcllm — the two commands of the README:
#   make demo   prepare the embedded corpus, train a small GPT on 2 MPI ranks, plot, sample
#   make test   system packages, venv, Horovod build, local Slurm, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMP_NUM_THREADS ?= 1
SLURM_BASE ?= /tmp/hpcllm-slurm
PYTEST_ARGS ?=

.PHONY: demo test system-deps venv horovod slurm-up slurm-down bench clean

system-deps:
	bash scripts/install_system_deps.sh

# mpi4py is built from source so it links the system Open MPI that mpirun and srun use
$(VENV)/.installed: setup.py | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --no-binary mpi4py "mpi4py>=3.1"
	$(PIP) install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

horovod: venv
	bash scripts/build_horovod.sh $(PY)

slurm-up: system-deps
	HPCLLM_SLURM_BASE=$(SLURM_BASE) bash slurm/local/start.sh

slurm-down:
	HPCLLM_SLURM_BASE=$(SLURM_BASE) bash slurm/local/stop.sh

test: venv horovod slurm-up
	. $(SLURM_BASE)/env.sh && $(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/hpcllm demo

bench: venv
	mpirun -np 2 --bind-to none $(VENV)/bin/hpcllm bench allreduce --backend mpi,torch

clean:
	rm -rf $(VENV) build *.egg-info runs
