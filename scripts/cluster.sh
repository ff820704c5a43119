#!/usr/bin/env bash
# Starts or stops a local fastchat cluster: one balancer and N chat servers on one database.
#
#   scripts/cluster.sh start N DIR [BALANCER-OPTIONS...]   start a balancer and N servers in DIR
#   scripts/cluster.sh stop DIR                            stop every process started in DIR
#   scripts/cluster.sh status DIR                          list the processes and the live servers
#
# DIR holds chat.db (or, with FASTCHAT_DB=postgres://..., the cluster uses that database),
# tls/ (the cluster's certificate authority and a certificate per process, made on the first
# start), one log and one PID file per process, and "balancer.addr". Every
# link is TLS. Processes are stopped by the PIDs recorded there, nothing else. Binaries come
# from target/release (built if missing) unless FASTCHAT_BIN names another folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/lib.sh"

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
shift

binaries() {
  if [ -z "${FASTCHAT_BIN:-}" ]; then
    FASTCHAT_BIN="$root/target/release"
    if [ ! -x "$FASTCHAT_BIN/fastchat-server" ] || [ ! -x "$FASTCHAT_BIN/fastchat-admin" ]; then
      echo "building release binaries..." >&2
      (cd "$root" && cargo build --release --quiet --bins)
    fi
  fi
  export FASTCHAT_BIN
}

case "$cmd" in
  start)
    [ $# -ge 2 ] || usage
    n=$1 dir=$2
    shift 2
    case "$n" in '' | *[!0-9]*) echo "cluster.sh: N must be a number, not '$n'" >&2; exit 2 ;; esac
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if compgen -G "$dir/*.pid" >/dev/null; then
      echo "cluster.sh: $dir already has running processes; stop them first" >&2
      exit 1
    fi
    binaries
    init_tls "$dir" "$n"
    balancer=$(start_balancer "$dir" "$@") || { stop_all "$dir"; exit 1; }
    echo "$balancer" >"$dir/balancer.addr"
    echo "balancer  $balancer  (pid $(cat "$dir/balancer.pid"))"
    for i in $(seq "$n"); do
      addr=$(start_server "$dir" "$i" "$balancer") || { stop_all "$dir"; exit 1; }
      echo "server $i  $addr  (pid $(cat "$dir/server$i.pid"))"
    done
    echo "export FASTCHAT_BALANCER=$balancer FASTCHAT_CA=$dir/tls/ca.pem"
    ;;
  stop)
    dir=$1
    [ -d "$dir" ] || { echo "cluster.sh: no such folder $dir" >&2; exit 1; }
    stop_all "$dir"
    echo "stopped every process started in $dir"
    ;;
  status)
    dir=$1
    for f in "$dir"/*.pid; do
      [ -e "$f" ] || { echo "no processes"; exit 0; }
      pid=$(cat "$f")
      if running "$pid"; then state=running; else state=stopped; fi
      echo "$(basename "$f" .pid)  pid $pid  $state"
    done
    binaries
    "$FASTCHAT_BIN/fastchat" --balancer "$(cat "$dir/balancer.addr")" --ca "$dir/tls/ca.pem" servers || true
    ;;
  *) usage ;;
esac
