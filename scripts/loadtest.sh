#!/usr/bin/env bash
# The standard load test: builds the release binaries, then runs fastchat-bench over a set of
# workloads, each on a fresh balancer and servers that the tool starts on a temporary database
# and stops afterwards. Prints Markdown tables (the ones in BENCHMARKS.md).
#
#   scripts/loadtest.sh            the full set (a few minutes on 2 cores)
#   scripts/loadtest.sh --quick    smaller runs, to check that everything works
#
# Exit status: 0 if every run delivered every message exactly once, 1 otherwise.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

quick=false
case "${1:-}" in
  --quick) quick=true ;;
  "") ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

cargo build --release --quiet --bin fastchat-bench --bin fastchat-server --bin fastchat-balancer
bench=target/release/fastchat-bench
status=0

# run LABEL ARGS...: one row; a run that loses or duplicates anything fails the script.
run() {
  local label=$1; shift
  "$bench" --quiet --markdown "$label" "$@" || status=1
}

if $quick; then
  scale=10
else
  scale=1
fi

echo "Machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo
echo "### Throughput and latency (balancer, 3 servers and the load tool on this machine)"
echo
first=true
row() {
  if $first; then
    first=false
    run "$@" --header
  else
    run "$@"
  fi
}
row "direct spread, 100 clients x $((1000 / scale)) messages, window 32" \
  --spawn-servers 3 --clients 100 --messages $((1000 / scale)) --window 32 --pattern spread
row "direct ring (batches perfectly), 100 clients x $((1000 / scale)) messages, window 32" \
  --spawn-servers 3 --clients 100 --messages $((1000 / scale)) --window 32 --pattern ring
row "direct spread, 1000 clients x $((100 / scale)) messages, window 32" \
  --spawn-servers 3 --clients 1000 --messages $((100 / scale)) --window 32 --pattern spread
row "group, 100 clients in groups of 10 x $((100 / scale)) messages" \
  --spawn-servers 3 --clients 100 --messages $((100 / scale)) --mode group --group-size 10
row "fixed rate, spread: 10,000 messages/s offered, 100 clients" \
  --spawn-servers 3 --clients 100 --messages $((300 / scale)) --rate 10000 --pattern spread
if $quick; then
  # A quick run is over in well under 0.5 s: offered at a rate, it lasts 1.5 s and the kill
  # falls inside it (fastchat-bench fails a run whose kill came after its end).
  row "fault: 100 clients x 30 messages at 2,000 messages/s, one server killed (kill -9) after 0.5 s" \
    --spawn-servers 3 --clients 100 --messages 30 --rate 2000 --kill-server 0.5 --pattern spread
  # Its clients leave a stopped server after 5 s without a Stored and 5 s more without an
  # answer to a Ping: the drain waits past that.
  row "fault: 100 clients x 30 messages at 2,000 messages/s, one server stopped (SIGSTOP) after 0.5 s" \
    --spawn-servers 3 --clients 100 --messages 30 --rate 2000 --stop-server 0.5 --drain 20 --pattern spread
else
  row "fault: as the first row (spread), one server killed (kill -9) after 0.5 s" \
    --spawn-servers 3 --clients 100 --messages 1000 --window 32 --kill-server 0.5 --pattern spread
  row "fault: as the first row (spread), one server stopped (SIGSTOP) after 0.5 s until the end" \
    --spawn-servers 3 --clients 100 --messages 1000 --window 32 --stop-server 0.5 --drain 20 --pattern spread
fi

echo
echo "### Connection capacity (idle clients held by one server)"
echo
"$bench" --quiet --markdown "idle, 1 server" --header \
  --spawn-servers 1 --clients $((5000 / scale)) --mode idle --hold 2 || status=1

exit $status
