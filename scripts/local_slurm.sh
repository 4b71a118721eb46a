#!/usr/bin/env bash
# A one-node SLURM on localhost, to try `make pretrain-slurm` (and for the `slurm` test). Root only.
#   scripts/local_slurm.sh start   install slurm-wlm + munge if missing (apt), write /etc/slurm/slurm.conf
#                                  (only if it does not exist or was written by this script), start
#                                  munged, slurmctld and slurmd, wait until the node is idle
#   scripts/local_slurm.sh stop    cancel every job and stop the daemons of the cluster this script configured
#   scripts/local_slurm.sh status  sinfo / squeue
# One partition `debug` with this machine's cores and memory; no accounting daemon (so `sacct` is
# unavailable and submitit logs "Bypassing sacct error" while it polls: harmless).
set -euo pipefail
STATE=/run/ijepa-local-slurm
CONF=/etc/slurm/slurm.conf
MARK="# written by ijepa scripts/local_slurm.sh"

need_root() { [ "$(id -u)" = 0 ] || { echo "local_slurm: must run as root (it installs packages and starts daemons)" >&2; exit 1; }; }

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  command -v apt-get >/dev/null || { echo "local_slurm: needs apt-get to install slurm-wlm and munge" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "local_slurm: keeping the existing $CONF (not written by this script)"
    return
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: 1 would make a
  # 1-CPU node on which a 2-task job waits forever (Reason=PartitionConfig)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$CONF" <<EOF
$MARK
ClusterName=localcluster
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  need_root
  install
  mkdir -p "$STATE"
  write_conf
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    su -s /bin/sh munge -c /usr/sbin/munged
    touch "$STATE/munged.started"
  fi
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      sinfo
      return
    fi
    sleep 1
  done
  echo "local_slurm: the node did not become idle in 60 s; see /var/log/slurm/" >&2
  sinfo >&2 || true
  exit 1
}

stop() {
  need_root
  scancel --full --quiet --user=root 2>/dev/null || true
  local pids=()
  if grep -qF "$MARK" "$CONF" 2>/dev/null; then  # our cluster: its daemons and leftover job steps
    for name in slurmctld slurmd slurmstepd; do
      for pid in $(pgrep -x "$name" || true); do
        kill "$pid" 2>/dev/null && pids+=("$pid")
      done
    done
  else
    echo "local_slurm: $CONF was not written by this script; leaving its daemons alone"
  fi
  if [ -e "$STATE/munged.started" ]; then
    pid=$(pgrep -x munged || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$STATE/munged.started"
  fi
  for _ in $(seq 30); do  # the daemons take a few seconds to shut down
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  echo "local_slurm: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
