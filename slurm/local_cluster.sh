#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, with accounting (slurmdbd + MariaDB, so `sacct`
# answers as on a production cluster): for the project's tests and for trying the SLURM path on
# a workstation.  Needs root and Debian/Ubuntu packages; writes /etc/slurm and /etc/munge.
#
#   sudo bash slurm/local_cluster.sh start     # install (first time, ~20 s), start, wait until the node is idle
#   sudo bash slurm/local_cluster.sh status    # sinfo, or exit 1 when it is not running
#   sudo bash slurm/local_cluster.sh stop      # stop exactly what start started (by pid files)
#
# Then, from the project root:  sbatch slurm/sweep.sh   or   .venv/bin/python launch/slurm_submit.py ...
#
# The node offers its CPUs and MTL_LOCAL_GPUS (default 2) "gpu" GRES slots, so scripts that ask
# for `--gres=gpu:1` schedule here as on a GPU cluster; there is no CUDA behind the slots and
# the trials train on CPU.  Settings chosen from measurements on these machines (see NOTES.md):
# no cgroups (proctrack/linuxproc, task/none: containers have no systemd), cons_tres/CR_Core
# (CR_Core_Memory without DefMemPerCPU serialises jobs), and a scheduler that starts a pending
# job at once (batch_sched_delay=0, bf_interval=1) instead of after up to 30 s.
set -euo pipefail

STATE=${MTL_SLURM_STATE:-/var/lib/mtl-slurm}
LOGS=$STATE/log
GPUS=${MTL_LOCAL_GPUS:-2}
MARK="# written by mtl-cluster slurm/local_cluster.sh"
DB_PASS=mtl-slurm-local
PACKAGES=(slurmd slurmctld slurm-client munge slurmdbd mariadb-server)

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

# /proc, not kill -0: a user who is not root cannot signal root's daemons but can see them.
pid_alive() { [ -f "$1" ] && [ -d "/proc/$(cat "$1")" ]; }

wait_for() {   # wait_for SECONDS WHAT COMMAND...: poll COMMAND every 0.2 s
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$what did not come up within ${limit} s (logs: $LOGS)"
        sleep 0.2
    done
}

stop_pid() {   # stop_pid PIDFILE NAME: TERM, then wait up to 30 s (KILL after that); a stale file is removed
    local file=$1 name=$2 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; sleep 0.5; fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >"$LOGS/apt.log" 2>&1 || {
        apt-get update -q >>"$LOGS/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOGS/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed (see $LOGS/apt.log)"
    }
}

write_owned() {   # write_owned FILE: stdin to FILE, refusing to replace a file this script did not write
    local file=$1
    if [ -s "$file" ] && ! grep -qF "$MARK" "$file"; then
        die "$file exists and was not written by this script; move it away to use the local cluster"
    fi
    cat >"$file"
}

fake_gpus() {
    # SLURM counts a GPU only where gres.conf names a device file for it: each slot gets a
    # character device that is /dev/null (1,3).  Where mknod is not allowed, no GPU slots.
    mkdir -p "$STATE/gpu"
    local i
    for ((i = 0; i < GPUS; i++)); do
        [ -c "$STATE/gpu/fake$i" ] && continue
        if ! mknod "$STATE/gpu/fake$i" c 1 3 2>/dev/null; then
            say "warning: mknod is not allowed here: the node offers no GPU slots (--gres=gpu:N will not schedule)"
            GPUS=0
            return
        fi
    done
}

configure() {
    local host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1)
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    fake_gpus          # first: it may find no GPU slots possible, and slurm.conf must agree
    write_owned /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=mtl-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
ReturnToService=2
KillWait=5
MinJobAge=3600
MailProg=/bin/true
MpiDefault=none
GresTypes=gpu
$node$( [ "$GPUS" -gt 0 ] && echo " Gres=gpu:$GPUS" ) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    write_owned /etc/slurm/gres.conf <<EOF
$MARK
$( [ "$GPUS" -gt 0 ] && echo "NodeName=$host Name=gpu File=$STATE/gpu/fake[0-$((GPUS - 1))]" )
EOF
    write_owned /etc/slurm/slurmdbd.conf <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

start_munge() {
    pid_alive /run/munge/munged.pid && return 0
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged munge -n
}

start_mariadb() {
    pid_alive /run/mysqld/mtl-mariadb.pid && return 0
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mtl-mariadb.pid \
        --socket=/run/mysqld/mysqld.sock >"$LOGS/mariadb.log" 2>&1 </dev/null &
    wait_for 30 MariaDB mariadb -e 'select 1'
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_slurm() {
    if ! pid_alive /run/slurmdbd.pid; then
        rm -f /run/slurmdbd.pid
        slurmdbd
        # slurmctld's very first start must find slurmdbd connected to its database.
        wait_for 30 slurmdbd sacctmgr -n -P list cluster
    fi
    if ! pid_alive /run/slurmctld.pid; then
        slurmctld -i
        wait_for 30 slurmctld scontrol ping
    fi
    if ! pid_alive /run/slurmd.pid; then
        slurmd
    fi
    # A node drained by an earlier failed start (e.g. another configuration) comes back here.
    wait_for 30 "slurmd registration" node_registered
    if sinfo -h -o '%t' | grep -qE '^drain'; then scontrol update NodeName="$(hostname -s)" State=RESUME; fi
    wait_for 60 "the node" node_idle
}

node_registered() { ! sinfo -h -o '%t' | grep -qE '^(unk|inval|down)'; }

node_idle() { sinfo -h -o '%t' | grep -qE '^(idle|mix|alloc)$'; }

case "${1:-}" in
start)
    [ "$(id -u)" = 0 ] || die "needs root (it installs packages and starts daemons)"
    mkdir -p "$LOGS"
    if pid_alive /run/slurmctld.pid && pid_alive /run/slurmd.pid && node_idle; then
        say "already running"; sinfo; exit 0
    fi
    t0=$SECONDS
    install_packages
    configure
    start_munge
    start_mariadb
    start_slurm
    say "up in $((SECONDS - t0)) s"
    sinfo
    ;;
stop)
    stop_pid /run/slurmd.pid slurmd
    stop_pid /run/slurmctld.pid slurmctld
    stop_pid /run/slurmdbd.pid slurmdbd
    stop_pid /run/mysqld/mtl-mariadb.pid mariadbd
    stop_pid /run/munge/munged.pid munged
    ;;
status)
    pid_alive /run/slurmctld.pid && pid_alive /run/slurmd.pid && node_idle || { say "not running"; exit 1; }
    sinfo
    ;;
*)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
