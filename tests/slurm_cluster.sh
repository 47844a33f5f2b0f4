#!/usr/bin/env bash
# A private Slurm cluster on 127.0.0.1, for tests/e2e/test_slurm.py and for trying slurm/.
#
#   bash tests/slurm_cluster.sh start [DIR] [NODES]  # prints SLURM_CONF=DIR/slurm.conf (export it for sbatch & co)
#   bash tests/slurm_cluster.sh stop DIR             # cancels its jobs, stops the daemons it started
#
# NODES (default 1) slurmd daemons run on this one machine as nodes HOST-0 ... HOST-(N-1) (one node is
# just HOST), each with its own port, spool folder, log and pid file (slurm.conf's %n), and each
# claiming the whole machine's CPUs and memory. Multi-node jobs (`sbatch --nodes=2`) then run for
# real: one srun task per node, SLURM_NODEID 0 and 1, as on separate machines. Debian's slurmd takes
# `-N NODENAME` for this. All nodes have NodeAddr 127.0.0.1: a slurmd listens on 127.0.0.1 whatever
# its NodeAddr says, so other loopback addresses would not reach it.
#
# `start` installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing
# (apt-get; needs root), then starts its own munged, slurmctld and slurmd with every file (munge key
# and socket, slurm.conf written now, state, spool, logs, pid files) under DIR (default: a new
# /tmp/mapdet-slurm.XXXXXX). Nothing outside DIR is configured or touched, no service manager is
# needed, and `stop` ends exactly the processes whose pid files are in DIR.
# Exit codes: 0 ok; 1 a failure (install or start-up; logs are printed); 3 this machine cannot run
# Slurm at all (packages missing and not root, or no apt-get): callers skip on 3, never on 1.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin, which a plain PATH may lack
PACKAGES=(slurmctld slurmd slurm-client munge)
TOOLS=(slurmctld slurmd sbatch scontrol munged munge)

die() { echo "slurm_cluster: $1" >&2; exit "${2:-1}"; }

missing_tools() {
  local t
  for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || echo "$t"; done
}

install_packages() {
  [ -z "$(missing_tools)" ] && return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install ${PACKAGES[*]}" 3
  echo "slurm_cluster: installing ${PACKAGES[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || die "apt-get update failed"
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 || die "apt-get install ${PACKAGES[*]} failed"
  [ -z "$(missing_tools)" ] || die "still missing after install: $(missing_tools | tr '\n' ' ')"
}

# A pid from FILE that is still a live process whose command line mentions DIR (never someone else's).
owned_pid() {
  local file=$1 dir=$2 pid state
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  [ "$state" != Z ] || return 1  # a zombie waits for a parent that is not ours to reap it
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir" || return 1
  echo "$pid"
}

# First TCP port from $1 upwards that nobody listens on (slurmctld/slurmd need fixed ports).
free_port() {
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}

wait_for() {  # wait_for SECONDS COMMAND...: poll every 0.2 s until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

start_munge() {
  local dir=$1
  install -d -m 0700 "$dir/munge"
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile="$dir/munge/munge.key"
  else
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 0600 "$dir/munge/munge.key"
  # munged wants every folder above its socket searchable by all users.
  munged --socket="$dir/munge.socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  wait_for 10 bash -c "munge -S '$dir/munge.socket' -n | unmunge -S '$dir/munge.socket'" \
    || die "munged did not answer on $dir/munge.socket"
}

# The node names of an N-node cluster on this host, one per line.
node_names() {
  local host=$1 n=$2 i
  if [ "$n" -eq 1 ]; then echo "$host"; return; fi
  for ((i = 0; i < n; i++)); do echo "$host-$i"; done
}

write_conf() {
  local dir=$1 host=$2 n=$3 hw port name nodes=""
  # slurmd -C prints this machine's NodeName line (CPUs, sockets, cores, memory); keep its sizes.
  hw=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ //')
  cat >"$dir/slurm.conf" <<EOF
# Written by tests/slurm_cluster.sh for a private test cluster; see that script.
ClusterName=mapdet-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port 16817)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may restart after 10 s instead of about 121 s.
AuthInfo=socket=$dir/munge.socket,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
JobRequeue=1
MinJobAge=600
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
EOF
  # The slurmds share 127.0.0.1, so each node gets a port of its own.
  port=16917
  for name in $(node_names "$host" "$n"); do
    port=$(free_port "$port")
    echo "NodeName=$name NodeAddr=127.0.0.1 NodeHostname=$host Port=$port $hw State=UNKNOWN" >>"$dir/slurm.conf"
    install -d "$dir/spool/$name"
    nodes+="${nodes:+,}$name"
    port=$((port + 1))
  done
  echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

nodes_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null | sort -u)" = idle ]; }  # every node idle

start_slurmds() {
  local name
  for name in $(node_names "$1" "$2"); do slurmd -f "$SLURM_CONF" -N "$name" || return 1; done
}

show_logs() {
  local f
  for f in "$1"/log/*.log; do echo "--- $f" >&2; tail -n 20 "$f" >&2 || true; done
}

cmd_start() {
  local dir=${1:-} n=${2:-1} host
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive number, not '$n'" 2
  [ "$(id -u)" -eq 0 ] || die "a private Slurm cluster needs root (slurmd starts jobs as root here)" 3
  install_packages
  if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/mapdet-slurm.XXXXXX); fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)  # daemons need absolute paths: a relative -f breaks after they fork
  [ ! -e "$dir/slurmctld.pid" ] || die "$dir already holds a cluster; stop it first: $0 stop $dir"
  chmod 0755 "$dir"
  install -d "$dir/log" "$dir/state" "$dir/spool"
  host=$(hostname -s)
  start_munge "$dir"
  write_conf "$dir" "$host" "$n"
  export SLURM_CONF=$dir/slurm.conf
  if ! slurmctld -f "$SLURM_CONF" -i || ! start_slurmds "$host" "$n" \
     || ! wait_for 30 scontrol ping || ! wait_for 30 nodes_idle; then
    show_logs "$dir"
    sinfo -N >&2 || true
    cmd_stop "$dir" >&2 || true
    die "the cluster in $dir did not come up (logs above)"
  fi
  echo "SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
  local dir=${1:?usage: $0 stop DIR} pidfile name pid
  dir=$(cd "$dir" && pwd)
  export SLURM_CONF=$dir/slurm.conf
  if owned_pid "$dir/slurmctld.pid" "$dir" >/dev/null; then
    # Jobs first: a job's slurmstepd outlives slurmd, so let Slurm end the jobs it started.
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    wait_for 20 bash -c '[ -z "$(squeue -h -t running,completing -o %i)" ]' \
      || echo "slurm_cluster: jobs still running after 20 s: $(squeue -h -o %i | tr '\n' ' ')" >&2
  fi
  for pidfile in "$dir"/slurmd-*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    name=$(basename "$pidfile" .pid)
    pid=$(owned_pid "$pidfile" "$dir") || continue
    kill "$pid" 2>/dev/null || true
    if ! wait_for 10 bash -c "! kill -0 $pid || [ \"\$(awk '{print \$3}' /proc/$pid/stat)\" = Z ]"; then
      echo "slurm_cluster: $name ($pid) ignored SIGTERM; killing it" >&2
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$dir"/slurmctld.pid "$dir"/slurmd-*.pid "$dir"/munged.pid
}

case "${1:-}" in
  start) cmd_start "${2:-}" "${3:-1}" ;;
  stop) cmd_stop "${2:-}" ;;
  *) die "usage: $0 start [DIR] [NODES] | stop DIR" 2 ;;
esac
