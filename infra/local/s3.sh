#!/usr/bin/env bash
# A real S3 server on 127.0.0.1: Ceph's RADOS Gateway (one monitor, one OSD on a
# sparse file, one gateway), all state in one private directory.
#
#   infra/local/s3.sh install            # Debian packages (root, ~1 min)
#   infra/local/s3.sh start DIR [LIFETIME_S]
#   infra/local/s3.sh env DIR            # prints export lines (endpoint, keys)
#   infra/local/s3.sh stop DIR           # stops the daemons by their PIDs
#   infra/local/s3.sh user DIR UID [CAPS] # another S3 user; prints its key export lines
#                                         # (CAPS e.g. "user-policy=*" to put IAM user policies)
#
# The gateway listens on S3_HOST (default 127.0.0.1). Ports come from S3_PORT / MON_PORT (defaults 7480 / 6789; the msgr2 port is
# MON_PORT-3489+... see below) so several instances can run side by side.
# Every daemon runs under `timeout LIFETIME` so a forgotten instance ends itself.
set -euo pipefail

cmd=${1:?usage: s3.sh install|start DIR [LIFETIME_S]|env DIR|stop DIR|user DIR UID [CAPS]}

install() {
  if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw ceph-common uuid-runtime curl >/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "s3.sh: timed out waiting for $what (logs in $D/log)" >&2; return 1; fi
    sleep 0.5
  done
}

start_daemon() {  # start_daemon NAME COMMAND... ; PID in $D/NAME.pid
  local name=$1; shift
  setsid timeout "$LIFETIME" "$@" >>"$D/log/$name.out" 2>&1 &
  echo $! >"$D/$name.pid"
}

start() {
  D=$(realpath -m "${1:?start needs a directory}")
  LIFETIME=${2:-7200}
  S3_HOST=${S3_HOST:-127.0.0.1}   # the gateway's address (hosts.sh: the bridge's)
  S3_PORT=${S3_PORT:-7480}
  MON_PORT=${MON_PORT:-6789}
  MON2_PORT=${MON2_PORT:-$((MON_PORT - 3489))}   # 3300 beside the default 6789
  ACCESS_KEY=${S3_ACCESS_KEY:-mintlocal}
  SECRET_KEY=${S3_SECRET_KEY:-$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)}
  if [[ -f $D/rgw.pid ]] && kill -0 "$(cat "$D/rgw.pid")" 2>/dev/null; then
    echo "s3.sh: already running in $D" >&2; return 0
  fi
  mkdir -p "$D/log" "$D/run" "$D/mon" "$D/osd"
  chmod 700 "$D"
  local fsid; fsid=$(cat "$D/fsid" 2>/dev/null || uuidgen); echo "$fsid" >"$D/fsid"
  cat >"$D/ceph.conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON2_PORT,v1:127.0.0.1:$MON_PORT]
public network = 127.0.0.0/8
run dir = $D/run
admin socket = $D/run/\$cluster-\$name.asok
log file = $D/log/\$cluster-\$name.log
keyring = $D/\$cluster.\$name.keyring
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
ms bind ipv6 = false
mon data = $D/mon/\$cluster-\$id
[osd]
osd data = $D/osd/\$cluster-\$id
osd objectstore = bluestore
bluestore block path = $D/osd/\$cluster-\$id/block.img
bluestore block create = true
bluestore block size = 10737418240
osd memory target = 1073741824
[client.rgw.a]
rgw frontends = beast endpoint=$S3_HOST:$S3_PORT
rgw data = $D/rgw
CONF
  export CEPH_CONF=$D/ceph.conf
  local ceph="ceph -c $D/ceph.conf"
  if [[ ! -f $D/mon/ceph-a/done ]]; then
    ceph-authtool --create-keyring "$D/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$D/ceph.client.admin.keyring" --gen-key -n client.admin \
      --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$D/mon.keyring" --import-keyring "$D/ceph.client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON2_PORT,v1:127.0.0.1:$MON_PORT]" "$D/monmap" >/dev/null
    ceph-mon -c "$D/ceph.conf" --mkfs -i a --monmap "$D/monmap" --keyring "$D/mon.keyring" >/dev/null
    touch "$D/mon/ceph-a/done"
  fi
  start_daemon mon ceph-mon -c "$D/ceph.conf" -f -i a
  wait_for 60 "the monitor" $ceph -s --connect-timeout 5

  if [[ ! -f $D/osd/osd-id ]]; then
    local uuid secret id
    uuid=$(uuidgen)
    secret=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$secret\"}" >"$D/osd-secret.json"
    id=$($ceph osd new "$uuid" -i "$D/osd-secret.json")
    mkdir -p "$D/osd/ceph-$id"
    ceph-authtool --create-keyring "$D/osd/ceph-$id/keyring" --name "osd.$id" --add-key "$secret" >/dev/null
    cp "$D/osd/ceph-$id/keyring" "$D/ceph.osd.$id.keyring"
    ceph-osd -c "$D/ceph.conf" -i "$id" --mkfs --osd-uuid "$uuid" >>"$D/log/osd-mkfs.out" 2>&1
    echo "$id" >"$D/osd/osd-id"
  fi
  local osd_id; osd_id=$(cat "$D/osd/osd-id")
  start_daemon osd ceph-osd -c "$D/ceph.conf" -f -i "$osd_id"
  wait_for 120 "the OSD" bash -c "$ceph osd stat | grep -q '1 up'"

  if [[ ! -f $D/ceph.client.rgw.a.keyring ]]; then
    $ceph auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' >"$D/ceph.client.rgw.a.keyring"
  fi
  mkdir -p "$D/rgw"
  start_daemon rgw radosgw -c "$D/ceph.conf" -f -n client.rgw.a
  wait_for 120 "the gateway on $S3_HOST:$S3_PORT" curl -sf "http://$S3_HOST:$S3_PORT"

  if [[ ! -f $D/credentials ]]; then
    radosgw-admin -c "$D/ceph.conf" user create --uid=mint --display-name=mint \
      --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null
    umask 077
    printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$ACCESS_KEY" "$SECRET_KEY" >"$D/credentials"
  fi
  echo "http://$S3_HOST:$S3_PORT" >"$D/endpoint"
  echo "s3.sh: S3 gateway up at http://$S3_HOST:$S3_PORT (state in $D, stops itself after ${LIFETIME}s)" >&2
}

print_env() {
  D=$(realpath -m "${1:?env needs a directory}")
  local endpoint; endpoint=$(cat "$D/endpoint")
  # shellcheck disable=SC1091
  source "$D/credentials"
  cat <<ENV
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export AWS_DEFAULT_REGION=us-east-1
export AWS_REQUEST_CHECKSUM_CALCULATION=when_required
export AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
ENV
}

add_user() {
  D=$(realpath -m "${1:?user needs a directory}")
  local uid=${2:?user needs a UID} caps=${3:-}
  local key secret
  key=$(uuidgen | tr -d '-' | tr 'a-f' 'A-F' | head -c 20)
  secret=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 40)
  radosgw-admin -c "$D/ceph.conf" user create --uid="$uid" --display-name="$uid" \
    --access-key="$key" --secret-key="$secret" ${caps:+--caps="$caps"} >/dev/null
  printf 'export AWS_ACCESS_KEY_ID=%s\nexport AWS_SECRET_ACCESS_KEY=%s\n' "$key" "$secret"
}

stop() {
  D=$(realpath -m "${1:?stop needs a directory}")
  for name in rgw osd mon; do   # gateway, then OSD, then monitor
    local pidfile=$D/$name.pid
    [[ -f $pidfile ]] || continue
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

case $cmd in
  install) install ;;
  start) install; start "${@:2}" ;;
  env) print_env "${@:2}" ;;
  stop) stop "${@:2}" ;;
  user) add_user "${@:2}" ;;
  *) echo "usage: s3.sh install|start DIR [LIFETIME_S]|env DIR|stop DIR|user DIR UID [CAPS]" >&2; exit 2 ;;
esac
