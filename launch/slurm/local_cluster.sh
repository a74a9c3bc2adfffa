#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (root needed), to try the sbatch scripts before a
# cluster does, and for the test suite.
#
#   launch/slurm/local_cluster.sh install        # Debian/Ubuntu: slurmctld slurmd slurm-client munge
#   launch/slurm/local_cluster.sh start [DIR]    # config, state, logs and pid files under DIR (default /tmp/slurm-local)
#   export SLURM_CONF=DIR/slurm.conf             # then sbatch/squeue/scontrol talk to it
#   launch/slurm/local_cluster.sh stop [DIR]
#
# start runs its own munged (socket, key, pid, log and seed files under DIR/munge; slurm.conf's
# AuthInfo points at that socket), slurmctld and slurmd, and records their pids under DIR; stop ends
# exactly those processes (the ones whose pid files are under DIR) and waits for them. A system
# munged, or SLURM daemons that this script did not start, are never touched. start first stops what
# an earlier start with the same DIR left running. SLURMCTLD_PORT and SLURMD_PORT (default 6817 and
# 6818) let a second cluster run beside the first. Jobs still running at stop keep running (their
# slurmstepd are not stopped): scancel them first.
#
# The node has no GPUs: submit train.sbatch with `--gpus-per-node=0` (and NPROC_PER_NODE set).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh install|start|stop [DIR]}
DIR=$(realpath -m "${2:-/tmp/slurm-local}")
HOST=$(hostname -s)
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
# the daemons in the order stop ends them, and where each one's pid is recorded
DAEMONS=(slurmd slurmctld munged)
declare -A PID_FILE=([slurmd]=$DIR/slurmd.pid [slurmctld]=$DIR/slurmctld.pid [munged]=$MUNGE_DIR/munged.pid)

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
  cat >"$DIR/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# this cluster's own munged; a requeued job may start again once its step credential expires
# (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=${PID_FILE[slurmctld]}
SlurmdPidFile=${PID_FILE[slurmd]}
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
# between the SIGTERM and the SIGKILL that end a job (scancel, time limit): the window to save in
KillWait=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
# jobs that ask (--oversubscribe) share a CPU, up to 8 on one: the test suite runs its SLURM jobs at once
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES:8
CONF
}

# The pid recorded for daemon $1 under DIR, if that process is alive and still that daemon of this
# DIR (a pid can be reused once its process is gone).
own_pid() {
  local name=$1 pid
  pid=$(cat "${PID_FILE[$name]}" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/" || return 1
  echo "$pid"
}

stop_daemon() {
  local name=$1 pid
  if pid=$(own_pid "$name"); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
      [ -d "/proc/$pid" ] || break
      sleep 0.2
    done
    if [ -d "/proc/$pid" ]; then
      echo "local_cluster.sh: $name ($pid) still running 30 s after SIGTERM; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      while [ -d "/proc/$pid" ]; do sleep 0.1; done
    fi
  fi
  rm -f "${PID_FILE[$name]}"
}

start_munged() {
  local user=root
  mkdir -p "$MUNGE_DIR"
  chmod 755 "$MUNGE_DIR"   # clients of any user reach the socket; the key file itself is 0400
  # as the munge user where it can reach DIR (not under a private directory, e.g. pytest's tmp)
  if id munge >/dev/null 2>&1 && runuser -u munge -- test -x "$MUNGE_DIR"; then
    user=munge
  fi
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=128 2>/dev/null
  fi
  chmod 400 "$MUNGE_DIR/munge.key"
  chown -R "$user:" "$MUNGE_DIR"
  local args=(--socket="$MUNGE_SOCKET" --pid-file="${PID_FILE[munged]}" --key-file="$MUNGE_DIR/munge.key"
              --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed")
  if [ "$user" = munge ]; then
    runuser -u munge -- munged "${args[@]}"
  else
    munged --force "${args[@]}"
  fi
}

start() {
  install
  stop   # what an earlier start with this DIR left running
  write_config
  export SLURM_CONF="$DIR/slurm.conf"
  start_munged
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
  echo "local_cluster.sh: the node did not come up; see $DIR/log/ and $MUNGE_DIR/munged.log" >&2
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$MUNGE_DIR/munged.log" >&2 || true
  exit 1
}

stop() {
  local name
  for name in "${DAEMONS[@]}"; do
    stop_daemon "$name"
  done
}

case "$cmd" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: local_cluster.sh install|start|stop [DIR]" >&2; exit 2 ;;
esac
