#!/usr/bin/env bash
# Real hosts on one machine (root): a Ray cluster whose nodes are Linux network
# namespaces on a bridge, each with its own IP, its own private /tmp (a mount
# namespace) and its own PID space; S3 (Ceph) and MLflow listen on the bridge's
# address. Faults are then injected between them.
#
#   infra/local/hosts.sh install                          # iptables from Debian
#   infra/local/hosts.sh start DIR [NODES] [LIFETIME_S]   # NODES namespaces (default 2); head in node 0
#   infra/local/hosts.sh env DIR                          # export lines: job server, token, S3, MLflow
#   infra/local/hosts.sh link DIR NODE up|down            # NODE's link to the bridge
#   infra/local/hosts.sh s3 DIR up|down                   # every node's route to S3 (refused when down)
#   infra/local/hosts.sh impair DIR DELAY_MS LOSS_PCT RATE_MBIT  # every node's link; `impair DIR 0 0 0` clears
#   infra/local/hosts.sh stop DIR                         # all it made: by PID, then by name
#
# The head (node 0) runs the job server with token authentication; worker nodes
# rejoin by themselves when their raylet ends (as a replaced host or a restarted
# pod would). Every process runs under `timeout LIFETIME`; the namespaces, links
# and bridge are named in DIR/created so that `stop` removes exactly those, and a
# watchdog runs `stop` itself once LIFETIME is over.
set -euo pipefail
cmd=${1:?usage: hosts.sh install|start|env|link|s3|impair|stop DIR ...}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv_bin=${VENV_BIN:-$repo/.venv/bin}
GCS_PORT=6379
DASHBOARD_PORT=8265
# The GCS marks a silent node dead after about 5 missed 1 s checks (Ray's default waits
# ~65 s): a fault test then sees the restart in seconds, not minutes.
HEALTH_CHECKS=(RAY_health_check_initial_delay_ms=2000 RAY_health_check_period_ms=1000
               RAY_health_check_timeout_ms=2000 RAY_health_check_failure_threshold=5)

die() { echo "hosts.sh: $*" >&2; exit 1; }

install() {
  command -v ip >/dev/null && command -v unshare >/dev/null || die "needs iproute2 and util-linux"
  command -v iptables >/dev/null && return 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends iptables >/dev/null
}

state() {  # state DIR: reads what start recorded
  D=$(realpath -m "${1:?DIR}")
  [[ -f $D/hosts.env ]] || die "no cluster recorded in $D (run start first)"
  # shellcheck disable=SC1091
  source "$D/hosts.env"
}

node_ns() { echo "${NAME}n$1"; }
node_link() { echo "${NAME}v$1"; }
node_ip() { echo "$SUBNET.$((10 + $1))"; }

created() { echo "$1 $2" >>"$D/created"; }  # created KIND NAME: what stop removes

claim_bridge() {  # the first free mrh<N> bridge; creating it is the claim
  local n
  for n in $(seq 1 250); do
    if ip link add "mrh$n" type bridge 2>/dev/null; then
      NAME="mrh$n"; SUBNET="10.231.$n"; created bridge "$NAME"; return 0
    fi
  done
  die "no free bridge name mrh1..mrh250"
}

free_port() {
  python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$1"
}

node_env() {  # the environment every Ray node starts with (read by `_node` inside the namespace)
  cat <<ENV
export PATH=$venv_bin:\$PATH
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat "$D/token")
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export MINT_RAY_CACHE=/tmp/mint-ray-cache
$(grep '^export AWS_' "$D/s3.env")
export MLFLOW_TRACKING_URI=http://$SUBNET.1:$MLFLOW_PORT
ENV
}

start() {
  D=$(realpath -m "${1:?DIR}"); local nodes=${2:-2} lifetime=${3:-3600}
  [[ $(id -u) == 0 ]] || die "network namespaces need root"
  [[ ! -f $D/hosts.env ]] || die "$D already holds a cluster (stop it first)"
  mkdir -p "$D"; chmod 700 "$D"; : >"$D/created"
  claim_bridge
  ip addr add "$SUBNET.1/24" dev "$NAME"
  ip link set "$NAME" up
  local k ns link
  for ((k = 0; k < nodes; k++)); do
    ns=$(node_ns "$k"); link=$(node_link "$k")
    ip netns add "$ns"; created netns "$ns"
    ip link add "$link" type veth peer name eth0 netns "$ns"; created link "$link"
    ip link set "$link" master "$NAME" up
    ip -n "$ns" addr add "$(node_ip "$k")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  S3_PORT=$(free_port "$SUBNET.1"); MLFLOW_PORT=$(free_port "$SUBNET.1")
  cat >"$D/hosts.env" <<ENV
NAME=$NAME SUBNET=$SUBNET NODES=$nodes LIFETIME=$lifetime S3_PORT=$S3_PORT MLFLOW_PORT=$MLFLOW_PORT
ENV
  (umask 077; head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$D/token")

  # S3 and MLflow on the host, bound to the bridge's address only.
  S3_HOST=$SUBNET.1 S3_PORT=$S3_PORT MON_PORT=$(free_port 127.0.0.1) MON2_PORT=$(free_port 127.0.0.1) \
    "$here/s3.sh" start "$D/s3" "$lifetime"
  (umask 077; "$here/s3.sh" env "$D/s3" >"$D/s3.env")
  # shellcheck disable=SC1091
  (source "$D/s3.env"; "$venv_bin/python" -c "import boto3; boto3.client('s3').create_bucket(Bucket='mlflow')"
   MLFLOW_HOST=$SUBNET.1 "$here/mlflow.sh" start "$D/mlflow" "$MLFLOW_PORT" s3://mlflow/artifacts "$lifetime")
  (umask 077; node_env >"$D/node.env")

  local built=${TORCH_EXTENSIONS_DIR:-$repo/.local/torch_extensions}
  for ((k = 0; k < nodes; k++)); do
    mkdir -p "$D/node-$k/tmp"
    # DeepSpeed's JIT-built ops, copied into the node's own /tmp without their build locks
    # (a lock left by another process would hang every rank).
    if [[ -d $built ]]; then
      cp -a "$built" "$D/node-$k/tmp/torch_extensions"  # -a: ninja compares timestamps
      find "$D/node-$k/tmp/torch_extensions" -name lock -delete
    fi
    # A PID namespace per node: its processes are stopped with it, and `ray stop` or a
    # process scan inside it sees only that node's. --kill-child takes them all down
    # when the recorded PID ends.
    setsid timeout "$lifetime" ip netns exec "$(node_ns "$k")" \
      unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
      bash "$here/hosts.sh" _node "$D" "$k" >"$D/node-$k/node.out" 2>&1 &
    echo $! >"$D/node-$k.pid"
    ((k > 0)) || wait_for_head
  done
  wait_for_nodes "$nodes"
  # The namespaces, links and bridge outlive no one: after the lifetime, stop removes them
  # even if the caller never does.
  setsid bash -c "sleep $lifetime; exec '$here/hosts.sh' stop '$D'" >/dev/null 2>&1 &
  echo $! >"$D/watchdog.pid"
  echo "hosts.sh: $nodes Ray nodes on $NAME ($SUBNET.0/24); job server http://$(node_ip 0):$DASHBOARD_PORT," \
       "S3 http://$SUBNET.1:$S3_PORT, MLflow http://$SUBNET.1:$MLFLOW_PORT (state in $D)" >&2
}

job_server() { echo "http://$(node_ip 0):$DASHBOARD_PORT"; }

wait_for_head() {
  local deadline=$((SECONDS + 120))
  until RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat "$D/token") \
      "$venv_bin/ray" job list --address "$(job_server)" >/dev/null 2>&1; do
    kill -0 "$(cat "$D/node-0.pid")" 2>/dev/null || { tail -20 "$D/node-0/node.out" >&2; die "the head ended"; }
    ((SECONDS < deadline)) || { tail -20 "$D/node-0/node.out" >&2; die "the head's job server did not answer"; }
    sleep 0.5
  done
}

alive_nodes() {  # how many nodes the head counts as alive (its state API, with the token)
  curl -sf -H "Authorization: Bearer $(cat "$D/token")" "$(job_server)/api/v0/nodes?limit=1000" \
    | python3 -c 'import json, sys; print(sum(n["state"] == "ALIVE" for n in json.load(sys.stdin)["data"]["result"]["result"]))'
}

wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + 120))
  until [[ $(alive_nodes) == "$want" ]]; do
    ((SECONDS < deadline)) || die "fewer than $want nodes joined; see $D/node-*/node.out"
    sleep 1
  done
}

_node() {  # inside the node's namespaces
  D=$1; local k=$2
  state "$D"
  # shellcheck disable=SC1091
  source "$D/node.env"
  local tmp=$D/node-$k/tmp
  # A checkout under /tmp (a CI clone) must stay visible once /tmp is private.
  if [[ $repo == /tmp/* ]]; then
    mkdir -p "$tmp/${repo#/tmp/}"
    mount --bind "$repo" "$tmp/${repo#/tmp/}"
  fi
  mount --rbind "$tmp" /tmp
  cd /tmp
  local ip; ip=$(node_ip "$k")
  local common=(--block --disable-usage-stats --node-ip-address "$ip" --num-cpus 2
                --object-store-memory $((384 * 1024 * 1024)))
  if ((k == 0)); then
    exec env "${HEALTH_CHECKS[@]}" ray start --head "${common[@]}" --port "$GCS_PORT" \
      --dashboard-host "$ip" --dashboard-port "$DASHBOARD_PORT" --include-dashboard true
  fi
  while true; do  # a worker node rejoins after its raylet ends (e.g. the head marked it dead)
    ray start "${common[@]}" --address "$(node_ip 0):$GCS_PORT" || true
    echo "hosts.sh: node $k's raylet ended; rejoining" >&2
    sleep 2
  done
}

link() {
  state "$1"; local k=${2:?NODE} updown=${3:?up|down}
  ip link set "$(node_link "$k")" "$updown"
}

s3() {  # s3 DIR up|down: every node's connections to S3 refused (reset), or allowed again
  state "$1"; local updown=${2:?up|down} k op
  [[ $updown == down ]] && op=-A || op=-D
  for ((k = 0; k < NODES; k++)); do
    ip netns exec "$(node_ns "$k")" iptables "$op" OUTPUT -p tcp -d "$SUBNET.1" --dport "$S3_PORT" \
      -j REJECT --reject-with tcp-reset 2>/dev/null || [[ $op == -D ]]
  done
}

impair() {  # delay with netem where the kernel has it; loss with iptables; a rate cap with tbf
  state "$1"; local delay=${2:?DELAY_MS} loss=${3:?LOSS_PCT} rate=${4:?RATE_MBIT} k ns link
  for ((k = 0; k < NODES; k++)); do
    ns=$(node_ns "$k"); link=$(node_link "$k")
    tc qdisc del dev "$link" root 2>/dev/null || true
    ip netns exec "$ns" iptables -F INPUT
    if ((delay > 0)); then
      tc qdisc add dev "$link" root netem delay "${delay}ms" 2>/dev/null \
        || { echo "hosts.sh: this kernel has no netem: no delay on $link" >&2; }
    fi
    if ((rate > 0)) && ! tc qdisc show dev "$link" | grep -q netem; then
      tc qdisc add dev "$link" root tbf rate "${rate}mbit" burst 64kb latency 200ms
    fi
    if [[ $loss != 0 ]]; then  # dropped on the way into each node: both directions between nodes
      ip netns exec "$ns" iptables -A INPUT -m statistic --mode random \
        --probability "$(awk "BEGIN {print $loss / 100}")" -j DROP
    fi
  done
}

stop() {
  D=$(realpath -m "${1:?DIR}")
  local pidfile pid
  if [[ -f $D/watchdog.pid ]]; then  # unless this is the watchdog, stopping at the lifetime's end
    pid=$(cat "$D/watchdog.pid")
    [[ $pid == "$$" ]] || kill "$pid" 2>/dev/null || true
    rm -f "$D/watchdog.pid"
  fi
  # Every node is told at once, then given 10 s in all: one after the other, each
  # node's Ray would take its own grace.
  local pids=()
  for pidfile in "$D"/node-*.pid; do
    [[ -f $pidfile ]] || continue
    pids+=("$(cat "$pidfile")")
    kill -TERM -- "-${pids[-1]}" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  rm -f "$D"/node-*.pid
  [[ -d $D/mlflow ]] && "$here/mlflow.sh" stop "$D/mlflow"
  [[ -d $D/s3 ]] && "$here/s3.sh" stop "$D/s3"
  if [[ -f $D/created ]]; then  # namespaces first (their veth ends go with them), the bridge last
    local kind name
    while read -r kind name; do
      case $kind in
        netns) ip netns del "$name" 2>/dev/null || true ;;
        link) ip link del "$name" 2>/dev/null || true ;;
      esac
    done <"$D/created"
    while read -r kind name; do
      [[ $kind == bridge ]] && { ip link del "$name" 2>/dev/null || true; }
    done <"$D/created"
    rm -f "$D/created"
  fi
  rm -f "$D/hosts.env"
}

print_env() {
  state "$1"
  cat "$D/s3.env"
  echo "export MLFLOW_TRACKING_URI=http://$SUBNET.1:$MLFLOW_PORT"
  echo "export RAY_ADDRESS=$(job_server) RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat "$D/token")"
  echo "export MINT_HOSTS_SUBNET=$SUBNET MINT_HOSTS_NODES=$NODES"
}

case $cmd in
  install) install ;;
  start) start "${@:2}" ;;
  env) print_env "${@:2}" ;;
  link) link "${@:2}" ;;
  s3) s3 "${@:2}" ;;
  impair) impair "${@:2}" ;;
  stop) stop "${@:2}" ;;
  _node) _node "${@:2}" ;;
  *) echo "usage: hosts.sh install|start|env|link|s3|impair|stop DIR ..." >&2; exit 2 ;;
esac
