#!/usr/bin/env bash
# A local Ray cluster for `ray job submit`: a head with its dashboard (the job
# server) on 127.0.0.1 and, optionally, more raylets joined as separate nodes.
#
#   infra/local/ray_head.sh start DIR GCS_PORT DASHBOARD_PORT [NUM_CPUS] [LIFETIME_S]
#   infra/local/ray_head.sh add-node DIR NAME GCS_PORT [NUM_CPUS] [LIFETIME_S]
#   infra/local/ray_head.sh stop DIR
#
# Each node runs `ray start --block` under `timeout`, in its own process group
# with its PID in DIR; stop ends them by those PIDs (workers first, head last).
set -euo pipefail
cmd=${1:?usage: ray_head.sh start|add-node|stop DIR ...}
here=$(cd "$(dirname "$0")" && pwd)
ray=${RAY:-$here/../../.venv/bin/ray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}   # loopback only
# Job entrypoints (`python jobs/...`) run with the nodes' PATH: make it this venv's.
PATH="$(cd "$(dirname "$ray")" && pwd):$PATH"
export PATH

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

node() {  # node DIR NAME LIFETIME ARGS...
  local D=$1 name=$2 lifetime=$3; shift 3
  mkdir -p "$D"
  # Ray's per-node agents default to fixed ports (52365, ...): take free ones, so
  # this cluster can run beside other Ray instances on the machine.
  setsid timeout "$lifetime" "$ray" start --block --disable-usage-stats \
    --dashboard-agent-listen-port "$(free_port)" --dashboard-agent-grpc-port "$(free_port)" \
    --runtime-env-agent-port "$(free_port)" --metrics-export-port "$(free_port)" \
    --node-manager-port "$(free_port)" --object-manager-port "$(free_port)" \
    "$@" >"$D/$name.out" 2>&1 &
  echo $! >"$D/$name.pid"
}

start() {
  local D; D=$(realpath -m "${1:?DIR}"); local gcs=${2:?GCS_PORT} dash=${3:?DASHBOARD_PORT}
  local cpus=${4:-2} lifetime=${5:-3600}
  node "$D" head "$lifetime" --head --node-ip-address 127.0.0.1 --port "$gcs" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash" --include-dashboard true --num-cpus "$cpus" \
    --object-store-memory $((512 * 1024 * 1024)) --temp-dir "$D/tmp"
  local deadline=$((SECONDS + 120))
  # The job server answers once the head's dashboard agent is up.
  until curl -sf "http://127.0.0.1:$dash/api/version" >/dev/null 2>&1 \
      && "$ray" job list --address "http://127.0.0.1:$dash" >/dev/null 2>&1; do
    if ((SECONDS > deadline)) || ! kill -0 "$(cat "$D/head.pid")" 2>/dev/null; then
      echo "ray_head.sh: the head did not start; see $D/head.out" >&2; tail -20 "$D/head.out" >&2; return 1
    fi
    sleep 0.5
  done
  echo "ray_head.sh: Ray head at 127.0.0.1:$gcs, job server http://127.0.0.1:$dash" >&2
}

add_node() {
  local D; D=$(realpath -m "${1:?DIR}"); local name=${2:?NAME} gcs=${3:?GCS_PORT}
  local cpus=${4:-1} lifetime=${5:-3600}
  node "$D" "node-$name" "$lifetime" --address "127.0.0.1:$gcs" --node-ip-address 127.0.0.1 \
    --num-cpus "$cpus" --object-store-memory $((256 * 1024 * 1024))
}

stop() {
  local D; D=$(realpath -m "${1:?DIR}")
  local pidfiles=("$D"/node-*.pid "$D/head.pid")
  for pidfile in "${pidfiles[@]}"; do
    [[ -f $pidfile ]] || continue
    local pid; pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
}

case $cmd in
  start) start "${@:2}" ;;
  add-node) add_node "${@:2}" ;;
  stop) stop "${@:2}" ;;
  *) echo "usage: ray_head.sh start|add-node|stop DIR ..." >&2; exit 2 ;;
esac
