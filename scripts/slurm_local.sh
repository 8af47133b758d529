#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm 22.05, munge, and slurmdbd over
# MariaDB for job accounting), for ptune's submitit_slurm sweeps, their tests and docs/sweeps.md:
#
#   bash scripts/slurm_local.sh start    # install (apt) if needed, configure, start the daemons
#   bash scripts/slurm_local.sh status   # what runs, and whether `srun -N1 hostname` answers
#   bash scripts/slurm_local.sh stop     # stop the daemons this script started, and only those
#
# Needs root (it installs packages and runs the daemons) and Debian's package registry for the
# first start. Idempotent: a second start with everything running does nothing. The cluster's
# files live under $PTUNE_SLURM_DIR (default /tmp/ptune-slurm): slurm.conf's state and spool
# directories, the daemons' logs and the pid files `stop` reads. /etc/slurm/slurm.conf is written
# only when it is absent or was written by this script (first line), so a real cluster's
# configuration is never touched: on such a machine `start` refuses in one line.
#
# The one node is this host with its cores; CR_Core scheduling without memory accounting, so jobs
# that ask for a core each run side by side. proctrack/linuxproc and task/none need no cgroups
# (containers rarely give slurmd a writable cgroup tree). Accounting (slurmdbd, its database in
# MariaDB under $PTUNE_SLURM_DIR) is there because submitit reads job states with `sacct`: without
# it a job that dies without a result (cancelled, killed) would leave a sweep waiting forever.
set -euo pipefail

DIR=${PTUNE_SLURM_DIR:-/tmp/ptune-slurm}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
PACKAGES="slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
SOCK=/run/mysqld/mysqld.sock
MARK="# written by ptune scripts/slurm_local.sh"
HOST=$(hostname -s)

die() { echo "slurm_local: $*" >&2; exit 1; }

answers() { timeout 20 srun -N1 -t 1 hostname >/dev/null 2>&1; }

alive() { [ -s "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

install() {
  local cmd missing=""
  for cmd in slurmctld slurmd slurmdbd munged sbatch sacct mariadbd; do
    command -v "$cmd" >/dev/null || missing="$missing $cmd"
  done
  [ -z "$missing" ] && return
  [ "$(id -u)" = 0 ] || die "installing$missing needs root"
  echo "slurm_local: installing $PACKAGES (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || die "apt-get update failed (is Debian's package registry reachable?)"
  apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null \
    || die "apt-get install of $PACKAGES failed"
}

configure() {
  if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and was not written by this script: a SLURM cluster is configured here already; use it (sbatch, srun), or move that file away"
  fi
  mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/mysql" /run/mysqld /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$CONF" <<EOF
$MARK (state under $DIR)
ClusterName=ptune
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$HOST
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
SchedulerParameters=batch_sched_delay=0
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$HOST MaxTime=INFINITE State=UP PriorityTier=2
EOF
  cat >"$DBD_CONF" <<EOF
$MARK (state under $DIR)
AuthType=auth/munge
DbdHost=$HOST
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
EOF
  chmod 600 "$DBD_CONF"
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  chmod 700 /etc/munge
}

start() {
  install
  configure
  if ! alive munged; then
    if pgrep -x munged >/dev/null; then
      : # a munged this script did not start already runs: use it, never stop it
    else
      runuser -u munge -- munged --pid-file=/run/munge/munged.pid 2>/dev/null \
        || munged --force --pid-file=/run/munge/munged.pid
      cp /run/munge/munged.pid "$DIR/munged.pid"
    fi
  fi
  if ! alive mariadbd; then
    [ -d "$DIR/mysql/mysql" ] || mariadb-install-db --user=root --datadir="$DIR/mysql" --auth-root-authentication-method=socket \
      >"$DIR/mariadb-install.log" 2>&1 || die "mariadb-install-db failed; see $DIR/mariadb-install.log"
    setsid mariadbd --user=root --datadir="$DIR/mysql" --socket="$SOCK" --skip-networking --pid-file="$DIR/mariadbd.pid" \
      --log-error="$DIR/mariadbd.log" </dev/null >>"$DIR/mariadbd.log" 2>&1 &
    for _ in $(seq 60); do mariadb --socket="$SOCK" -e "select 1" >/dev/null 2>&1 && break; sleep 0.5; done
    mariadb --socket="$SOCK" -e "create database if not exists slurm_acct_db" || die "MariaDB did not start; see $DIR/mariadbd.log"
  fi
  if ! alive slurmdbd; then
    slurmdbd
    for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  sacctmgr -n list cluster format=cluster | grep -qw ptune || sacctmgr -i add cluster ptune >/dev/null
  alive slurmctld || slurmctld
  alive slurmd || slurmd
  for _ in $(seq 60); do
    if answers && sacct -n -X >/dev/null 2>&1; then
      echo "slurm_local: one-node SLURM cluster up ($HOST, $(nproc) CPUs, partition debug); logs in $DIR"
      return
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  die "the cluster did not answer srun within 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

stop() {
  local what pid
  for what in slurmd slurmctld slurmdbd mariadbd munged; do
    if alive "$what"; then
      pid=$(cat "$DIR/$what.pid")
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "slurm_local: stopped $what ($pid)"
    fi
    rm -f "$DIR/$what.pid"
  done
}

status() {
  local what
  for what in munged mariadbd slurmdbd slurmctld slurmd; do
    if alive "$what"; then echo "$what: running ($(cat "$DIR/$what.pid"))"; else echo "$what: not started by this script"; fi
  done
  if command -v srun >/dev/null && answers; then
    echo "srun -N1 hostname: answers"
    sinfo
  else
    echo "srun -N1 hostname: no answer"
    return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: bash scripts/slurm_local.sh start|stop|status" >&2; exit 2 ;;
esac
