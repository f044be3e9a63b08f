#!/usr/bin/env bash
# Several Ray nodes on this one machine: a head and N workers, each its own `ray start` (own
# raylet, object store and CPU count), to exercise multi-node behaviour (tasks and Ray Train
# workers spread over nodes, objects moved between object stores) without a cloud.
#
#   cluster/local-multinode.sh start [WORKERS] [CPUS]   head + WORKERS worker nodes, CPUS each
#                                                       (defaults: 2 workers, 1 CPU each)
#   cluster/local-multinode.sh status                   the cluster's nodes and resources
#   cluster/local-multinode.sh address                  print the address (for RAY_ADDRESS)
#   cluster/local-multinode.sh stop                     stop the nodes this script started
#
# Environment: RAY_PORT (GCS port, 6379), DASHBOARD_PORT (8265, where `ray job submit` and
# `qformer submit` go), HEAD_CPUS (the head's CPUs, default CPUS), RAY_AUTH_MODE (token, the
# default: every request needs the cluster's token, which Ray finds in RAY_AUTH_TOKEN, the file
# RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token; `start` creates ~/.ray/auth_token when none
# is set. Ray clients need RAY_AUTH_MODE=token too; `qformer submit|jobs` send the token when
# the dashboard asks. `disabled` lets anyone who reaches the ports run code), STATE_DIR (pids,
# logs and each node's Ray temp dir; keep it short, Ray's socket paths live below it; default
# /tmp/qformer-ray-$RAY_PORT), RAY (the ray command, default `ray`), PYTHON (default python3).
#
# `stop` ends only the processes this script started (by the pids it recorded), never every
# Ray process on the machine as `ray stop` does. Each node runs `ray start --block`, whose
# Ray processes die with it, and keeps its sessions and logs in its own temp dir (so other Ray
# clusters on the machine, and /tmp/ray, are left alone). All nodes share this machine's disk,
# so local paths in job specs work here; a real multi-node cluster needs S3 or NFS (see
# cluster/README.md).
set -euo pipefail

RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python3}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
STATE_DIR="${STATE_DIR:-/tmp/qformer-ray-$RAY_PORT}"
ADDRESS="127.0.0.1:$RAY_PORT"
PIDS="$STATE_DIR/pids"
# Every node and client of one cluster must agree on the auth mode; a client that is not told
# `token` sends no token and is refused.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# A node that gets SIGTERM first drains (up to 30 s) so Serve replicas can move; nothing here
# needs that, so `stop` is immediate unless this is set.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
# Nodes run in a session of their own (no terminal hang-up or Ctrl-C reaches them); macOS has
# no setsid, nohup does the hang-up part there.
if command -v setsid >/dev/null; then DETACH=(setsid); else DETACH=(nohup); fi

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

port_in_use() {  # true when something on this machine already listens on port $1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {  # a port no one listens on now (for the per-node agent ports)
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

live_pids() {  # the recorded pids that are still running
    [[ -f "$PIDS" ]] || return 0
    local pid
    while read -r pid _; do
        if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
    done <"$PIDS"
}

all_alive() {  # true when every node this script started is still running
    [[ "$(live_pids | wc -l)" -eq "$(wc -l <"$PIDS")" ]]
}

alive_nodes() {  # how many nodes the cluster at $ADDRESS reports alive
    RAY_ADDRESS="$ADDRESS" "$PYTHON" - <<'EOF'
import ray
ray.init(logging_level="ERROR", log_to_driver=False)
print(sum(1 for node in ray.nodes() if node["Alive"]))
EOF
}

start_node() {  # start_node NAME ARGS...: one `ray start --block` in its own session
    local name="$1"
    shift
    # Each node gets its own agent ports (the defaults would collide between nodes of one
    # machine) and its own temp dir.
    "${DETACH[@]}" "$RAY" start --block --disable-usage-stats --temp-dir "$STATE_DIR/$name" \
        --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
        --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)" \
        "$@" >"$STATE_DIR/$name.log" 2>&1 </dev/null &
    echo "$! $name" >>"$PIDS"
}

fail_start() {
    echo "error: $1; logs in $STATE_DIR:" >&2
    tail -n 20 "$STATE_DIR"/*.log >&2 || true
    stop_nodes
    exit 1
}

wait_for() {  # wait_for DESCRIPTION COMMAND...: retry COMMAND until it succeeds or time runs out
    local what="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    shift
    until "$@" >/dev/null 2>&1; do
        if ! all_alive || ((SECONDS > deadline)); then
            fail_start "$what did not come up"
        fi
        sleep 1
    done
}

has_nodes() { [[ "$(alive_nodes 2>/dev/null)" == "$1" ]]; }

ensure_token() {  # `ray start` needs a token under RAY_AUTH_MODE=token and, unlike ray.init(), makes none
    [[ "$RAY_AUTH_MODE" == token ]] || return 0
    local log
    if ! log=$("$RAY" get-auth-token --generate 2>&1 >/dev/null); then
        echo "error: no Ray token for RAY_AUTH_MODE=token: $(tail -n 1 <<<"$log")" >&2
        exit 1
    fi
    if [[ "$log" == *Generating* ]]; then
        echo "created a Ray token in ~/.ray/auth_token (clients of this cluster need it)"
    fi
}

start_cluster() {
    local workers="${1:-2}" cpus="${2:-1}"
    local head_cpus="${HEAD_CPUS:-$cpus}"
    is_int "$workers" && is_int "$cpus" && is_int "$head_cpus" || usage
    if [[ -n "$(live_pids)" ]]; then
        echo "error: a cluster started by this script is running on $ADDRESS; stop it first:" >&2
        echo "  $0 stop" >&2
        exit 1
    fi
    for port in "$RAY_PORT" "$DASHBOARD_PORT"; do
        if port_in_use "$port"; then
            echo "error: port $port is in use; choose others with RAY_PORT / DASHBOARD_PORT" >&2
            exit 1
        fi
    done
    ensure_token
    mkdir -p "$STATE_DIR"
    rm -f "$STATE_DIR"/*.log
    : >"$PIDS"

    start_node head --head --port "$RAY_PORT" --num-cpus "$head_cpus" --num-gpus 0 \
        --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
        --ray-client-server-port "$(free_port)"
    wait_for "the head node" has_nodes 1
    # One node at a time: raylets starting together on one machine have collided on ports
    # ("bind: address already in use").
    for i in $(seq 1 "$workers"); do
        start_node "worker-$i" --address "$ADDRESS" --num-cpus "$cpus" --num-gpus 0
        wait_for "worker node $i" has_nodes "$((i + 1))"
    done

    echo "Ray cluster of $((workers + 1)) nodes on this machine: head ($head_cpus CPUs)" \
        "+ $workers workers ($cpus CPUs each)"
    echo "address:   $ADDRESS"
    echo "dashboard: http://127.0.0.1:$DASHBOARD_PORT  (ray job submit --address http://127.0.0.1:$DASHBOARD_PORT -- ...)"
    echo "use it:    export RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
    echo "submit:    qformer submit SPEC.yaml --address http://127.0.0.1:$DASHBOARD_PORT"
    echo "stop it:   $0 stop"
}

stop_nodes() {
    [[ -f "$PIDS" ]] || { echo "no cluster started by this script on $ADDRESS"; return 0; }
    # Workers first, then the head (the reverse of the start order), each by its recorded pid.
    local line pid name deadline i
    local -a nodes=()
    while read -r line; do nodes+=("$line"); done <"$PIDS"
    for ((i = ${#nodes[@]} - 1; i >= 0; i--)); do
        read -r pid name <<<"${nodes[$i]}"
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            deadline=$((SECONDS + 30))
            while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
            echo "stopped $name (pid $pid)"
        fi
    done
    rm -f "$PIDS"
}

case "${1:-}" in
    start) shift; start_cluster "$@" ;;
    stop) stop_nodes ;;
    status) "$RAY" status --address "$ADDRESS" ;;
    address) echo "$ADDRESS" ;;
    *) usage ;;
esac
