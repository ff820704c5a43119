#!/usr/bin/env bash
# Starts, stops or restarts a local fastchat cluster: one balancer and N chat servers on one
# database.
#
#   scripts/cluster.sh start N DIR [BALANCER-OPTIONS...]   start a balancer and N servers in DIR
#   scripts/cluster.sh stop DIR                            stop every process started in DIR
#   scripts/cluster.sh status DIR                          list the processes and the live servers
#                                                          (exit code 1 if one of them is down)
#   scripts/cluster.sh restart DIR                         start again the ones that died (kill -9,
#                                                          a crash), as they were started
#
# DIR holds chat.db (or, with FASTCHAT_DB=postgres://..., the cluster uses that database),
# tls/ (the cluster's certificate authority and a certificate per process, made on the first
# start), one log and one PID file per process, and "balancer.addr". Every
# link is TLS. Processes are stopped by the PIDs recorded there, nothing else. A restarted
# balancer takes its old address (clients and servers know it), with the options and the
# database it was started with; a restarted server a new port (the balancer hands it out);
# the log of the process that died is kept as NAME.log.old. Binaries come from
# target/release (built if missing) unless FASTCHAT_BIN names another folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
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
      echo "cluster.sh: $dir already has a cluster: 'cluster.sh restart $dir' starts again what" \
        "died, 'cluster.sh stop $dir' ends it" >&2
      exit 1
    fi
    binaries
    init_tls "$dir" "$n"
    # What `restart` needs to start a process again as it was (the URL may hold a password).
    (
      umask 077
      echo "${FASTCHAT_DB:-$dir/chat.db}" >"$dir/db"
      if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi >"$dir/balancer.args"
    )
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
  restart)
    dir=$1
    [ -d "$dir" ] || { echo "cluster.sh: no such folder $dir" >&2; exit 1; }
    dir=$(cd "$dir" && pwd)
    if ! compgen -G "$dir/*.pid" >/dev/null || [ ! -e "$dir/balancer.args" ]; then
      echo "cluster.sh: no cluster to restart in $dir: start one with cluster.sh start N $dir" >&2
      exit 1
    fi
    binaries
    FASTCHAT_DB=$(cat "$dir/db")
    balancer=$(cat "$dir/balancer.addr")
    restarted=0
    if ! running "$(cat "$dir/balancer.pid")"; then
      mapfile -t args <"$dir/balancer.args"
      mv -f "$dir/balancer.log" "$dir/balancer.log.old" 2>/dev/null || true
      BALANCER_LISTEN=$balancer start_balancer "$dir" "${args[@]}" >/dev/null || {
        echo "cluster.sh: the balancer did not start again: see $dir/balancer.log" >&2
        exit 1
      }
      echo "balancer  $balancer  (pid $(cat "$dir/balancer.pid"), restarted)"
      restarted=$((restarted + 1))
    fi
    for f in "$dir"/server*.pid; do
      [ -e "$f" ] || continue
      running "$(cat "$f")" && continue
      i=${f##*/server}
      i=${i%.pid}
      mv -f "$dir/server$i.log" "$dir/server$i.log.old" 2>/dev/null || true
      addr=$(start_server "$dir" "$i" "$balancer") || {
        echo "cluster.sh: server $i did not start again: see $dir/server$i.log" >&2
        exit 1
      }
      echo "server $i  $addr  (pid $(cat "$f"), restarted)"
      restarted=$((restarted + 1))
    done
    [ "$restarted" -gt 0 ] || echo "every process in $dir is running"
    ;;
  status)
    dir=$1
    down=0
    for f in "$dir"/*.pid; do
      [ -e "$f" ] || { echo "no processes"; exit 0; }
      pid=$(cat "$f")
      if running "$pid"; then state=running; else state=stopped down=1; fi
      echo "$(basename "$f" .pid)  pid $pid  $state"
    done
    binaries
    "$FASTCHAT_BIN/fastchat" --balancer "$(cat "$dir/balancer.addr")" --ca "$dir/tls/ca.pem" servers || true
    exit "$down"
    ;;
  *) usage ;;
esac
