#!/usr/bin/env bash
# Debian/Ubuntu packages hpcllm needs on a fresh machine: Open MPI (mpirun + headers for mpi4py and
# Horovod), Slurm + munge + MariaDB for the local test cluster, hdf5-tools (h5dump/h5ls), cmake.
# Idempotent: installs only what is missing; `apt-get update` only when an install needs it.
set -euo pipefail

# python3-dev: Python.h, for building mpi4py against the system MPI and for torch.compile's CPU kernels
PKGS=(openmpi-bin libopenmpi-dev libpmix2 hdf5-tools cmake g++ make
      slurmctld slurmd slurm-client slurm-wlm-basic-plugins slurmdbd slurm-wlm-mysql-plugin
      munge mariadb-server python3-venv python3-dev)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && { echo "[system-deps] all present"; exit 0; }

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "[system-deps] installing: ${missing[*]}"
# try with the current package lists first (fast), refresh them only if that fails
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" ||
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; }
