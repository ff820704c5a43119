#!/usr/bin/env bash
# The classroom demo: builds fastchat, starts a balancer and three chat servers on a SQLite file
# in a temporary folder, runs a short conversation, and stops everything it started (by PID).
#
#   scripts/demo.sh          # run it
#   KEEP=1 scripts/demo.sh   # keep the temporary folder (database, logs) for a look afterwards
#   FASTCHAT_BIN=DIR scripts/demo.sh   # use binaries already built in DIR (no build step)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/lib.sh"

if [ -t 1 ]; then bold=$'\e[1m'; dim=$'\e[2m'; cyan=$'\e[36m'; reset=$'\e[0m'; else bold=; dim=; cyan=; reset=; fi
say()  { printf '\n%s== %s%s\n' "$bold" "$*" "$reset"; }
show() { printf '%s$ %s%s\n' "$dim" "$*" "$reset"; }
as()   { local user=$1; shift; show "fastchat --user $user $*"; FASTCHAT_PASSWORD="pw-$user" "$FASTCHAT_BIN/fastchat" --user "$user" "$@" | sed "s/^/  $cyan/;s/\$/$reset/"; }

if [ -z "${FASTCHAT_BIN:-}" ]; then
  say "Building"
  (cd "$root" && cargo build --quiet --bins)
  FASTCHAT_BIN="$root/target/debug"
fi
export FASTCHAT_BIN

dir=$(mktemp -d "${TMPDIR:-/tmp}/fastchat-demo.XXXXXX")
cleanup() {
  stop_all "$dir"
  if [ "${KEEP:-}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

say "Starting a balancer and three chat servers (database: $dir/chat.db)"
balancer=$(start_balancer "$dir" --scrypt-log-n 10 --algo round-robin)
echo "  balancer   $balancer"
for n in 1 2 3; do
  echo "  server $n   $(start_server "$dir" "$n" "$balancer")"
done
export FASTCHAT_BALANCER=$balancer FASTCHAT_HOME="$dir/home"
sleep 0.6 # one heartbeat, so every server knows its peers

say "Signing up alice, bob and carol (each gets X25519 + Ed25519 keys)"
for u in alice bob carol; do FASTCHAT_PASSWORD="pw-$u" "$FASTCHAT_BIN/fastchat" signup "$u" | sed 's/^/  /'; done

say "Which server does each user get? (round-robin)"
for u in alice bob carol; do as "$u" whoami; done

say "bob is online (listening for 3 s); alice sends him a message, end-to-end encrypted"
FASTCHAT_PASSWORD=pw-bob "$FASTCHAT_BIN/fastchat" --user bob recv --wait 3 >"$dir/bob.out" &
bob_pid=$!
if command -v sqlite3 >/dev/null; then
  for i in $(seq 100); do # until bob's connection is registered (at most 5 s)
    [ "$(sqlite3 "$dir/chat.db" "SELECT count(*) FROM presence WHERE user='bob'" 2>/dev/null || echo 0)" -ge 1 ] && break
    sleep 0.05
  done
else
  sleep 1
fi
as alice send bob "hi bob, this crossed the peer mesh if we are on different servers"
wait "$bob_pid"
echo "  bob's screen:"; sed "s/^/  $cyan/;s/\$/$reset/" "$dir/bob.out"

say "carol is offline; alice and bob write to her"
as alice send carol "carol, lunch at noon?"
as bob send carol "and bring the slides"
echo "  what the server stored (ciphertext only):"
sqlite3 "$dir/chat.db" "SELECT '  #' || id || ' ' || sender || ' -> ' || recipient || ': ' || hex(substr(body, 1, 24)) || '...' FROM messages" 2>/dev/null \
  || echo "  (install sqlite3 to see the stored rows)"

say "carol logs in and catches up, in order"
as carol recv
say "A second recv: nothing left, the queue was emptied on acknowledgement"
as carol recv
echo "  (nothing)"

say "Live servers and their load"
as alice servers

say "Done: stopping every process this demo started"
