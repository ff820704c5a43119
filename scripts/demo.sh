#!/usr/bin/env bash
# The classroom demo: builds fastchat, starts a balancer and three chat servers on a SQLite file
# in a temporary folder, and plays a short story with four users, as a transcript: who is on
# which server, direct messages across servers, an offline user catching up, a group with a
# member removed (and the group key changed), an image, and a server killed mid-conversation
# with its users moved to another one and nothing lost. Stops everything it started (by PID).
#
#   scripts/demo.sh                     # run it (about 15 seconds once built)
#   scripts/demo.sh --dashboard         # also serve the live dashboard, and go slower to watch it
#   KEEP=1 scripts/demo.sh              # keep the temporary folder (database, logs, screens)
#   FASTCHAT_BIN=DIR scripts/demo.sh    # use binaries already built in DIR (no build step)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/lib.sh"

dashboard=false
case "${1:-}" in
  --dashboard) dashboard=true ;;
  "") ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

if [ -t 1 ]; then
  bold=$'\e[1m' dim=$'\e[2m' cyan=$'\e[36m' yellow=$'\e[33m' reset=$'\e[0m'
else
  bold= dim= cyan= yellow= reset=
fi
say()    {
  # With the dashboard, a moment before each step to look at it.
  if $dashboard; then sleep 3; fi
  printf '\n%s== %s%s\n' "$bold" "$*" "$reset"
}
note()   { printf '%s   %s%s\n' "$yellow" "$*" "$reset"; }
indent() { sed "s/^/   $cyan/;s/\$/$reset/"; }
# quoted ARGS...: the arguments as one would type them (quotes around those with spaces).
quoted() {
  local a out=()
  for a in "$@"; do
    case "$a" in *[[:space:]\!\?\']*) out+=("\"$a\"") ;; *) out+=("$a") ;; esac
  done
  echo "${out[*]}"
}
# as USER ARGS...: runs a one-shot fastchat command as USER, showing the command and its output.
as() {
  local user=$1; shift
  printf '%s$ fastchat --user %s %s%s\n' "$dim" "$user" "$(quoted "$@")" "$reset"
  FASTCHAT_PASSWORD="password-$user" "$FASTCHAT_BIN/fastchat" --user "$user" "$@" 2>&1 | indent
}

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

# online USER: a chat session for USER in the background, reading commands from a pipe; what
# it shows goes to $dir/USER.screen.
online() {
  local user=$1
  mkfifo "$dir/$user.in"
  FASTCHAT_PASSWORD="password-$user" "$FASTCHAT_BIN/fastchat" --user "$user" chat \
    <"$dir/$user.in" >"$dir/$user.screen" 2>&1 &
  echo $! >"$dir/chat-$user.pid"
  # Hold the pipe open (and so the session) until the end of the demo.
  sleep 300 >"$dir/$user.in" &
  echo $! >"$dir/pipe-$user.pid"
  wait_for_text "$dir/$user.screen" "logged in as $user"
}

# screen USER: what USER's chat session has shown since the last look.
screen() {
  local user=$1 seen=0 total
  [ -f "$dir/$user.seen" ] && seen=$(cat "$dir/$user.seen")
  total=$(wc -l <"$dir/$user.screen")
  printf "   %s%s's screen:%s\n" "$dim" "$user" "$reset"
  if [ "$total" -gt "$seen" ]; then
    tail -n +"$((seen + 1))" "$dir/$user.screen" | head -n "$((total - seen))" | indent
  else
    echo "   (nothing new)"
  fi
  echo "$total" >"$dir/$user.seen"
}

say "Starting a balancer and three chat servers (database: $dir/chat.db)"
init_tls "$dir" 3
printf '%s$ fastchat-admin init %s/tls%s\n' "$dim" "$dir" "$reset"
indent <"$dir/tls.out"
note "Every link is TLS 1.3 with this cluster's own certificate authority: a process without"
note "one of its certificates cannot join as a server, and clients check whom they talk to."
if $dashboard; then
  balancer=$(start_balancer "$dir" --scrypt-log-n 10 --algo round-robin --http 127.0.0.1:0)
else
  balancer=$(start_balancer "$dir" --scrypt-log-n 10 --algo round-robin)
fi
echo "   balancer   $balancer"
if $dashboard; then
  page=$(wait_for_line "$dir/balancer.out" "fastchat-balancer dashboard on")
  note "Open $page in a browser: the servers, who is on which, messages per second."
fi
for n in 1 2 3; do
  echo "   server $n   $(start_server "$dir" "$n" "$balancer")"
done
export FASTCHAT_BALANCER=$balancer FASTCHAT_HOME="$dir/home" FASTCHAT_CA="$dir/tls/ca.pem"

say "Four users sign up; each gets X25519 (encryption) and Ed25519 (signature) keys"
for u in alice bob carol dave; do
  FASTCHAT_PASSWORD="password-$u" "$FASTCHAT_BIN/fastchat" signup "$u" | indent
done
note "The private keys stay in $dir/home/USER/, encrypted with the password; each signup"
note "also publishes prekeys, so others can start a conversation before the user logs in."

say "bob and dave open chat sessions; the balancer gives each login a server (round-robin)"
online bob
online dave
screen bob
screen dave
as alice whoami
note "carol stays offline for now. Each one-shot command is a login of its own."

say "alice writes to bob: encrypted by alice, relayed between servers, decrypted by bob"
as alice send bob "hi bob! this crossed from one server to another"
wait_for_text "$dir/bob.screen" "alice: hi bob"
screen bob
note "Each message has a key of its own from their conversation's ratchet, deleted once read:"
note "a copy of bob's folder taken later does not open what was captured before."

say "carol is offline; alice and bob write to her anyway"
as alice send carol "carol, lunch at noon?"
as bob send carol "and bring the slides"
note "The servers store only ciphertext until carol acknowledges it:"
if command -v sqlite3 >/dev/null; then
  sqlite3 "$dir/chat.db" "SELECT '#' || id || ' ' || sender || ' -> ' || recipient || ': ' || hex(substr(body, 1, 20)) || '...' FROM messages" | indent
fi
say "carol logs in and catches up, in order; a second look finds nothing left"
as carol recv
as carol recv

say "A group: alice creates 'class' (alice/class: groups live in their creator's name space) and adds bob, carol and dave"
as alice group create class
as alice group add class bob carol dave
as alice group send class "welcome to the class, everyone"
wait_for_text "$dir/dave.screen" "welcome to the class"
screen dave
note "Every change of membership is signed by alice and checked by every member against the"
note "group's chain of changes; each starts a new group key, so dave cannot read what came"
note "before he joined. The message is sealed once and stored once for all members, with a"
note "tag for each member that only alice could have made: no member can forge another."

say "alice removes dave: a new group key that dave never receives"
as alice group remove class dave
as alice group members class
as alice group send class "dave cannot read this one"
wait_for_text "$dir/bob.screen" "dave cannot read this one"
wait_for_text "$dir/dave.screen" "removed you from"
screen bob
screen dave
note "dave is told, by alice's signed change sent to him directly; after it, no key and no message."

say "An image: alice sends a picture to the group; bob's client saves it and checks it"
# A 1x1 PNG.
printf 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==' \
  | base64 -d >"$dir/photo.png"
as alice group send-file class "$dir/photo.png"
wait_for_text "$dir/bob.screen" "sent photo.png"
screen bob
cmp -s "$dir/photo.png" "$dir/home/bob/downloads/photo.png" \
  && note "bob's copy is byte-for-byte the original (SHA-256 checked, chunks encrypted)."

say "A server dies (kill -9) while bob is on it"
bob_server=$(sed -n 's/^logged in as bob on server \([0-9]*\) .*/\1/p' "$dir/bob.screen")
victim=$(cat "$dir/server$bob_server.pid")
printf '%s$ kill -9 %s%s   (server %s)\n' "$dim" "$victim" "$reset" "$bob_server"
kill -9 "$victim"
rm -f "$dir/server$bob_server.pid"
as alice send bob "bob, are you still there?"
wait_for_text "$dir/bob.screen" "are you still there"
screen bob
note "bob's client went back to the balancer, got another server, and missed nothing."
# The balancer drops a silent server within two seconds, and a server reports its clients
# every half second: wait until the listing shows the two servers left, with bob and dave
# where their screens say they are and nobody else (a one-shot client of alice's counts until
# its server's next report), and show that listing.
now_on() { sed -n 's/.* on server \([0-9]*\) .*/\1/p' "$dir/$1.screen" | tail -n 1; }
expected=$(printf 'server %s\nserver %s\n' "$(now_on bob)" "$(now_on dave)")
for i in $(seq 100); do
  listing=$("$FASTCHAT_BIN/fastchat" servers 2>&1)
  settled=$(awk -v want="$expected" '
    BEGIN { n = split(want, w, "\n"); for (i = 1; i <= n; i++) if (w[i] != "") count[w[i]]++ }
    { split($0, f, " "); split($0, c, ": "); split(c[2], k, " "); id = f[1] " " f[2]
      lines++; if (k[1] + 0 != count[id] + 0) bad = 1 }
    END { print (lines == 2 && !bad) ? "yes" : "no" }' <<<"$listing")
  [ "$settled" = yes ] && break
  sleep 0.1
done
printf '%s$ fastchat servers%s\n' "$dim" "$reset"
indent <<<"$listing"

say "Done: stopping every process this demo started"
