#!/usr/bin/env bash
#SBATCH --job-name=mtl-ray
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --output=runs/sweep/slurm-logs/%x-%j.out
#
# A Ray cluster inside one SLURM allocation, and a study grid run on it through Ray Tune.
#
# Submit from the project root (the log folder above is relative to it):
#
#   sbatch slurm/ray_cluster.sh --grid pairings --gpus-per-worker 1            # one node, its GPU
#   sbatch --nodes=4 --gres=gpu:8 --cpus-per-task=64 slurm/ray_cluster.sh \
#       --grid pairings --seeds 0,1,2 --storage /shared/study --preset paper --model bert-base-uncased \
#       --gpus-per-worker 1 --cpus-per-worker 4
#   sbatch --gres=none slurm/ray_cluster.sh --grid smoke --preset smoke --storage runs/smoke-ray   # CPU only
#
# Arguments are launch/ray_submit.py's (grid, seeds, storage, placement and every mtl.train flag);
# --address is set here.  The first node runs the Ray head, every other node a worker (one srun
# step per node, each with its CPUs and GPUs and the mtl_cpus/mtl_gpus budget resources that let
# Tune start exactly the trials that fit).  Ports come from a range of 200 chosen by the job id,
# and Ray's files go to /tmp/ray-<job id>, so two jobs sharing a node do not collide.  When the
# sweep ends, or the job is cancelled or times out, every Ray process of this job is stopped on
# every node; nothing of Ray outlives the job.  Storage must be a shared folder or fsspec URL.
#
# Authentication: Ray's token authentication is on (RAY_AUTH_MODE=token).  Without it, anyone who
# reaches the job's ports over the cluster network (the GCS port, the Ray Client port) could run
# code as you on the job's nodes.  Each job generates a fresh random token (256 bits), exported
# as RAY_AUTH_TOKEN to the head, every worker and the sweep's driver (srun passes the job's
# environment to its steps; it takes precedence over a ~/.ray/auth_token or RAY_AUTH_TOKEN_PATH
# you may have); a token of your own in RAY_AUTH_TOKEN/RAY_AUTH_TOKEN_PATH is not reused.  For
# your own tools during the job the head node also holds it in /tmp/ray-<job id>/auth/token
# (mode 600), e.g. `srun --jobid=<job id> --overlap -w <head> env RAY_AUTH_MODE=token
# RAY_AUTH_TOKEN_PATH=/tmp/ray-<job id>/auth/token .venv/bin/ray status --address <head>:<port>`
# (the address is in the job's log).  It is removed with the job's Ray files when the job ends.
# Opt out with `RAY_AUTH_MODE=disabled sbatch slurm/ray_cluster.sh ...` only on a network that
# no one else can reach: the job's Ray then accepts jobs from anyone who can connect to it.
#
# Environment: as slurm/sweep.sh (MTL_PYTHON, or MTL_SETUP, or the project's .venv/bin/python).
set -euo pipefail

source "${MTL_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}/slurm/env.sh" 2>/dev/null ||
    { echo "error: $MTL_ROOT is not this project's folder: submit from the project root, or set MTL_ROOT" >&2; exit 2; }
mtl_python cluster.submit ray
ray=("$python" -m ray.scripts.scripts)

mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head=${nodes[0]}
head_ip=$(getent hosts "$head" | awk '{print $1; exit}' || true)
head_ip=${head_ip:-$head}
base=$((10000 + (SLURM_JOB_ID % 250) * 200))
port=$base
tmp=/tmp/ray-$SLURM_JOB_ID             # short: Ray's socket paths must fit in 107 bytes
# The head, the workers and the sweep's driver use one authentication mode and one token, all
# from this environment (a token file left in ~/.ray would otherwise decide for some of them).
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
unset RAY_AUTH_TOKEN_PATH
case "$RAY_AUTH_MODE" in
    token)
        RAY_AUTH_TOKEN=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
        [ "${#RAY_AUTH_TOKEN}" -eq 64 ] || { echo "error: could not generate a Ray token" >&2; exit 2; }
        export RAY_AUTH_TOKEN
        auth="token authentication (a fresh token for this job; on $(hostname) in $tmp/auth/token)" ;;
    disabled)
        unset RAY_AUTH_TOKEN
        echo "warning: RAY_AUTH_MODE=disabled: this job's Ray accepts jobs from anyone who can reach its ports" >&2
        auth="NO authentication (RAY_AUTH_MODE=disabled)" ;;
    *)
        echo "error: RAY_AUTH_MODE=$RAY_AUTH_MODE: use token (the default) or disabled" >&2
        exit 2 ;;
esac
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "${CUDA_VISIBLE_DEVICES}" != "NoDevFiles" ]; then
    gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
fi
budget="{\"mtl_cpus\": $cpus}"
if [ "$gpus" -gt 0 ]; then budget="{\"mtl_cpus\": $cpus, \"mtl_gpus\": $gpus}"; fi
ports=(--node-manager-port=$((base + 6)) --object-manager-port=$((base + 7)) --ray-client-server-port=$((base + 1))
       --dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3))
       --runtime-env-agent-port=$((base + 4)) --metrics-export-port=$((base + 5))
       --min-worker-port=$((base + 10)) --max-worker-port=$((base + 199)))
common=(--block --num-cpus="$cpus" --num-gpus="$gpus" --resources="$budget" --temp-dir="$tmp"
        --include-dashboard=false --disable-usage-stats "${ports[@]}")
steps=()

cleanup() {
    trap - EXIT INT TERM
    echo "stopping Ray on ${#nodes[@]} node(s)"
    # The srun steps forward SIGTERM to `ray start --block`, which stops its node's Ray; then
    # anything of this job's Ray still alive (found by its temp folder) is killed, node by node.
    for pid in "${steps[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${steps[@]}"; do wait "$pid" 2>/dev/null || true; done
    # ([/] keeps the pattern from matching the command line of the shell that runs pkill.)
    srun --overlap --export=ALL --nodes="${#nodes[@]}" --ntasks="${#nodes[@]}" --ntasks-per-node=1 \
        bash -c "pkill -KILL -f -- '[/]tmp/ray-$SLURM_JOB_ID/'; rm -rf '$tmp'" 2>/dev/null || true
    rm -rf "$tmp"         # the token file, even if the step above could not run
}
trap cleanup EXIT
trap 'exit 143' INT TERM
if [ "$RAY_AUTH_MODE" = token ]; then
    # Only for the user's own tools (see the header); Ray's processes take the token from the
    # environment.  In a folder of its own, created here (mode 700; Ray opens its temp folder to
    # everyone), as a file of mode 600; cleanup removes both.
    mkdir -p "$tmp"
    mkdir -m 700 "$tmp/auth"
    (umask 077 && printf '%s' "$RAY_AUTH_TOKEN" >"$tmp/auth/token")
fi

echo "Ray head on $head ($head_ip:$port, Ray Client $head_ip:$((base + 1))), ${#nodes[@]} node(s)," \
     "$cpus CPUs and $gpus GPUs each, temp $tmp, $auth"
# Each step asks for the node's CPUs and GPUs explicitly: steps do not inherit them everywhere.
# --export=ALL: every step gets this environment (the token), even under sbatch --export=NONE.
step=(--overlap --export=ALL --ntasks-per-node=1 --cpus-per-task="$cpus")
if [ "$gpus" -gt 0 ]; then step+=(--gres="gpu:$gpus"); fi
srun "${step[@]}" --nodes=1 --ntasks=1 -w "$head" "${ray[@]}" start --head --node-ip-address="$head_ip" \
    --port="$port" "${common[@]}" &
steps+=($!)
if [ "${#nodes[@]}" -gt 1 ]; then
    sleep 5
    workers=$(( ${#nodes[@]} - 1 ))
    srun "${step[@]}" --nodes="$workers" --ntasks="$workers" --exclude="$head" \
        "${ray[@]}" start --address="$head_ip:$port" "${common[@]}" &
    steps+=($!)
fi
export RAY_ADDRESS="$head_ip:$port"
"$python" -m cluster.submit --backend ray --address "$RAY_ADDRESS" --wait-for-nodes "${#nodes[@]}" "$@"
