#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (root needed), to try the sbatch scripts before a
# cluster does, and for the test suite.
#
#   launch/slurm/local_cluster.sh install        # Debian/Ubuntu: slurmctld slurmd slurm-client munge
#   launch/slurm/local_cluster.sh start [DIR]    # config, state and logs under DIR (default /tmp/slurm-local)
#   export SLURM_CONF=DIR/slurm.conf             # then sbatch/squeue/scontrol talk to it
#   launch/slurm/local_cluster.sh stop [DIR]
#
# The node has no GPUs: submit train.sbatch with `--gpus-per-node=0` (and NPROC_PER_NODE set).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh install|start|stop [DIR]}
DIR=$(realpath -m "${2:-/tmp/slurm-local}")
HOST=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "local_cluster.sh install: needs root" >&2; exit 1; }
  command -v apt-get >/dev/null || { echo "local_cluster.sh install: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat >"$DIR/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its step credential expires (default 120 s)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
KillWait=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

start() {
  install
  write_config
  export SLURM_CONF="$DIR/slurm.conf"
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged
    else
      munged --force
    fi
  fi
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  sleep 1
  slurmctld -c -f "$SLURM_CONF"   # -c: start clean, without jobs or node states of an earlier start
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 60); do
    if sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; then
      echo "SLURM cluster up: export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_cluster.sh: the node did not come up; see $DIR/log/" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: local_cluster.sh install|start|stop [DIR]" >&2; exit 2 ;;
esac
