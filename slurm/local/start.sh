#!/usr/bin/env bash
# Bring up a local Slurm 22.05 test cluster on this machine — idempotently. One node (the default), or
# several fake nodes: one slurmd per node on this host, each in its own hostname namespace.
#
#   bash slurm/local/start.sh                        1 node in /tmp/hpcllm-slurm (ports 6917-6919)
#   HPCLLM_SLURM_NODES=2 bash slurm/local/start.sh   nodes n1, n2 in /tmp/hpcllm-slurm-2node (6927-6930)
#   . /tmp/hpcllm-slurm/env.sh                       point sbatch/srun/squeue/sacct at it (SLURM_CONF)
#   bash slurm/local/stop.sh [--purge]               stop it (same variables; --purge forgets its state)
#
# Daemons: munged, slurmctld, one slurmd per node and, with accounting, MariaDB + slurmdbd (`sacct`,
# `hpcllm jobs` and submitit's job states need them). Everything lives under the base directory and
# uses its own ports and munge socket, so clusters coexist with each other and with a system Slurm.
# Knobs (environment):
#   HPCLLM_SLURM_NODES       number of nodes (1)
#   HPCLLM_SLURM_BASE        base directory (/tmp/hpcllm-slurm; /tmp/hpcllm-slurm-<N>node for N > 1)
#   HPCLLM_SLURM_PORT_BASE   P (6917; 6917+10*(N-1) for N > 1): slurmctld P, slurmd of node 1 P+1,
#                            slurmdbd P+2, slurmd of node k > 1 P+k+1
#   HPCLLM_SLURM_DB_PORT     MariaDB (P-3600)
#   HPCLLM_SLURM_CPUS        CPUs advertised per node (4 on one node, 2 per node otherwise)
#   HPCLLM_SLURM_ACCOUNTING  1: slurmdbd + MariaDB (the default on one node), 0: none (default for N > 1)
#   HPCLLM_SLURM_UTS         1: each fake node gets its own hostname (unshare --uts; the default where
#                            it works), 0: all nodes share this host's name
#   NO_APT=1                 never call apt-get
set -euo pipefail

NODES=${HPCLLM_SLURM_NODES:-1}
[[ "$NODES" =~ ^[1-8]$ ]] || { echo "[slurm/local] ERROR: HPCLLM_SLURM_NODES=$NODES (1-8)" >&2; exit 2; }
if [ "$NODES" = 1 ]; then
  BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm} P=${HPCLLM_SLURM_PORT_BASE:-6917}
  CPUS=${HPCLLM_SLURM_CPUS:-4} ACCOUNTING=${HPCLLM_SLURM_ACCOUNTING:-1}
else
  BASE=${HPCLLM_SLURM_BASE:-/tmp/hpcllm-slurm-${NODES}node} P=${HPCLLM_SLURM_PORT_BASE:-$((6917 + 10 * (NODES - 1)))}
  CPUS=${HPCLLM_SLURM_CPUS:-2} ACCOUNTING=${HPCLLM_SLURM_ACCOUNTING:-0}
fi
CTLD_PORT=$P DBD_PORT=$((P + 2)) DB_PORT=${HPCLLM_SLURM_DB_PORT:-$((P - 3600))}
slurmd_port() { if [ "$1" = 1 ]; then echo $((P + 1)); else echo $((P + $1 + 1)); fi; }
# Job ids differ between clusters started on other ports (also in logs and in anything keyed by job id)
FIRST_JOB_ID=$(( (P - 6917) * 10000 + 1 ))
# cred_expire is also how long a requeued job must wait before it may start again (cred_expire + 1 s;
# default 120 s): 5, the least Slurm 22.05 accepts (AuthInfo=cred_expire < 5 is an error). A step's
# credential is checked by slurmd milliseconds after slurmctld made it, so 5 s is still a wide margin.
CRED_EXPIRE=5
HOST=$(hostname -s)
ETC=$BASE/etc MUNGE=$BASE/munge
SOCK=$MUNGE/munge.socket.2
export SLURM_CONF=$ETC/slurm.conf
T0=$(date +%s%N)
log() { printf '[slurm/local %(%T)T] %s\n' -1 "$*"; }
die() { echo "[slurm/local] ERROR: $*" >&2; exit 1; }

# one node keeps the host's name and the historical file names; fake nodes are n1, n2, ...
if [ "$NODES" = 1 ]; then
  NODE_NAMES=("$HOST")
else
  NODE_NAMES=(); for k in $(seq "$NODES"); do NODE_NAMES+=("n$k"); done
fi
pidfile() { if [ "$NODES" = 1 ]; then echo "$BASE/run/slurmd.pid"; else echo "$BASE/run/slurmd-$1.pid"; fi; }

# ------------------------------------------------------------------------------------ packages
need=()
for cmd_pkg in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge mpirun:openmpi-bin; do
  command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
done
if [ "$ACCOUNTING" = 1 ]; then
  for cmd_pkg in slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${cmd_pkg%%:*}" >/dev/null || need+=("${cmd_pkg#*:}")
  done
  ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 || need+=(slurm-wlm-mysql-plugin)
fi
# pmix: Debian's Open MPI only starts under srun through PMIx (pmi2 and none fail in MPI_Init)
ls /usr/lib/*/slurm-wlm/mpi_pmix.so >/dev/null 2>&1 || need+=(slurm-wlm-basic-plugins)
if [ ${#need[@]} -gt 0 ]; then
  [ "${NO_APT:-0}" = 1 ] && die "missing packages: ${need[*]} (NO_APT=1)"
  log "apt-get install ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" libpmix2 ||
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}" libpmix2; }
fi

# ------------------------------------------------------------------------------------ files
mkdir -p "$ETC" "$MUNGE" "$BASE"/{state,log,run}
for n in "${NODE_NAMES[@]}"; do
  if [ "$NODES" = 1 ]; then mkdir -p "$BASE/spool" "$BASE/tmp"; else mkdir -p "$BASE/spool/$n" "$BASE/tmp/$n"; fi
done
chmod 755 "$BASE" "$MUNGE"       # munged refuses a socket directory that is not 0755
if [ ! -s "$MUNGE/munge.key" ]; then
  dd if=/dev/urandom of="$MUNGE/munge.key" bs=128 count=1 status=none
fi
chmod 400 "$MUNGE/munge.key"

# Fake nodes get their own hostname (a UTS namespace per slurmd, inherited by its job steps), and a
# private /etc/hosts in which the node names resolve: gethostname() differs between nodes as on a
# real cluster (Open MPI's shared-memory segments and hpcllm's rendezvous address are keyed by it).
UTS=0
if [ "$NODES" -gt 1 ]; then
  UTS=${HPCLLM_SLURM_UTS:-auto}
  if [ "$UTS" = auto ]; then
    if unshare --uts --mount true 2>/dev/null; then UTS=1; else UTS=0; fi
  fi
  { grep -v '^[[:space:]]*#' /etc/hosts || true; echo "127.0.0.1 ${NODE_NAMES[*]}"; } >"$ETC/hosts"
fi

# Prolog and Epilog: remove a job's mpi/pmix files on the node. Slurm's mpi/pmix plugin binds
# <spool>/stepd.slurm.pmix.<job>.<step> first and unlinks it only when the step ends normally: after a
# failed PMIx setup (its client directory could not be made, ...) or a dead slurmstepd it stays, with
# pmix.<job>.<step>/ and <TmpFS>/spmix_appdir_<uid>_<job>.<step>/. A requeued job keeps its id and
# numbers its steps from 0 again, so bind() failed "Address already in use" and no later start of the
# job launched its step. The Epilog runs on each node once all the job's steps have ended, before a
# requeued job may start again; the Prolog before the job's first step on the node (files from before
# a slurmd crash or a purge).
if [ "$NODES" = 1 ]; then SPOOL_OF='$BASE/spool' TMP_OF='$BASE/tmp'
else SPOOL_OF='$BASE/spool/$SLURMD_NODENAME' TMP_OF='$BASE/tmp/$SLURMD_NODENAME'; fi
cat >"$ETC/pmix_cleanup.sh" <<EOC
#!/bin/sh
# Prolog and Epilog of the local test cluster (written by slurm/local/start.sh): remove the mpi/pmix
# files of this job's steps from this node's spool and tmp directories.
BASE='$BASE'
job=\${SLURM_JOB_ID:-}
case "\$job" in ''|*[!0-9]*) exit 0 ;; esac   # a failing Prolog/Epilog would drain the node
rm -rf "$SPOOL_OF/stepd.slurm.pmix.\$job."* "$SPOOL_OF/pmix.\$job."* "$TMP_OF/spmix_appdir_"*"_\$job."*
exit 0
EOC
chmod 755 "$ETC/pmix_cleanup.sh"
TASK_PROLOG=
if [ "$NODES" -gt 1 ] && [ "$UTS" = 0 ]; then
  # all fake nodes share one hostname: Open MPI names its shared-memory segment
  # vader_segment.<hostname>.<job>.<local rank>, so local rank 0 on n1 and on n2 would map the same
  # file (SIGSEGV in mca_btl_vader_poll_handle_frag). Give each node its own directories instead.
  cat >"$ETC/task_prolog.sh" <<EOC
#!/bin/sh
echo "export OMPI_MCA_btl_vader_backing_directory=$BASE/tmp/\$SLURMD_NODENAME"
echo "export TMPDIR=$BASE/tmp/\$SLURMD_NODENAME"
EOC
  chmod 755 "$ETC/task_prolog.sh"
  TASK_PROLOG="TaskProlog=$ETC/task_prolog.sh"
fi

# real topology, but advertise $CPUS CPUs per node (config_overrides) so that a 2-task job and an
# array task can run side by side on a 2-core machine; the tests' jobs are small and mostly wait
REALMEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
if [ "$NODES" = 1 ]; then
  SPOOL=$BASE/spool TMPFS=$BASE/tmp SLURMD_PID=$BASE/run/slurmd.pid SLURMD_LOG=$BASE/log/slurmd.log
  NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$(( REALMEM * 9 / 10 )) State=UNKNOWN"
  PARTITION_NODES=$HOST
else  # %n: the node name, so every slurmd has its own spool, pid file, log and TmpFS
  SPOOL=$BASE/spool/%n TMPFS=$BASE/tmp/%n SLURMD_PID=$BASE/run/slurmd-%n.pid SLURMD_LOG=$BASE/log/slurmd-%n.log
  NODE_LINES=$(for k in $(seq "$NODES"); do
    # NodeHostname: what gethostname() says on the node (sinfo -N -o '%N %n' tells the tests)
    echo "NodeName=n$k NodeHostname=$([ "$UTS" = 1 ] && echo "n$k" || echo "$HOST") NodeAddr=127.0.0.1" \
         "Port=$(slurmd_port "$k") CPUs=$CPUS" \
         "RealMemory=$(( REALMEM * 9 / 10 / NODES )) State=UNKNOWN"; done)
  PARTITION_NODES=n[1-$NODES]
fi
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# the slurmdbd connection takes its munge socket from here, not from AuthInfo
AccountingStoragePass=$SOCK
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="# no accounting: sacct has nothing; job states come from slurmctld (scontrol), kept MinJobAge s
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
NEW=$(mktemp)
cat >"$NEW" <<EOC
# $NODES-node test cluster written by slurm/local/start.sh — edit that script, not this file
ClusterName=hpcllm$([ "$NODES" = 1 ] || echo "${NODES}n")
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
# only the default: with several nodes each NodeName line has its own Port
SlurmdPort=$(slurmd_port 1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCK,cred_expire=$CRED_EXPIRE
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
# PMIx's client directories (spmix_appdir_<uid>_<job>.<step>) go here, not into the /tmp that every
# cluster on this machine (and every fake node) shares
TmpFS=$TMPFS
FirstJobId=$FIRST_JOB_ID
Prolog=$ETC/pmix_cleanup.sh
Epilog=$ETC/pmix_cleanup.sh
$TASK_PROLOG
# an empty plugstack: don't pick up the system's /etc/slurm/plugstack.conf.d
PlugStackConfig=$ETC/plugstack.conf
MailProg=/bin/true
# no systemd/cgroup in a container: track processes by pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT
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
SlurmdParameters=config_overrides
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP
EOC
sed -i '/^$/d' "$NEW"
CHANGED=0
cmp -s "$NEW" "$ETC/slurm.conf" || { mv "$NEW" "$ETC/slurm.conf"; CHANGED=1; }
rm -f "$NEW"
chmod 644 "$ETC/slurm.conf"
: >"$ETC/plugstack.conf"
cat >"$BASE/env.sh" <<EOC
# . $BASE/env.sh — use the local test cluster ($NODES node(s)) from this shell
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
waitfor() {  # waitfor SECONDS CMD...: retry CMD every 0.1 s
  local end=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}
port_open() { timeout 1 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }
port_check() {  # a daemon we are about to start must not find its port taken by someone else
  ! port_open "$1" || die "port $1 ($2) is in use by another program: choose HPCLLM_SLURM_PORT_BASE"
}

if ! alive "$MUNGE/munged.pid" munged; then
  log "starting munged"
  munged --key-file="$MUNGE/munge.key" --socket="$SOCK" --pid-file="$MUNGE/munged.pid" \
         --log-file="$BASE/log/munged.log" --seed-file="$MUNGE/munged.seed" --num-threads=4
fi
waitfor 10 bash -c "munge -S '$SOCK' -n | unmunge -S '$SOCK'" || die "munge does not work; see $BASE/log/munged.log"

if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p "$BASE/mysql"
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
  MYSOCK=$BASE/mysql/mysqld.sock
  if [ ! -d "$BASE/mysql/data/mysql" ]; then
    log "initialising the MariaDB datadir"
    mariadb-install-db --no-defaults --user=root --datadir="$BASE/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$BASE/log/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed; see $BASE/log/mariadb-install.log"
  fi
  if ! alive "$BASE/mysql/mysqld.pid" mariadbd; then
    port_check "$DB_PORT" MariaDB
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
    port_check "$DBD_PORT" slurmdbd
    log "starting slurmdbd"
    slurmdbd   # reads slurmdbd.conf from the directory of $SLURM_CONF
  fi
  waitfor 60 port_open "$DBD_PORT" || die "slurmdbd did not come up; see $BASE/log/slurmdbd.log"
fi

if [ "$CHANGED" = 1 ]; then   # the running daemons use an older config: restart them
  for pf in "$BASE/run/slurmd.pid" "$BASE"/run/slurmd-*.pid "$BASE/run/slurmctld.pid"; do
    d=$(basename "$pf" .pid); d=${d%%-*}   # slurmd-n1 -> slurmd
    if alive "$pf" "$d"; then
      log "slurm.conf changed: restarting $(basename "$pf" .pid)"
      pid=$(cat "$pf"); kill "$pid"
      waitfor 30 bash -c "! [ -d /proc/$pid ]" || kill -9 "$pid" 2>/dev/null || true
    fi
  done
fi
if ! alive "$BASE/run/slurmctld.pid" slurmctld; then
  port_check "$CTLD_PORT" slurmctld
  log "starting slurmctld"
  slurmctld -f "$SLURM_CONF"
fi
for k in $(seq "$NODES"); do
  n=${NODE_NAMES[k-1]}
  alive "$(pidfile "$n")" slurmd && continue
  port_check "$(slurmd_port "$k")" "slurmd $n"
  if [ "$NODES" = 1 ]; then
    log "starting slurmd"
    slurmd -f "$SLURM_CONF"
  elif [ "$UTS" = 1 ]; then
    log "starting slurmd $n (own hostname)"
    # mounts made in the new namespace stay private to it (unshare's default propagation)
    unshare --uts --mount sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -N "$1" -f "$3"' \
      sh "$n" "$ETC/hosts" "$SLURM_CONF"
  else
    log "starting slurmd $n (shared hostname $HOST)"
    slurmd -N "$n" -f "$SLURM_CONF"
  fi
done

nodes_ready() {
  local line name state ok=0
  while read -r name state; do
    case "$state" in
      idle*|mixed*|allocated*|completing*) ok=$((ok + 1)) ;;
      drain*|down*|fail*) scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 ;;
    esac
  done < <(sinfo -h -N -o '%N %T' 2>/dev/null | sort -u)
  [ "$ok" = "$NODES" ]
}
waitfor 90 nodes_ready || { sinfo -N >&2 || true; die "nodes not ready; see $BASE/log/slurmctld.log and slurmd*.log"; }
log "ready in $(( ($(date +%s%N) - T0) / 1000000 )) ms: $(sinfo -h -o '%P %a %D %T %C' | head -1)  (. $BASE/env.sh)"
