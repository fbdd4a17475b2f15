#!/usr/bin/env bash
# Bring up a single-node Slurm 22.05 test cluster on this machine — idempotently.
#
#   bash slurm/local/start.sh          install missing packages, write configs, start what isn't running
#   . /tmp/hpcllm-slurm/env.sh         point sbatch/srun/sacct/squeue at it (exports SLURM_CONF)
#   bash slurm/local/stop.sh [--purge] stop it (and with --purge forget its state)
#
# Daemons: munged, MariaDB + slurmdbd (accounting: `sacct` and submitit's job states need it),
# slurmctld, slurmd. Everything lives under $HPCLLM_SLURM_BASE (default /tmp/hpcllm-slurm) and uses
# its own ports, so it coexists with a system Slurm or another test cluster.
# Knobs: HPCLLM_SLURM_BASE, HPCLLM_SLURM_CPUS (CPUs advertised, default 4), NO_APT=1.
set -euo pipefail

BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm}
CPUS=${HPCLLM_SLURM_CPUS:-4}
CTLD_PORT=6917 SLURMD_PORT=6918 DBD_PORT=6919 DB_PORT=3317
# cred_expire is also how long a requeued job must wait before it may start again (default 120 s)
CRED_EXPIRE=10
HERE=$(cd "$(dirname "$0")" && pwd)
HOST=$(hostname -s)
ETC=$BASE/etc MUNGE=$BASE/munge
SOCK=$MUNGE/munge.socket.2
export SLURM_CONF=$ETC/slurm.conf
T0=$(date +%s%N)
log() { printf '[slurm/local %(%T)T] %s\n' -1 "$*"; }
die() { echo "[slurm/local] ERROR: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------ packages
need=()
for cmd_pkg in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge slurmdbd:slurmdbd \
               mariadbd:mariadb-server mpirun:openmpi-bin; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
done
# pmix: Debian's Open MPI only starts under srun through PMIx (pmi2 and none fail in MPI_Init)
ls /usr/lib/*/slurm-wlm/mpi_pmix.so >/dev/null 2>&1 || need+=(slurm-wlm-basic-plugins)
ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 || need+=(slurm-wlm-mysql-plugin)
if [ ${#need[@]} -gt 0 ]; then
  [ "${NO_APT:-0}" = 1 ] && die "missing packages: ${need[*]} (NO_APT=1)"
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" libpmix2 ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}" libpmix2; }
fi

# ------------------------------------------------------------------------------------ files
mkdir -p "$ETC" "$MUNGE" "$BASE"/{state,spool,log,run,mysql}
chmod 755 "$BASE" "$MUNGE"       # munged refuses a socket directory that is not 0755
if [ ! -s "$MUNGE/munge.key" ]; then
  dd if=/dev/urandom of="$MUNGE/munge.key" bs=128 count=1 status=none
fi
chmod 400 "$MUNGE/munge.key"

# real topology, but advertise $CPUS CPUs (config_overrides) so a 2-task job and an array task
# can run side by side on a 2-core machine; the tests' jobs are small and mostly wait on each other
REALMEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
NEW=$(mktemp)
cat >"$NEW" <<EOC
# single-node test cluster written by slurm/local/start.sh — edit that script, not this file
ClusterName=hpcllm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
# an empty plugstack: don't pick up the system's /etc/slurm/plugstack.conf.d
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true
# no systemd/cgroup in a container: track processes by pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the slurmdbd connection takes its munge socket from here, not from AuthInfo
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
# reject impossible requests at submission instead of leaving them pending forever
EnforcePartLimits=ALL
MaxArraySize=1001
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
RequeueExit=
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$(( REALMEM * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOC
sed -i '/^RequeueExit=$/d' "$NEW"
CHANGED=0
cmp -s "$NEW" "$ETC/slurm.conf" || { mv "$NEW" "$ETC/slurm.conf"; CHANGED=1; }
rm -f "$NEW"
chmod 644 "$ETC/slurm.conf"
: >"$ETC/plugstack.conf"
cat >"$ETC/slurmdbd.conf" <<EOC
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOC
chmod 600 "$ETC/slurmdbd.conf"   # slurmdbd refuses a readable config (it holds the DB password)
cat >"$BASE/env.sh" <<EOC
# . $BASE/env.sh — use the local test cluster from this shell
export SLURM_CONF=$ETC/slurm.conf
# mpirun as root (srun --mpi=pmix needs neither)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
EOC

# ------------------------------------------------------------------------------------ daemons
alive() {  # alive PIDFILE COMM: the pid in the file is running COMM and is not a zombie
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat")" != Z ] &&
    [ "$(cat "/proc/$pid/comm")" = "$2" ]
}
waitfor() {  # waitfor SECONDS CMD...: retry CMD every 0.2 s
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.2; done
}
port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1"; }

if ! alive "$MUNGE/munged.pid" munged; then
  log "starting munged"
  munged --key-file="$MUNGE/munge.key" --socket="$SOCK" --pid-file="$MUNGE/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$MUNGE/munged.seed" --num-threads=4
fi
waitfor 10 bash -c "munge -S '$SOCK' -n | unmunge -S '$SOCK'" || die "munge does not work; see $BASE/log/munged.log"

MYSOCK=$BASE/mysql/mysqld.sock
if [ ! -d "$BASE/mysql/data/mysql" ]; then
  log "initialising the MariaDB datadir"
  mariadb-install-db --no-defaults --user=root --datadir="$BASE/mysql/data" \
    --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 ||
    die "mariadb-install-db failed; see $BASE/log/mariadb-install.log"
fi
if ! alive "$BASE/mysql/mysqld.pid" mariadbd; then
  log "starting mariadbd"
  setsid mariadbd --no-defaults --user=root --datadir="$BASE/mysql/data" --socket="$MYSOCK" \
    --pid-file="$BASE/mysql/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
    --log-error="$BASE/log/mariadb.err" --skip-log-bin --innodb-buffer-pool-size=128M \
    --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
fi
waitfor 60 mariadb-admin --no-defaults -S "$MYSOCK" ping || die "MariaDB did not come up; see $BASE/log/mariadb.err"
mariadb --no-defaults -S "$MYSOCK" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

if ! alive "$BASE/run/slurmdbd.pid" slurmdbd; then
  log "starting slurmdbd"
  slurmdbd   # reads slurmdbd.conf from the directory of $SLURM_CONF
fi
waitfor 60 port_open "$DBD_PORT" || die "slurmdbd did not come up; see $BASE/log/slurmdbd.log"

if [ "$CHANGED" = 1 ]; then   # the running daemons use an older config: restart them
  for d in slurmd slurmctld; do
    if alive "$BASE/run/$d.pid" $d; then
      log "slurm.conf changed: restarting $d"
      pid=$(cat "$BASE/run/$d.pid"); kill "$pid"
      waitfor 30 bash -c "! [ -d /proc/$pid ]" || kill -9 "$pid" 2>/dev/null || true
    fi
  done
fi
alive "$BASE/run/slurmctld.pid" slurmctld || { log "starting slurmctld"; slurmctld -f "$SLURM_CONF"; }
alive "$BASE/run/slurmd.pid" slurmd || { log "starting slurmd"; slurmd -f "$SLURM_CONF"; }

node_ready() {
  local s; s=$(sinfo -h -n "$HOST" -o %T 2>/dev/null) || return 1
  case "$s" in
    idle*|mixed*|allocated*|completing*) return 0 ;;
    drain*|down*|fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}
waitfor 90 node_ready || { sinfo >&2 || true; die "node not ready; see $BASE/log/slurmctld.log and slurmd.log"; }
log "ready in $(( ($(date +%s%N) - T0) / 1000000 )) ms: $(sinfo -h -o '%P %a %D %T %C' | head -1)  (. $BASE/env.sh)"
