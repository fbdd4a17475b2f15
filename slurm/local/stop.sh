#!/usr/bin/env bash
# Stop a local test cluster started by slurm/local/start.sh (by pid file; never by name).
#   bash slurm/local/stop.sh                        stop the daemons, keep state (job ids, accounting DB, key)
#   bash slurm/local/stop.sh --purge                also cancel its jobs first and delete all its state
#   HPCLLM_SLURM_NODES=2 bash slurm/local/stop.sh   the 2-node cluster (or HPCLLM_SLURM_BASE=DIR: any)
set -uo pipefail
NODES=${HPCLLM_SLURM_NODES:-1}
if [ "$NODES" = 1 ]; then BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm}
else BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm-${NODES}node}; fi
export SLURM_CONF=$BASE/etc/slurm.conf

stop() {  # stop PIDFILE COMM
  local pid; pid=$(cat "$1" 2>/dev/null) || return 0
  if [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]; then
    echo "[slurm/local] stopping $2 ($pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do [ -d "/proc/$pid" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] || break; sleep 0.2; done
    [ -d "/proc/$pid" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
}

if [ "${1:-}" = --purge ] && [ -e "$SLURM_CONF" ] && timeout 5 squeue -h >/dev/null 2>&1; then
  timeout 10 scancel --user="$(id -un)" 2>/dev/null   # leave no slurmstepd behind
  for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi
# in reverse order of start (running job steps outlive slurmd: --purge cancels them first)
for pf in "$BASE/run/slurmd.pid" "$BASE"/run/slurmd-*.pid; do [ -e "$pf" ] && stop "$pf" slurmd; done
stop "$BASE/run/slurmctld.pid" slurmctld
stop "$BASE/run/slurmdbd.pid" slurmdbd
stop "$BASE/mysql/mysqld.pid" mariadbd
stop "$BASE/munge/munged.pid" munged
if [ "${1:-}" = --purge ]; then
  echo "[slurm/local] purging $BASE"
  rm -rf "${BASE:?}"/{state,spool,tmp,log,run,mysql,munge,etc,env.sh}
fi
exit 0
