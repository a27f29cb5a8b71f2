#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` (tests/test_slurm.py):
#   bash tests/slurm/cluster.sh up     # install slurm-wlm + munge where missing, configure, start, wait until idle
#   bash tests/slurm/cluster.sh down   # stop the daemons (the configuration stays in /etc/slurm)
#   bash tests/slurm/cluster.sh status
# Needs root (apt-get, daemons). The node offers DDPM_SLURM_CPUS CPUs (default 8: more than the cores, so the tests'
# small jobs run side by side) and its real memory. SLURM's own signals, time limits and requeues; only the daemons'
# timers are shortened (KillWait, the scheduler's interval, the credential lifetime that holds a requeued job) so a
# test waits seconds, not minutes.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-ddpm
LOGS=/var/log/slurm-ddpm
NODE=$(hostname -s)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
  local cpus=${DDPM_SLURM_CPUS:-8}
  local mem_mb=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 512 ))
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" "$LOGS"
  cat >"$CONF" <<CONF
# Written by tests/slurm/cluster.sh: one node, this machine.
ClusterName=ddpm
SlurmctldHost=$NODE
AuthType=auth/munge
# Job credentials expire after 10 s (default 120): SLURM holds a requeued job that long before it may start again.
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: processes are tracked by their parent, and every process of a job is signalled.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
# The CPUs below may exceed the cores: the tests' jobs are small.
SlurmdParameters=config_overrides
# Seconds between SIGTERM and SIGKILL when a job ends (SLURM's default: 30).
KillWait=15
MinJobAge=300
MessageTimeout=20
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
    if [ "$state" = "idle" ] || [ "$state" = "mixed" ] || [ "$state" = "allocated" ]; then
      echo "slurm: node $NODE is $state ($(sinfo -h -o '%c CPUs, %m MB'))"; return 0
    fi
    if [ "$state" = "down" ] || [ "$state" = "drained" ] || [ "$state" = "down*" ]; then scontrol update nodename="$NODE" state=resume 2>/dev/null || true; fi
    sleep 1
  done
  echo "slurm: the node did not come up; see $LOGS" >&2
  tail -n 20 "$LOGS"/*.log >&2 || true
  return 1
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || return 0
    sleep 0.5
  done
}

case "${1:-}" in
  up) install; configure; start ;;
  down) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
