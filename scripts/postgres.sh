#!/usr/bin/env bash
# A private PostgreSQL server for fastchat's tests, benchmarks and demos: data in a folder of
# your choosing, run as the system's `postgres` user, listening on loopback only (or the
# address you give), TLS on with a certificate made for it, password (SCRAM) logins.
#
#   scripts/postgres.sh start DIR [ADDR]   # installs PostgreSQL if missing, starts it, prints
#                                          # the URL (also in DIR/url)
#   scripts/postgres.sh url DIR            # prints the URL of a running one
#   scripts/postgres.sh stop DIR           # stops it (the data stays in DIR)
#
# The URL names the database `fastchat` and its owner `fastchat`; the password is made at
# the first start and kept in DIR/password (0600). Tests make one database per test beside it.
#
# Exit codes: 0 done, 1 it failed (the server's log is printed), 2 bad arguments.
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
addr=${3:-127.0.0.1}

bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$d" ] || [ ! -x "$d/postgres" ]; then
    return 1
  fi
  echo "$d"
}

install_postgres() {
  if bindir >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "postgres.sh: PostgreSQL is not installed; run as root to install it (apt)" >&2
    exit 1
  fi
  echo "postgres.sh: installing PostgreSQL from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  # The package starts a cluster of its own on port 5432; ours runs beside it, so that one
  # is stopped (it is not ours to keep running).
  if command -v pg_ctlcluster >/dev/null; then
    for c in $(ls /etc/postgresql 2>/dev/null); do
      pg_ctlcluster "$c" main stop 2>/dev/null || true
    done
  fi
}

# Runs a command as the postgres user (PostgreSQL refuses to run as root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "$*"
  else
    sh -c "$*"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  install_postgres
  local bin
  bin=$(bindir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/data/postmaster.pid" ] && as_postgres "'$bin/pg_ctl' -D '$dir/data' status" >/dev/null 2>&1; then
    cat "$dir/url"
    return
  fi
  if [ ! -d "$dir/data" ]; then
    umask 077
    head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$dir/password"
    install -d -m 0700 "$dir/data" "$dir/run"
    if [ "$(id -u)" = 0 ]; then
      chown postgres "$dir/data" "$dir/run" "$dir/password"
      # The postgres user needs to reach the folder.
      chmod 0711 "$dir"
    fi
    as_postgres "'$bin/initdb' -D '$dir/data' -U fastchat -A scram-sha-256 --pwfile='$dir/password' -E UTF8 --locale=C.UTF-8" >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      exit 1
    }
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$addr" \
      -keyout "$dir/data/server.key" -out "$dir/data/server.crt" >/dev/null 2>&1
    chmod 0600 "$dir/data/server.key"
    [ "$(id -u)" = 0 ] && chown postgres "$dir/data/server.key" "$dir/data/server.crt"
    cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '$addr'
unix_socket_directories = '$dir/run'
max_connections = 400
ssl = on
shared_buffers = 256MB
log_min_messages = warning
EOF
    echo "host all all 0.0.0.0/0 scram-sha-256" >>"$dir/data/pg_hba.conf"
    echo "$(free_port)" >"$dir/port"
  fi
  local port
  port=$(cat "$dir/port")
  if ! as_postgres "'$bin/pg_ctl' -D '$dir/data' -l '$dir/data/server.log' -o '-p $port' -w -t 60 start" >/dev/null; then
    cat "$dir/data/server.log" >&2 || true
    exit 1
  fi
  local url="postgres://fastchat:$(cat "$dir/password")@$addr:$port/fastchat"
  # The database the URL names (initdb made only `postgres`).
  PGPASSWORD=$(cat "$dir/password") "$bin/psql" -q -h "$addr" -p "$port" -U fastchat -d postgres \
    -c "SELECT 1 FROM pg_database WHERE datname = 'fastchat'" -tA | grep -q 1 ||
    PGPASSWORD=$(cat "$dir/password") "$bin/createdb" -h "$addr" -p "$port" -U fastchat fastchat
  echo "$url" >"$dir/url"
  chmod 0600 "$dir/url"
  echo "$url"
}

stop() {
  local bin
  bin=$(bindir) || exit 0
  [ -d "$dir/data" ] || exit 0
  as_postgres "'$bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null 2>&1 || true
}

case $cmd in
  start) start ;;
  stop) stop ;;
  url) cat "$dir/url" ;;
  *) usage ;;
esac
