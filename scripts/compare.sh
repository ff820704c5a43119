#!/usr/bin/env bash
# Two builds of fastchat on one workload, in alternating rounds (A then B, then B then A, ...),
# so that both see the same minutes of a machine whose speed drifts: how every before-and-after
# in BENCHMARKS.md is measured. Prints every run as a Markdown row of fastchat-bench, then for
# each figure the median of A, the median of B, and in how many rounds B did better.
#
#   scripts/compare.sh A B [ROUNDS] -- FASTCHAT-BENCH FLAGS
#   scripts/compare.sh HEAD~1 HEAD 5 -- --spawn-servers 1 --opaque --clients 100 --messages 600 --rate 10000
#   scripts/compare.sh /tmp/old HEAD 3 -- --spawn-servers 3 --opaque
#   cargo build --release --bins && scripts/compare.sh HEAD target/release -- --spawn-servers 1
#                                  (uncommitted work: its binaries against the last commit)
#   scripts/compare.sh HEAD "HEAD --commit-window 1000" -- --spawn-servers 3 --rate 10000
#                                  (one build, B's servers started with a flag of their own)
#
# A and B are git revisions or directories (paths without spaces) of built binaries, each
# optionally followed, in the same argument, by flags for that side's fastchat-server. A
# revision is built (release) in a worktree under target/compare/, and its binaries are kept
# in target/compare/bin-COMMIT for the next comparison (delete target/compare to free the
# space). Each build runs with its own fastchat-bench, so a change to the load tool shows
# too. ROUNDS defaults to 3; the flags must include --spawn-servers (each build runs its own
# servers). Ties count for neither. Exit codes: 0 every run passed, 1 a run failed (lost,
# duplicated or refused messages, or servers that did not start: it is shown, left out of the
# summary, and the rest goes on), 2 bad arguments, 4 a build failed.
set -euo pipefail
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 3 ] || usage
a=$1 b=$2
shift 2
rounds=3
if [ "$1" != "--" ]; then
  case "$1" in
    [1-9] | [1-9][0-9]) rounds=$1 ;;
    *) echo "compare.sh: ROUNDS must be a number from 1 to 99, not '$1'" >&2; usage ;;
  esac
  shift
fi
[ $# -ge 1 ] && [ "$1" = "--" ] || usage
shift
spawn=no
for flag in "$@"; do
  case "$flag" in
    --json | --markdown | --header | --balancer | --rival) echo "compare.sh: $flag cannot be used here" >&2; exit 2 ;;
    --spawn-servers | --spawn-servers=*) spawn=yes ;;
  esac
done
[ "$spawn" = yes ] || { echo "compare.sh: the flags must include --spawn-servers K" >&2; exit 2; }

# bins REF: the directory of REF's binaries, built if REF is a revision.
bins() {
  local ref=$1
  if [ -d "$ref" ]; then
    [ -x "$ref/fastchat-bench" ] || { echo "compare.sh: no fastchat-bench in $ref" >&2; exit 2; }
    (cd "$ref" && pwd)
    return
  fi
  local commit
  commit=$(git -C "$root" rev-parse --verify --quiet "$ref^{commit}") ||
    { echo "compare.sh: '$ref' is neither a directory nor a git revision" >&2; exit 2; }
  local out="$root/target/compare/bin-$commit"
  if [ ! -x "$out/fastchat-bench" ]; then
    local tree="$root/target/compare/tree-$commit"
    echo "building $ref ($commit) in $tree" >&2
    # What an interrupted build left: the folder, and git's record of it.
    rm -rf "$tree"
    git -C "$root" worktree prune
    git -C "$root" worktree add --quiet --detach "$tree" "$commit" >&2
    if ! (cd "$tree" && CARGO_TARGET_DIR="$root/target/compare/target" cargo build --release --quiet --bins >&2); then
      git -C "$root" worktree remove --force "$tree"
      echo "compare.sh: building $ref failed" >&2
      exit 4
    fi
    mkdir -p "$out.part"
    for b in fastchat fastchat-server fastchat-balancer fastchat-bench fastchat-admin; do
      cp "$root/target/compare/target/release/$b" "$out.part/"
    done
    mv "$out.part" "$out"
    git -C "$root" worktree remove --force "$tree"
  fi
  echo "$out"
}

rows=$(mktemp)
err=$(mktemp)
sides=()
trap 'rm -f "$rows" "$err"; for s in "${sides[@]}"; do rm -rf "$s"; done' EXIT

# side SPEC: the directory of binaries a side runs: REF's, or, when SPEC adds server flags
# after REF, a folder of its own under target/compare/ whose fastchat-server passes them on.
side() {
  local words dir flags s b
  read -r -a words <<<"$1"
  [ ${#words[@]} -ge 1 ] || { echo "compare.sh: an empty build to compare" >&2; exit 2; }
  dir=$(bins "${words[0]}") || exit
  [ ${#words[@]} -gt 1 ] || { echo "$dir"; return; }
  flags=$(printf ' %q' "${words[@]:1}")
  mkdir -p "$root/target/compare"
  s=$(mktemp -d "$root/target/compare/side.XXXXXX")
  for b in fastchat fastchat-balancer fastchat-bench fastchat-admin; do
    # A link, not a copy, where it can be: fastchat-bench starts the servers beside itself.
    ln "$dir/$b" "$s/$b" 2>/dev/null || cp "$dir/$b" "$s/$b"
  done
  printf '#!/bin/sh\nexec %q%s "$@"\n' "$dir/fastchat-server" "$flags" >"$s/fastchat-server"
  chmod +x "$s/fastchat-server"
  echo "$s"
}

dir_a=$(side "$a")
[[ "$dir_a" == "$root/target/compare/side."* ]] && sides+=("$dir_a")
dir_b=$(side "$b")
[[ "$dir_b" == "$root/target/compare/side."* ]] && sides+=("$dir_b")
failed=0

# run NAME DIR FLAGS...: one run as a Markdown row (the first with the table's header), kept in
# $rows (after its round's number) if it passed; returns 1 if it failed.
header=--header
run() {
  local name=$1 dir=$2 out row
  shift 2
  if out=$("$dir/fastchat-bench" "$@" --quiet --markdown "$name" $header 2>"$err"); then
    echo "$out"
    echo "$round $(echo "$out" | tail -n 1)" >>"$rows"
    header=
  else
    row=$(echo "$out" | tail -n 1)
    case "$row" in
      "|"*) echo "$out (failed: not counted below)"; header= ;;
      *) echo "| $name | failed: $(grep -m 1 . "$err") |" ;;
    esac
    return 1
  fi
}

echo "**A** = $a ($dir_a), **B** = $b ($dir_b); fastchat-bench $*; $rounds round(s), A and B in turn"
echo
for round in $(seq "$rounds"); do
  if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for who in $order; do
    if [ "$who" = A ]; then dir=$dir_a; else dir=$dir_b; fi
    run "$who" "$dir" "$@" || failed=1
  done
done

# The summary, over the rounds where both passed, from the rows' columns (numbers without their
# units; the round's number comes first): for a run that sends,
# | run | deliveries | delivered/s | p50 | p90 | p99 | max | lost | dup | CPU a delivery |
# of it, servers | servers' switches a delivery | (the last only from builds that print it);
# for idle clients, | run | clients | connect | threads | descriptors |
# memory | a client: threads, descriptors, KiB (stack KiB) |.
echo
awk -F'|' '
  function num(s) { gsub(/[^0-9.]/, "", s); return s + 0 }
  function median(list, n,   i, j, t, v) {
    for (i = 1; i <= n; i++) v[i] = list[i]
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j-1] > v[j]; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  {
    who = $2; gsub(/ /, "", who)
    if (who != "A" && who != "B") next
    k = $1 + 0
    passed[who, k] = 1
    if (k > rounds) rounds = k
    if ($8 ~ /KiB/) {
      idle = 1
      split($8, client, ",")
      sub(/KiB.*/, "", client[3])
      value[who, 1, k] = num(client[3])
      value[who, 2, k] = num($4)
    } else {
      value[who, 1, k] = num($4); value[who, 2, k] = num($5); value[who, 3, k] = num($6)
      value[who, 4, k] = num($7); value[who, 5, k] = num($12)
      if ($13 ~ /[0-9]/) value[who, 6, k] = num($13); else unswitched = 1
    }
  }
  END {
    if (idle) {
      figures = 2
      split("memory a client (KiB)|connect (s)", name, "|")
      split("%.1f|%.2f", format, "|")
    } else {
      figures = unswitched ? 5 : 6
      split("delivered/s|p50 (ms)|p90 (ms)|p99 (ms)|servers CPU a delivery (µs)|servers switches a delivery", name, "|")
      split("%.0f|%.2f|%.2f|%.2f|%.1f|%.2f", format, "|")
      higher[1] = 1
    }
    n = 0
    for (k = 1; k <= rounds; k++) {
      if (passed["A", k] && passed["B", k]) round[++n] = k
    }
    if (n == 0) {
      print "No round where both A and B passed: nothing to compare."
      exit
    }
    print "| figure | A, median | B, median | B better in | B worse in |"
    print "| --- | ---: | ---: | ---: | ---: |"
    for (f = 1; f <= figures && n > 0; f++) {
      better = worse = 0
      for (i = 1; i <= n; i++) {
        k = round[i]
        av[i] = value["A", f, k]; bv[i] = value["B", f, k]
        if (bv[i] != av[i]) {
          if ((bv[i] > av[i]) == (higher[f] == 1)) better++; else worse++
        }
      }
      printf "| %s | " format[f] " | " format[f] " | %d of %d | %d of %d |\n", name[f], median(av, n), median(bv, n), better, n, worse, n
    }
  }' "$rows"
exit "$failed"
