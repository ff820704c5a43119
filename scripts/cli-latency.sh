#!/usr/bin/env bash
# How long one `fastchat send` takes, from a shell script: with a kept session (`fastchat
# login` once) and without (every command logs in and pays the password hash). Starts a
# cluster of its own (release binaries, default scrypt cost) in a temporary folder, runs each
# way N times (default 10), prints the median and the slowest, and stops the cluster.
#
#   scripts/cli-latency.sh [N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-10}
case "$runs" in
  ''|*[!0-9]*|0) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
[ "$runs" -le 1000 ] || { echo "at most 1000 runs" >&2; exit 2; }

(cd "$root" && cargo build --release --quiet --bins)
dir=$(mktemp -d)
cleanup() {
  FASTCHAT_HOME="$dir/home" "$root/target/release/fastchat" logout >/dev/null 2>&1 || true
  "$root/scripts/cluster.sh" stop "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
eval "$(FASTCHAT_BIN="$root/target/release" "$root/scripts/cluster.sh" start 2 "$dir" | grep '^export ')"
export FASTCHAT_HOME="$dir/home" FASTCHAT_PASSWORD="a long enough password"
fc="$root/target/release/fastchat"
"$fc" signup alice >/dev/null
"$fc" signup bob >/dev/null

# time_runs LABEL ARGS...: runs `fastchat ARGS` $runs times; prints the median and the max.
time_runs() {
  local label=$1; shift
  local ms=()
  for _ in $(seq "$runs"); do
    local t0 t1
    t0=$(date +%s%N)
    "$fc" "$@" >/dev/null
    t1=$(date +%s%N)
    ms+=($(( (t1 - t0) / 1000000 )))
  done
  sorted=($(printf '%s\n' "${ms[@]}" | sort -n))
  printf '| %s | %d | %d ms | %d ms |\n' "$label" "$runs" "${sorted[$(( (runs - 1) / 2 ))]}" "${sorted[$((runs - 1))]}"
}

echo "| fastchat send (release, scrypt N = 2^15) | runs | median | slowest |"
echo "| --- | ---: | ---: | ---: |"
time_runs "logging in on every command" -u alice send bob "hello"
"$fc" login alice >/dev/null
time_runs "with a kept session (fastchat login)" send bob "hello"
