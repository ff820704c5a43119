#!/usr/bin/env bash
# fastchat beside mosquitto (MQTT 5, QoS 1) and ngircd (IRC) on the same workloads, measured by
# fastchat-bench on this machine, interleaved (each round of a workload runs every server once,
# one after another, so all of them see the same minutes). Prints Markdown tables for
# BENCHMARKS.md.
#
#   scripts/rivals.sh            # three rounds (about fifteen minutes on two cores)
#   scripts/rivals.sh 1          # one round
#   FASTCHAT_BIN=DIR scripts/rivals.sh   # binaries already built in DIR (no build step)
#
# Needs mosquitto and ngircd (Debian: apt-get install mosquitto ngircd). The rivals do not
# encrypt end to end; each row says whether it is TLS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

case "${1:-3}" in
  [1-9] | [1-9][0-9]) rounds=${1:-3} ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

if [ -z "${FASTCHAT_BIN:-}" ]; then
  (cd "$root" && cargo build --release --quiet --bins)
  FASTCHAT_BIN="$root/target/release"
fi
bench="$FASTCHAT_BIN/fastchat-bench"

# The first CPU this script may use: one fastchat row runs its server there alone
# (--server-cpus; the rivals run on one thread whatever they are given).
first_cpu=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status | cut -d, -f1 | cut -d- -f1)

# What is measured: "name|flags".
servers=(
  "mosquitto, TLS|--rival mosquitto"
  "mosquitto, plaintext|--rival mosquitto --insecure-plaintext"
  "ngircd, TLS|--rival ngircd"
  "ngircd, plaintext|--rival ngircd --insecure-plaintext"
  "fastchat, 1 server, servers alone, plaintext|--spawn-servers 1 --opaque --insecure-plaintext"
  "fastchat, 1 server, servers alone, TLS|--spawn-servers 1 --opaque"
  "fastchat, 1 server on one CPU, servers alone, TLS|--spawn-servers 1 --opaque --server-cpus $first_cpu"
  "fastchat, 1 server, end to end, TLS|--spawn-servers 1"
  "fastchat, 3 servers, servers alone, TLS|--spawn-servers 3 --opaque"
)
workloads=(
  "direct, spread, 100 x 1000|--clients 100 --messages 1000"
  "group, 100 in groups of 10 x 100|--clients 100 --messages 100 --mode group --group-size 10"
  "10,000 msg/s offered, spread, 100 x 600|--clients 100 --messages 600 --rate 10000"
  "10 clients, window 1, spread, 10 x 1000|--clients 10 --messages 1000 --window 1"
)

# run LABEL FLAGS...: one row (a failed run is reported as such and the rest goes on).
run() {
  local label=$1; shift
  if ! "$bench" "$@" --quiet --markdown "$label" 2>/tmp/rivals-$$.err; then
    echo "| $label | failed: $(tail -n 1 /tmp/rivals-$$.err) |"
  fi
}
trap 'rm -f /tmp/rivals-$$.err' EXIT

for w in "${workloads[@]}"; do
  echo
  echo "**${w%%|*}** ($rounds round(s); in each, every server once, one after another)"
  echo
  "$bench" --rival ngircd --clients 2 --messages 1 --quiet --markdown x --header | head -n 2
  for r in $(seq "$rounds"); do
    for s in "${servers[@]}"; do
      # shellcheck disable=SC2086
      run "${s%%|*}, ${w%%|*}" ${s#*|} ${w#*|}
    done
  done
done

echo
echo "**Idle connections, 2000 clients** (what a connection costs the server)"
echo
"$bench" --rival ngircd --clients 2 --mode idle --hold 0.1 --quiet --markdown x --header | head -n 2
for s in "${servers[@]}"; do
  case "$s" in *"3 servers"* | *"end to end"* | *"one CPU"*) continue ;; esac
  # shellcheck disable=SC2086
  run "${s%%|*}, idle" ${s#*|} --clients 2000 --mode idle
done
