# Shared shell helpers for scripts/demo.sh and scripts/cluster.sh. Source it; do not run it.

# Waits (at most ~10 s) until FILE has a line starting with PREFIX; prints that line's last word.
wait_for_line() {
  local file=$1 prefix=$2 i line
  for i in $(seq 200); do
    line=$(grep -m1 "^$prefix" "$file" 2>/dev/null || true)
    if [ -n "$line" ]; then
      echo "${line##* }"
      return 0
    fi
    sleep 0.05
  done
  echo "timed out waiting for '$prefix' in $file" >&2
  return 1
}

# Makes the cluster's certificate authority and certificates for a balancer and N servers in
# DIR/tls (unless it exists: then certificates are added for servers that have none).
init_tls() {
  local dir=$1 n=$2 i
  if [ ! -e "$dir/tls/ca.pem" ]; then
    "$FASTCHAT_BIN/fastchat-admin" init "$dir/tls" --servers "$n" >"$dir/tls.out"
  fi
  for i in $(seq "$n"); do
    [ -e "$dir/tls/server-$i.pem" ] || "$FASTCHAT_BIN/fastchat-admin" cert "$dir/tls" --server "server-$i" >>"$dir/tls.out"
  done
}

# Starts a balancer in DIR on a free port (or on BALANCER_LISTEN, if set), with the
# certificates in DIR/tls; prints its address. Extra arguments go to it.
start_balancer() {
  local dir=$1; shift
  "$FASTCHAT_BIN/fastchat-balancer" --listen "${BALANCER_LISTEN:-127.0.0.1:0}" --db "${FASTCHAT_DB:-$dir/chat.db}" --tls-dir "$dir/tls" "$@" \
    >"$dir/balancer.out" 2>"$dir/balancer.log" &
  echo $! >"$dir/balancer.pid"
  wait_for_line "$dir/balancer.out" "fastchat-balancer listening on"
}

# Starts chat server number N in DIR against BALANCER, with certificate server-N from
# DIR/tls; prints its address.
start_server() {
  local dir=$1 n=$2 balancer=$3
  "$FASTCHAT_BIN/fastchat-server" --listen 127.0.0.1:0 --balancer "$balancer" --db "${FASTCHAT_DB:-$dir/chat.db}" \
    --tls-dir "$dir/tls" --name "server-$n" \
    >"$dir/server$n.out" 2>"$dir/server$n.log" &
  echo $! >"$dir/server$n.pid"
  wait_for_line "$dir/server$n.out" "fastchat-server"
}

# True while PID runs (an exited process waiting to be reaped does not count).
running() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state#Z}" = "$state" ]
}

# Stops every process with a PID file in DIR (SIGTERM, then SIGKILL after 3 s).
stop_all() {
  local dir=$1 f pid i
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 60); do
      running "$pid" || break
      sleep 0.05
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

# Waits (at most ~10 s) until FILE contains TEXT; fails with a message otherwise.
wait_for_text() {
  local file=$1 text=$2 i
  for i in $(seq 200); do
    grep -qF -- "$text" "$file" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "timed out waiting for '$text' in $file:" >&2
  cat "$file" >&2 2>/dev/null || true
  return 1
}
