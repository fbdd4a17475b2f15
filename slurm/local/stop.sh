#!/usr/bin/env bash
# Stop the local test cluster started by slurm/local/start.sh (by pid file; never by name).
#   bash slurm/local/stop.sh           stop the daemons, keep state (job ids, accounting DB, key)
#   bash slurm/local/stop.sh --purge   also cancel jobs first and delete all state
set -uo pipefail
BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm}
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
# slurmd first: it ends the running job steps
stop "$BASE/run/slurmd.pid" slurmd
stop "$BASE/run/slurmctld.pid" slurmctld
stop "$BASE/run/slurmdbd.pid" slurmdbd
stop "$BASE/mysql/mysqld.pid" mariadbd
stop "$BASE/munge/munged.pid" munged
if [ "${1:-}" = --purge ]; then
  echo "[slurm/local] purging $BASE"
  rm -rf "${BASE:?}"/{state,spool,log,run,mysql,munge,etc,env.sh}
fi
exit 0
