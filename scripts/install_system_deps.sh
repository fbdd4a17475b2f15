#!/usr/bin/env bash
# Debian/Ubuntu packages hpcllm needs on a fresh machine: Open MPI (mpirun + headers for mpi4py and
# Horovod), Slurm + munge + MariaDB for the local test cluster, hdf5-tools (h5dump/h5ls), cmake,
# Prometheus (with promtool) and its Pushgateway for the monitoring tests (tests/monitor starts its
# own on loopback ports; the packages' services play no part).
# Idempotent: installs only what is missing; `apt-get update` only when an install needs it.
set -euo pipefail

# python3-dev: Python.h, for building mpi4py against the system MPI and for torch.compile's CPU kernels
PKGS=(openmpi-bin libopenmpi-dev libpmix2 hdf5-tools cmake g++ make
      slurmctld slurmd slurm-client slurm-wlm-basic-plugins slurmdbd slurm-wlm-mysql-plugin
      munge mariadb-server python3-venv python3-dev prometheus prometheus-pushgateway)

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
# Debian starts the Prometheus and Pushgateway services it installs, listening on every interface
# (:9090, :9091) without authentication; the tests run their own on loopback, so the services we just
# installed are stopped and disabled (`systemctl enable --now prometheus` brings one back)
if [ -d /run/systemd/system ]; then
  for svc in prometheus prometheus-pushgateway; do
    if [[ " ${missing[*]} " == *" $svc "* ]]; then
      $SUDO systemctl disable --now "$svc.service" 2>/dev/null && echo "[system-deps] stopped and disabled $svc.service" || true
    fi
  done
fi
