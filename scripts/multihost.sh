#!/usr/bin/env bash
# A fastchat cluster across machines, simulated on this one with network namespaces: three
# hosts and a database host on a private bridge, PostgreSQL on its own host, two balancers and
# three chat servers on different hosts. It runs a conversation, kills every process of one
# host (kill -9) and cuts its network, then shows that nothing was lost.
#
#   scripts/multihost.sh [DIR]     (as root; DIR keeps logs and data, default: a temp folder)
#
#   namespace    address      runs
#   fc<id>-net   (bridge)     the switch: a bridge joining the others' cables
#   fc<id>-db    10.77.0.2    PostgreSQL (TLS, password logins), as the postgres user
#   fc<id>-h1    10.77.0.11   balancer 1, server 1
#   fc<id>-h2    10.77.0.12   balancer 2, server 2
#   fc<id>-h3    10.77.0.13   server 3, and the users' commands
#
# Traffic stays inside these namespaces. Everything is removed at the end, however it ends.
# Binaries come from target/release (built if missing) unless FASTCHAT_BIN names a folder.
# Exit codes: 0 the story held, 1 something was lost or failed (logs in DIR), 2 bad usage.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/lib.sh"

case "${1:-}" in -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
[ "$(id -u)" = 0 ] || { echo "multihost.sh: network namespaces need root" >&2; exit 2; }
command -v ip >/dev/null || { echo "multihost.sh: needs ip (iproute2)" >&2; exit 2; }

if [ $# -ge 1 ]; then
  dir=$1
  mkdir -p "$dir"
  keep=1
else
  dir=$(mktemp -d /tmp/fastchat-multihost.XXXXXX)
  keep=0
fi
dir=$(cd "$dir" && pwd)
# The data folder must be reachable by the postgres user.
chmod 0711 "$dir"

if [ -z "${FASTCHAT_BIN:-}" ]; then
  FASTCHAT_BIN="$root/target/release"
  if [ ! -x "$FASTCHAT_BIN/fastchat-server" ]; then
    echo "building release binaries..." >&2
    (cd "$root" && cargo build --release --quiet --bins)
  fi
fi
export FASTCHAT_BIN

# Names unique to this run, so that two runs (or a run and a test) never meet.
id=$$
ns_net=fc$id-net
hosts=(fc$id-db fc$id-h1 fc$id-h2 fc$id-h3)
addrs=(10.77.0.2 10.77.0.11 10.77.0.12 10.77.0.13)

say() { printf '\n== %s\n' "$*"; }
in_host() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

cleanup() {
  set +e
  stop_all "$dir"
  [ -d "$dir/pg" ] && in_host "${hosts[0]}" "$root/scripts/postgres.sh" stop "$dir/pg" >/dev/null 2>&1
  for ns in "${hosts[@]}" "$ns_net"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null
    ip netns del "$ns" 2>/dev/null
  done
  [ "$keep" = 1 ] || rm -rf "$dir"
}
trap cleanup EXIT

say "The network: a bridge and four hosts, in namespaces of this run"
ip netns add "$ns_net"
in_host "$ns_net" ip link add br0 type bridge
in_host "$ns_net" ip link set br0 up
for i in "${!hosts[@]}"; do
  ns=${hosts[$i]}
  ip netns add "$ns"
  # A cable: one end in the host (eth0), the other on the bridge.
  ip link add "fc$id-$i" type veth peer name "fc$id-b$i"
  ip link set "fc$id-$i" netns "$ns"
  ip link set "fc$id-b$i" netns "$ns_net"
  in_host "$ns" ip link set "fc$id-$i" name eth0
  in_host "$ns" ip addr add "${addrs[$i]}/24" dev eth0
  in_host "$ns" ip link set eth0 up
  in_host "$ns" ip link set lo up
  in_host "$ns_net" ip link set "fc$id-b$i" master br0
  in_host "$ns_net" ip link set "fc$id-b$i" up
  echo "   $ns  ${addrs[$i]}"
done

say "PostgreSQL on ${addrs[0]} (its own host)"
url=$(in_host "${hosts[0]}" "$root/scripts/postgres.sh" start "$dir/pg" "${addrs[0]}")
echo "   $(echo "$url" | sed 's/:[^:@]*@/:***@/')"
export FASTCHAT_DB=$url

say "Certificates: a cluster CA, two balancers, three servers"
"$FASTCHAT_BIN/fastchat-admin" init "$dir/tls" --servers 3 >"$dir/tls.out"

start_balancer_on() {
  local n=$1 host=$2 addr=$3
  in_host "$host" "$FASTCHAT_BIN/fastchat-balancer" --listen "$addr:7000" --db "$url" \
    --tls-dir "$dir/tls" --scrypt-log-n 10 \
    >"$dir/balancer$n.out" 2>"$dir/balancer$n.log" &
  echo $! >"$dir/balancer$n.pid"
  disown $!
  wait_for_line "$dir/balancer$n.out" "fastchat-balancer listening on" >/dev/null
  echo "   balancer $n on $host, $addr:7000"
}

start_server_on() {
  local n=$1 host=$2 addr=$3
  in_host "$host" "$FASTCHAT_BIN/fastchat-server" --listen "$addr:7100" \
    --balancer "${addrs[1]}:7000,${addrs[2]}:7000" --db "$url" \
    --tls-dir "$dir/tls" --name "server-$n" \
    >"$dir/server$n.out" 2>"$dir/server$n.log" &
  echo $! >"$dir/server$n.pid"
  disown $!
  wait_for_line "$dir/server$n.out" "fastchat-server" >/dev/null
  echo "   server $n on $host, $addr:7100"
}

say "Two balancers and three servers, on three hosts, one database"
start_balancer_on 1 "${hosts[1]}" "${addrs[1]}"
start_balancer_on 2 "${hosts[2]}" "${addrs[2]}"
start_server_on 1 "${hosts[1]}" "${addrs[1]}"
start_server_on 2 "${hosts[2]}" "${addrs[2]}"
start_server_on 3 "${hosts[3]}" "${addrs[3]}"

# The users sit on host 3 and know both balancers.
user() {
  local who=$1; shift
  in_host "${hosts[3]}" env FASTCHAT_BALANCER="${addrs[1]}:7000,${addrs[2]}:7000" \
    FASTCHAT_CA="$dir/tls/ca.pem" FASTCHAT_HOME="$dir/home" FASTCHAT_USER="$who" \
    FASTCHAT_PASSWORD="password-$who-multihost" FASTCHAT_NO_RECEIPTS=1 \
    "$FASTCHAT_BIN/fastchat" "$@"
}

say "A conversation"
user alice signup alice >/dev/null
user bob signup bob >/dev/null
user carol signup carol >/dev/null
user alice group create team >/dev/null
user alice group add team bob carol >/dev/null
user alice send bob "before the outage: 1"
user alice send bob "before the outage: 2"
user carol group send team "carol to the team, before"

say "Host 1 dies: kill -9 of its balancer and server, and its cable cut"
kill -9 "$(cat "$dir/balancer1.pid")" "$(cat "$dir/server1.pid")"
rm -f "$dir/balancer1.pid" "$dir/server1.pid"
in_host "${hosts[1]}" ip link set eth0 down
echo "   host 1 (${addrs[1]}) is gone"

say "The conversation goes on through balancer 2 (each command gives balancer 1 three seconds)"
user alice send bob "during the outage: 3"
user carol group send team "carol to the team, during"
user dave signup dave >/dev/null
user dave send bob "a newcomer, during the outage"

say "Bob reads everything"
got=$(user bob recv)
echo "$got" | sed 's/^/   /'
expected=(
  "alice: before the outage: 1"
  "alice: before the outage: 2"
  "[alice/team] carol: carol to the team, before"
  "alice: during the outage: 3"
  "[alice/team] carol: carol to the team, during"
  "dave: a newcomer, during the outage"
)
lost=0
for line in "${expected[@]}"; do
  if ! grep -qxF -- "$line" <<<"$got"; then
    echo "LOST: $line" >&2
    lost=1
  fi
done
# Exactly once: nothing shown twice.
if [ "$(echo "$got" | grep -v '^\[alice/team\] \* ' | sort | uniq -d | wc -l)" != 0 ]; then
  echo "REPEATED: $(echo "$got" | sort | uniq -d)" >&2
  lost=1
fi
if [ "$lost" = 1 ]; then
  echo "multihost.sh: something was lost or repeated; logs in $dir" >&2
  keep=1
  exit 1
fi
say "Nothing lost, nothing repeated: $((${#expected[@]})) messages across three hosts and an outage"
