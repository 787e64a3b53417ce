#!/usr/bin/env bash
# Try profiles/slurm on a real (one-node, throw-away) Slurm cluster, as a new user would on a fresh Debian
# machine without systemd (facts: Slurm 22.05, snakemake-executor-plugin-slurm 2.8.0).
#
#   sudo bash tests/slurm/run.sh          # root: installs packages, starts daemons, makes /dev/fakegpuN
#
# 1. install  apt: slurm-wlm munge slurmdbd mariadb-server (if missing); venv: pip install -e ".[slurm]"
# 2. cluster  munged, mariadbd (--skip-networking), slurmdbd, slurmctld, slurmd -N localhost; all state
#             (conf, logs, pid files, spool, database) in one temp dir; a node with 2 CPUs and 2 dummy GPUs.
#             Outside it, for the run only: munge's socket /run/munge, /etc/slurm/slurm.conf (a link: the
#             jobs' nested srun gets no SLURM_CONF) and /dev/fakegpu0..1
# 3. dag      figures/smoke/fig2.png of the smoke DAG through --profile profiles/slurm, in a fresh clone
# 4. checks   every submitted job COMPLETED in sacct; records and summary equal to a local run (another
#             clone, --cores 2); no smoke job asks for a GPU; every paper run/run_batch_* job asks for
#             gpu=1 (dry run), and one real paper job of each kind is submitted, seen holding its dummy
#             GPU, then cancelled
# A trap always stops every daemon this script started and exits non-zero on any failure.
# Knobs (environment): SLURM_TEST_TARGET (figures/smoke/fig2.png), SLURM_TEST_DAG_TIMEOUT (s, 1800),
# SLURM_TEST_RETRIES (1), SLURM_TEST_PAPER_SUBMIT (1), SLURM_TEST_KEEP (0: remove the temp dir on success),
# SLURM_TEST_PORT (16817: slurmctld; slurmd +1, slurmdbd +2), SLURM_TEST_CLUSTER (smktest).
set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
VENV=$REPO/.venv
PY=$VENV/bin/python
SMK=$VENV/bin/snakemake
TARGET=${SLURM_TEST_TARGET:-figures/smoke/fig2.png}
EXPERIMENT=$(basename "$TARGET" .png)
DAG_TIMEOUT=${SLURM_TEST_DAG_TIMEOUT:-1800}
RETRIES=${SLURM_TEST_RETRIES:-1}
PAPER_SUBMIT=${SLURM_TEST_PAPER_SUBMIT:-1}
KEEP=${SLURM_TEST_KEEP:-0}
PORT=${SLURM_TEST_PORT:-16817}
CLUSTER=${SLURM_TEST_CLUSTER:-smktest}
READY_TIMEOUT=60
NGPU=2

PASSED=0 FAILED=0 FAILS=() PHASES=() PHASE= PHASE_T0=0 T_START=$(date +%s)
WORK= PIDS=() MADE_DEVS=() MADE_LINKS=() MADE_MUNGE_DIR=0 SMK_PID= DONE=0

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }
pass() { PASSED=$((PASSED + 1)); log "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); FAILS+=("$*"); log "FAIL: $*"; }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
phase() {  # phase NAME: ends the current phase (if any), starts NAME ("" ends only)
    local now; now=$(date +%s)
    [ -n "$PHASE" ] && PHASES+=("$PHASE=$((now - PHASE_T0))s")
    PHASE=$1 PHASE_T0=$now
    [ -n "$PHASE" ] && log "=== phase: $PHASE" || true
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD (10 s a try) until it succeeds (99: give up)
    local t=$1 what=$2 end rc; shift 2
    end=$((SECONDS + t))
    while [ "$SECONDS" -lt "$end" ]; do
        rc=0
        if declare -F "$1" >/dev/null; then "$@" >/dev/null 2>&1 || rc=$?   # a function: times itself out
        else timeout 10 "$@" >/dev/null 2>&1 || rc=$?; fi
        [ "$rc" = 0 ] && return 0
        [ "$rc" = 99 ] && { log "gave up waiting for $what"; return 1; }
        sleep 1
    done
    log "timed out after ${t}s waiting for $what"; return 1
}

# ---------------------------------------------------------------- cleanup: always runs
stop_pid() {  # stop_pid NAME PID: TERM, up to 30 s, then KILL (only if it is still the process we started)
    local name=$1 pid=$2 i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    grep -q "$name" "/proc/$pid/comm" 2>/dev/null || { log "pid $pid is no longer $name; left alone"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    log "$name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
}
pid_of() { [ -s "$1" ] && cat "$1" || true; }
stop_cluster() {
    [ -n "$WORK" ] || return 0
    if [ -n "$SMK_PID" ] && kill -0 "$SMK_PID" 2>/dev/null; then   # the background paper snakemake
        kill -KILL -- "-$SMK_PID" 2>/dev/null || true
    fi
    if [ -s "$WORK/run/slurmctld.pid" ] && command -v squeue >/dev/null; then
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
            log "cancelling leftover jobs"; timeout 10 scancel --user=root 2>/dev/null || true
            wait_for 30 "jobs to end" bash -c '[ -z "$(squeue -h -o %i)" ]' || true
        fi
    fi
    local d p
    for d in slurmd slurmctld slurmdbd; do
        p=$(pid_of "$WORK/run/$d.pid"); [ -n "$p" ] && { log "stopping $d ($p)"; stop_pid "$d" "$p"; }
    done
    for p in "${PIDS[@]}"; do log "stopping ${p%%:*} (${p#*:})"; stop_pid "${p%%:*}" "${p#*:}"; done   # mariadbd
    p=$(pid_of "$WORK/munge/munged.pid"); [ -n "$p" ] && { log "stopping munged ($p)"; stop_pid munged "$p"; }
    for d in "${MADE_DEVS[@]}" "${MADE_LINKS[@]}"; do rm -f "$d"; done
    [ "$MADE_MUNGE_DIR" = 1 ] && rm -rf /run/munge
    local left; left=$(pgrep -x slurmstepd || true)
    [ -z "$left" ] || log "warning: slurmstepd processes still running: $left"
}
on_exit() {
    local rc=$?
    trap - EXIT ERR INT TERM
    set +e
    [ "$DONE" = 1 ] || { [ "$rc" = 0 ] && rc=1; fail "aborted in phase '${PHASE:-?}' (exit $rc)"; }
    phase ""
    stop_cluster
    PHASES+=("total=$(($(date +%s) - T_START))s")
    echo
    for f in "${FAILS[@]}"; do echo "  failed: $f"; done
    echo "phases: ${PHASES[*]}"
    echo "slurm test: $PASSED passed, $FAILED failed"
    if [ -n "$WORK" ]; then
        if [ "$FAILED" = 0 ] && [ "$KEEP" = 0 ]; then rm -rf "$WORK"; else echo "state and logs kept in $WORK"; fi
    fi
    [ "$FAILED" = 0 ] && exit 0 || exit 1
}
trap on_exit EXIT
trap 'log "error (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
trap 'log "interrupted"; exit 130' INT TERM

[ "$(id -u)" = 0 ] || { log "run as root (apt-get, daemons, mknod)"; exit 1; }
[ -x "$PY" ] || { log "no venv at $VENV (run install.sh first)"; exit 1; }

WORK=$(mktemp -d /tmp/slurm-test.XXXXXX)
chmod 755 "$WORK"                                   # munge and mysql must reach their dirs
mkdir -p "$WORK"/{etc,log,run,spool/ctld,spool/d,munge,db,home}
LOGS=$WORK/log
log "state and logs in $WORK"

# ---------------------------------------------------------------- 1. install
phase install
PKGS=(slurm-wlm munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${PKGS[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$LOGS/apt.log" 2>&1
    apt-get install -y -q "${PKGS[@]}" >>"$LOGS/apt.log" 2>&1
else
    log "packages already installed"
fi
if ! "$PY" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
    log "pip install -e .[slurm]"
    (cd "$REPO" && "$VENV/bin/pip" install -e ".[slurm]") >"$LOGS/pip.log" 2>&1
    "$PY" -c "import snakemake_executor_plugin_slurm"
fi
log "slurm $(dpkg-query -W -f='${Version}' slurm-wlm), plugin $("$PY" -c 'import importlib.metadata as m; print(m.version("snakemake-executor-plugin-slurm"))')"

# ---------------------------------------------------------------- 2. cluster
phase cluster
for p in "$PORT" $((PORT + 1)) $((PORT + 2)); do
    ! ss -ltn "sport = :$p" | grep -q LISTEN || { log "port $p in use (set SLURM_TEST_PORT)"; exit 1; }
done

# munged, as user munge, with its own key, on munge's default socket: Slurm 22.05's client commands
# ignore AuthInfo=socket= for slurmdbd connections (sacctmgr then fails on /run/munge/munge.socket.2)
MUNGE_SOCK=/run/munge/munge.socket.2
if [ -S "$MUNGE_SOCK" ] && timeout 10 munge -n </dev/null >/dev/null 2>&1; then
    log "a munged already answers on $MUNGE_SOCK: using it"
else
    [ -d /run/munge ] || { mkdir /run/munge; MADE_MUNGE_DIR=1; }
    chown munge:munge /run/munge; chmod 755 /run/munge
    dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none
    chown -R munge:munge "$WORK/munge"; chmod 700 "$WORK/munge"; chmod 400 "$WORK/munge/munge.key"
    runuser -u munge -- munged --force --key-file="$WORK/munge/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$WORK/munge/munged.pid" --log-file="$WORK/munge/munged.log" --seed-file="$WORK/munge/munged.seed"
    wait_for "$READY_TIMEOUT" munged bash -c "munge -n | unmunge" || { tail -n 20 "$WORK/munge/munged.log"; exit 1; }
fi

# mariadbd: own datadir and socket, no TCP
DB_SOCK=$WORK/db/mysqld.sock                        # pid file and log in its own dir: it runs as mysql
chown mysql:mysql "$WORK/db"
mariadb-install-db --no-defaults --user=mysql --datadir="$WORK/db/data" --auth-root-authentication-method=socket \
    --skip-test-db >"$LOGS/mariadb-install-db.log" 2>&1
mariadbd --no-defaults --user=mysql --datadir="$WORK/db/data" --socket="$DB_SOCK" --skip-networking \
    --pid-file="$WORK/db/mariadbd.pid" --log-error="$WORK/db/mariadbd.log" --innodb-buffer-pool-size=64M &
MDB_PID=$!
PIDS+=("mariadbd:$MDB_PID")
db_up() { kill -0 "$MDB_PID" 2>/dev/null || return 99; timeout 10 mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping; }
wait_for "$READY_TIMEOUT" mariadbd db_up || { tail -n 5 "$WORK/db/mariadbd.log"; exit 1; }

# dummy GPUs: a gres.conf line with File= per GPU (a GPU without File= is dropped and the node goes invalid)
for ((i = 0; i < NGPU; i++)); do
    [ -e "/dev/fakegpu$i" ] || { mknod "/dev/fakegpu$i" c 1 3; MADE_DEVS+=("/dev/fakegpu$i"); }
done
HOST=$(hostname -s)
export SLURM_CONF=$WORK/etc/slurm.conf          # slurmdbd.conf and gres.conf are read from the same dir
cat >"$SLURM_CONF" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/spool/ctld
SlurmdSpoolDir=$WORK/spool/d
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((PORT + 2))
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=20000 Gres=gpu:$NGPU State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
: >"$WORK/etc/gres.conf"
for ((i = 0; i < NGPU; i++)); do echo "NodeName=localhost Name=gpu File=/dev/fakegpu$i" >>"$WORK/etc/gres.conf"; done
# The jobstep plugin runs each job's command through a nested `srun` whose environment it strips of every
# SLURM_* variable, SLURM_CONF included: srun then needs the config at Slurm's default path.
ETC_CONF=/etc/slurm/slurm.conf
if [ -L "$ETC_CONF" ] && [[ "$(readlink "$ETC_CONF")" == /tmp/slurm-test.*/etc/slurm.conf ]] && [ ! -e "$ETC_CONF" ]; then
    rm -f "$ETC_CONF"                              # left behind by a killed run of this script
fi
if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
    log "$ETC_CONF exists: this machine has a Slurm of its own; not touching it"; exit 1
fi
mkdir -p /etc/slurm; ln -s "$SLURM_CONF" "$ETC_CONF"; MADE_LINKS+=("$ETC_CONF")
cat >"$WORK/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
PidFile=$WORK/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$WORK/etc/slurmdbd.conf"
# slurmdbd reaches mariadbd through its socket: the client library's default socket, and ~/.my.cnf (read
# after /etc/mysql's [client] socket)
printf '[client]\nsocket=%s\n' "$DB_SOCK" >"$WORK/home/.my.cnf"
HOME=$WORK/home MYSQL_UNIX_PORT=$DB_SOCK slurmdbd
wait_for "$READY_TIMEOUT" "slurmdbd (sacctmgr show cluster)" sacctmgr -n show cluster ||
    { tail -n 20 "$LOGS/slurmdbd.log"; exit 1; }
sacctmgr -i add cluster "$CLUSTER" >/dev/null
# the root account/user association comes with the cluster; add one if this Slurm does not
if [ -z "$(sacctmgr -n -P show assoc where cluster="$CLUSTER" user=root format=account)" ]; then
    sacctmgr -i add account smktest cluster="$CLUSTER" >/dev/null
    sacctmgr -i add user root account=smktest cluster="$CLUSTER" >/dev/null
fi
slurmctld
wait_for "$READY_TIMEOUT" "slurmctld (sinfo)" sinfo -h || { tail -n 20 "$LOGS/slurmctld.log"; exit 1; }
slurmd -N localhost
node_is() { [ "$(timeout 10 sinfo -h -n localhost -o "$1" | tr -d ' ')" = "$2" ]; }
wait_for "$READY_TIMEOUT" "node localhost idle (sinfo)" node_is %t idle ||
    { sinfo -N -l; tail -n 20 "$LOGS/slurmd.log" "$LOGS/slurmctld.log"; exit 1; }
log "cluster up: $(sinfo -h -o '%P %D %c %m %G %t')"
check "node localhost advertises gpu:$NGPU" node_is %G "gpu:$NGPU"
has_cluster() { timeout 10 sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; }
check "cluster $CLUSTER registered in slurmdbd" has_cluster

# ---------------------------------------------------------------- 3. the smoke DAG through the profile
export PATH=$VENV/bin:$PATH WANDB_MODE=offline
clone() {  # clone DIR: a fresh clone of the repository's HEAD, MNIST prepared in it
    git clone -q "$REPO" "$1"
    (cd "$1" && PYTHONPATH=$1/src "$PY" -m trainability.data --root data >"$LOGS/data-$(basename "$1").log" 2>&1)
}
smk() {  # smk DIR LOG ARGS...: snakemake in DIR (its own src/ first on the path), killed after DAG_TIMEOUT
    local dir=$1 out=$2; shift 2
    (cd "$dir" && PYTHONPATH=$dir/src timeout -s KILL "$DAG_TIMEOUT" "$SMK" "$@") >>"$out" 2>&1
}
smk_retry() {  # smk_retry DIR LOG ARGS...: on failure, --unlock and try again (up to RETRIES times)
    local dir=$1 out=$2 a rc; shift 2
    for ((a = 0; a <= RETRIES; a++)); do
        if [ "$a" -gt 0 ]; then
            log "attempt $a failed (exit $rc, log $out); --unlock and retry"
            smk "$dir" "$out" --unlock "${@:1:$#-1}" || true      # same options, no target
        fi
        rc=0; smk "$dir" "$out" "$@" || rc=$?
        [ "$rc" = 0 ] && { [ "$a" = 0 ] || log "succeeded on attempt $((a + 1))"; return 0; }
    done
    tail -n 30 "$out"; return "$rc"
}

phase dag
SL=$WORK/clone-slurm
clone "$SL"
log "snakemake --profile profiles/slurm --config scale=smoke -- $TARGET"
SMK_LOG=$LOGS/snakemake-slurm.log
check "smoke $TARGET through --profile profiles/slurm" \
    smk_retry "$SL" "$SMK_LOG" --profile profiles/slurm --verbose --config scale=smoke -- "$TARGET"

phase reference
LO=$WORK/clone-local
clone "$LO"
log "snakemake --cores 2 --config scale=smoke -- $TARGET (local reference)"
check "smoke $TARGET locally (--cores 2)" \
    smk_retry "$LO" "$LOGS/snakemake-local.log" --cores 2 --config scale=smoke -- "$TARGET"

# ---------------------------------------------------------------- 4./5. checks
phase checks
# sbatch calls and submitted ids, from the (verbose) snakemake log
sbatch_calls() { grep -o 'sbatch call: sbatch .*' "$1" | sed 's/ --wrap=.*//'; }
job_ids() { sed -n 's/.*has been submitted with SLURM jobid \([0-9]*\).*/\1/p' "$1" | sort -u; }
terminal() {  # terminal IDS...: every listed job in sacct, none still pending/running
    local ids st; ids=$(IFS=,; echo "$*")
    st=$(timeout 10 sacct -X -n -P -j "$ids" -o State) || return 1
    [ "$(echo "$st" | grep -c .)" = "$#" ] && ! echo "$st" | grep -qE 'PENDING|RUNNING|REQUEUED|SUSPENDED|COMPLETING'
}
mapfile -t IDS < <(job_ids "$SMK_LOG")
log "submitted: ${#IDS[@]} jobs (${IDS[*]})"
check "the smoke run submitted jobs" [ "${#IDS[@]}" -gt 0 ]
if [ "${#IDS[@]}" -gt 0 ]; then
    wait_for 120 "sacct final states" terminal "${IDS[@]}" || true
    ACCT=$(sacct -X -n -P -j "$(IFS=,; echo "${IDS[*]}")" -o JobID,JobName,State,Comment,ReqTRES,AllocTRES)
    echo "$ACCT" >"$LOGS/sacct-smoke.txt"
    check "every submitted job is in sacct" [ "$(echo "$ACCT" | grep -c .)" = "${#IDS[@]}" ]
    bad=$(sacct -X -n -P -j "$(IFS=,; echo "${IDS[*]}")" -o JobID,JobName,State | awk -F'|' '$3 != "COMPLETED"')
    check "every submitted job COMPLETED (sacct -X -n -P -o JobID,JobName,State)" [ -z "$bad" ]
    [ -z "$bad" ] || echo "$bad"
    gpu_acct=$(echo "$ACCT" | grep 'gres/gpu' || true)
    check "no smoke job requested or got a GPU (sacct ReqTRES/AllocTRES)" [ -z "$gpu_acct" ]
fi
sbatch_calls "$SMK_LOG" >"$LOGS/sbatch-smoke.txt"
check "an sbatch call is logged per submitted job" [ "$(grep -c . "$LOGS/sbatch-smoke.txt")" = "${#IDS[@]}" ]
no_gpu_flag() { ! grep -qE -- '--gpus|--gres' "$1"; }
check "no smoke sbatch call asks for a GPU (--gpus/--gres)" no_gpu_flag "$LOGS/sbatch-smoke.txt"
log "smoke sbatch requests (rule: options):"
"$PY" - "$LOGS/sbatch-smoke.txt" <<'EOF'
import re, sys
for line in open(sys.argv[1]):
    rule = re.search(r"--comment (\S+)", line).group(1).strip("'")
    opts = " ".join(re.findall(r"(?:-p|-t|--mem|--ntasks|--cpus-per-task|--gpus|--gres|-A)[ =]\S+", line))
    print(f"    {rule}: {opts}")
EOF

# records and summary: the Slurm run against the local run
check "summary.json byte-identical to the local run" \
    cmp "$SL/results/smoke/experiments/$EXPERIMENT/summary.json" "$LO/results/smoke/experiments/$EXPERIMENT/summary.json"
check "record.json files equal to the local run's (without provenance and wall_s)" "$PY" - "$SL" "$LO" <<'EOF'
import json, pathlib, sys
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if k != "wall_s"}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
def records(root):
    base = pathlib.Path(root) / "results/smoke/runs"
    return {str(p.relative_to(base)): p for p in sorted(base.glob("*/seed*/record.json"))}
a, b = records(sys.argv[1]), records(sys.argv[2])
ok = bool(a) and a.keys() == b.keys()
print(f"    {len(a)} records (slurm), {len(b)} (local)")
for k in sorted(a.keys() & b.keys()):
    ra, rb = json.loads(a[k].read_text()), json.loads(b[k].read_text())
    ra.pop("provenance", None); rb.pop("provenance", None)
    if clean(ra) != clean(rb):
        ok = False
        print(f"    differs: {k}")
sys.exit(0 if ok else 1)
EOF

# paper scale: every run / run_batch_* job asks for one GPU (dry run through the same profile)
PAPER_DRY=$LOGS/snakemake-paper-dry.log
check "paper dry run through --profile profiles/slurm" \
    smk "$SL" "$PAPER_DRY" -n --profile profiles/slurm --config scale=paper
check "paper dry run: every run/run_batch_* job has gpu=1" "$PY" - "$PAPER_DRY" "$WORK/paper-targets" <<'EOF'
import re, sys, collections
text = open(sys.argv[1]).read()
jobs = []  # (rule, first output, resources)
for block in re.split(r"\n(?=(?:localrule|rule) )", text):
    m = re.match(r"(?:localrule|rule) (\S+):", block)
    if not m:
        continue
    out = re.search(r"^\s+output: ([^,\n]+)", block, re.M)
    res = re.search(r"^\s+resources: (.*)$", block, re.M)
    jobs.append((m.group(1), out.group(1) if out else "", res.group(1) if res else ""))
train = [j for j in jobs if j[0] == "run" or j[0].startswith("run_batch_")]
bad = [j for j in train if not re.search(r"\bgpu=1\b", j[2])]
counts = collections.Counter((j[0] if j[0] == "run" else "run_batch_*", re.search(r"gpu=\d+", j[2]).group(0)
                              if re.search(r"gpu=\d+", j[2]) else "no gpu") for j in train)
other = collections.Counter(j[0] for j in jobs if j not in train and re.search(r"\bgpu=[1-9]", j[2]))
print(f"    {len(train)} training jobs: {dict(counts)}; other rules asking for a GPU: {dict(other) or 'none'}")
for j in train[:1] + [j for j in train if j[0].startswith("run_batch_")][:1]:
    print(f"    e.g. {j[0]}: {j[2]}")
for j in bad:
    print(f"    no gpu=1: {j[0]} {j[1]} [{j[2]}]")
# targets for a real submission: one single run and one batch group
with open(sys.argv[2], "w") as f:
    for kind in ("run", "run_batch_"):
        j = next((j for j in train if j[0] == kind or (kind == "run_batch_" and j[0].startswith(kind))), None)
        if j:
            f.write(j[1] + "\n")
sys.exit(0 if train and not bad else 1)
EOF

# one real paper job of each kind: submitted, given its dummy GPU, cancelled (SIGINT: snakemake scancels)
if [ "$PAPER_SUBMIT" = 1 ] && [ -s "$WORK/paper-targets" ]; then
    mapfile -t PT <"$WORK/paper-targets"
    PAPER_LOG=$LOGS/snakemake-paper-submit.log
    log "submitting paper jobs for: ${PT[*]}"
    set -m
    (cd "$SL" && PYTHONPATH=$SL/src exec timeout -s KILL 600 "$SMK" --profile profiles/slurm --verbose \
        --config scale=paper -- "${PT[@]}") >"$PAPER_LOG" 2>&1 &
    SMK_PID=$!
    set +m
    n_sub() { [ "$(job_ids "$PAPER_LOG" | grep -c .)" -ge "${#PT[@]}" ]; }
    PIDS_PAPER=()
    if wait_for 180 "paper submissions" n_sub; then
        mapfile -t PIDS_PAPER < <(job_ids "$PAPER_LOG")
        all_running() { [ "$(timeout 10 squeue -h -t R -j "$(IFS=,; echo "${PIDS_PAPER[*]}")" -o %i | grep -c .)" = "${#PIDS_PAPER[@]}" ]; }
        wait_for 60 "paper jobs RUNNING" all_running || true
        for id in "${PIDS_PAPER[@]}"; do scontrol show job -d "$id" >>"$LOGS/scontrol-paper.txt" 2>&1 || true; done
    fi
    # SIGINT to snakemake itself (the child of timeout), once: it scancels its jobs
    SMK_CHILD=$(pgrep -P "$SMK_PID" | head -n 1 || true)
    kill -INT "${SMK_CHILD:-$SMK_PID}" 2>/dev/null || true
    gone() { ! kill -0 "$1" 2>/dev/null; }
    wait_for 90 "snakemake to cancel its jobs and exit" gone "$SMK_PID" || kill -KILL -- "-$SMK_PID" 2>/dev/null || true
    wait "$SMK_PID" 2>/dev/null || true
    smk "$SL" "$PAPER_LOG.unlock" --unlock --profile profiles/slurm --config scale=paper || true
    sbatch_calls "$PAPER_LOG" >"$LOGS/sbatch-paper.txt"
    log "paper sbatch requests:"; sed 's/^/    /' "$LOGS/sbatch-paper.txt"
    check "paper: ${#PT[@]} jobs accepted by sbatch" [ "${#PIDS_PAPER[@]}" = "${#PT[@]}" ]
    n_lines() { grep -c -- "$1" "$2" || true; }
    all_gpu1() { [ "$(n_lines . "$1")" = "$2" ] && [ "$(n_lines ' --gpus=1' "$1")" = "$2" ]; }
    check "paper: every sbatch call has --gpus=1" all_gpu1 "$LOGS/sbatch-paper.txt" "${#PT[@]}"
    if [ "${#PIDS_PAPER[@]}" -gt 0 ]; then
        wait_for 60 "paper jobs to end" terminal "${PIDS_PAPER[@]}" || true
        PACCT=$(sacct -X -n -P -j "$(IFS=,; echo "${PIDS_PAPER[*]}")" -o JobID,Comment,State,ReqTRES,AllocTRES)
        echo "$PACCT" | sed 's/^/    /'
        got_gpu() { [ "$(echo "$PACCT" | grep -c 'gres/gpu=1.*gres/gpu=1')" = "${#PIDS_PAPER[@]}" ]; }
        check "paper: each job requested gres/gpu=1 and was allocated one dummy GPU (sacct)" got_gpu
        none_left() { [ -z "$(squeue -h -j "$(IFS=,; echo "${PIDS_PAPER[*]}")" -o %i 2>/dev/null)" ]; }
        check "paper: the jobs were cancelled (nothing left in squeue)" none_left
    fi
    grep -h -o 'TresPerJob=[^ ]*\|GRES=gpu[^ ]*' "$LOGS/scontrol-paper.txt" 2>/dev/null | sed 's/^/    scontrol: /' || true
fi

phase ""
DONE=1
