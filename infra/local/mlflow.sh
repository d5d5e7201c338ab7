#!/usr/bin/env bash
# A real MLflow tracking server on 127.0.0.1 (or MLFLOW_HOST): SQLite backend store, artifacts
# proxied by the server to S3 (the local Ceph gateway or any S3 store).
#
#   infra/local/mlflow.sh start DIR PORT ARTIFACTS_URI [LIFETIME_S]
#   infra/local/mlflow.sh stop DIR
#
# The S3 endpoint and keys are read from the caller's AWS_* variables and given
# to the server only: clients upload artifacts through the server.
set -euo pipefail
cmd=${1:?usage: mlflow.sh start DIR PORT ARTIFACTS_URI [LIFETIME_S] | stop DIR}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-$here/../../.venv/bin/python}

start() {
  local D; D=$(realpath -m "${1:?DIR}"); local port=${2:?PORT} artifacts=${3:?ARTIFACTS_URI} lifetime=${4:-7200}
  local host=${MLFLOW_HOST:-127.0.0.1}  # hosts.sh: the bridge's address
  mkdir -p "$D"
  # The job-execution feature starts extra workers (~2 GB, +15 s); not needed here.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  MLFLOW_S3_ENDPOINT_URL=${AWS_ENDPOINT_URL:-} \
  setsid timeout "$lifetime" "$python" -m mlflow server \
    --backend-store-uri "sqlite:///$D/mlflow.db" --artifacts-destination "$artifacts" \
    --host "$host" --port "$port" --workers 1 >"$D/mlflow.out" 2>&1 &
  echo $! >"$D/mlflow.pid"
  local deadline=$((SECONDS + 120))
  until curl -sf "http://$host:$port/health" >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$D/mlflow.pid")" 2>/dev/null || ((SECONDS > deadline)); then
      echo "mlflow.sh: server did not start; see $D/mlflow.out" >&2; tail -20 "$D/mlflow.out" >&2; return 1
    fi
    sleep 0.5
  done
  echo "mlflow.sh: MLflow at http://$host:$port (artifacts $artifacts)" >&2
}

stop() {
  local D; D=$(realpath -m "${1:?DIR}")
  [[ -f $D/mlflow.pid ]] || return 0
  local pid; pid=$(cat "$D/mlflow.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$D/mlflow.pid"
}

case $cmd in
  start) start "${@:2}" ;;
  stop) stop "${@:2}" ;;
  *) echo "usage: mlflow.sh start DIR PORT ARTIFACTS_URI [LIFETIME_S] | stop DIR" >&2; exit 2 ;;
esac
