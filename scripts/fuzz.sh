#!/usr/bin/env bash
# The long fuzzing run of the engine's trust boundary (tests/fuzz/fuzz_*.c, see
# tests/fuzz/test_fuzz.py for the short one that CI runs).
#
# Each harness runs for SECONDS (default 3600) over the committed corpus plus a work corpus of
# its own, with ASan and UBSan, 5 s per input and 2 GiB of memory at most. A crash does not end
# the run: the input is kept and libFuzzer starts again for the time that is left (at most
# MAX_CRASHES times). At the end, per harness: executions, coverage (cov and ft from libFuzzer's
# last status line), corpus size and the crash files.
#
#   scripts/fuzz.sh [-t SECONDS] [-w WORKDIR] [-p] [HARNESS ...]
#     -t  seconds per harness (or NETKERNEL_FUZZ_SECONDS)
#     -w  work directory, kept between runs (default /var/tmp/netkernel-fuzz): WORKDIR/HARNESS/
#         corpus (new entries), crashes/ (artifacts), fuzz-N.log (libFuzzer's output)
#     -p  run the harnesses side by side rather than one after another
#
# Needs root (the harnesses make network namespaces of their own) and clang with libFuzzer. On a
# shared machine run it under nice: each harness keeps one CPU busy.
# New corpus entries worth keeping can be merged into the committed corpus with
#   HARNESS -merge=1 tests/fuzz/corpus/HARNESS WORKDIR/HARNESS/corpus
# and a crash reproduced with  HARNESS -close_fd_mask=2 WORKDIR/HARNESS/crashes/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${NETKERNEL_FUZZ_SECONDS:-3600}
work=${NETKERNEL_FUZZ_WORKDIR:-/var/tmp/netkernel-fuzz}
parallel=0
max_crashes=${MAX_CRASHES:-20}
while getopts "t:w:ph" opt; do
    case $opt in
        t) seconds=$OPTARG ;;
        w) work=$OPTARG ;;
        p) parallel=1 ;;
        *) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(fuzz_region fuzz_control fuzz_servicelib)

mkdir -p "$work"
work=$(cd "$work" && pwd)
# One run per work directory: two would share (and clear) each other's logs.
exec 9>"$work/.lock"
flock -n 9 || { echo "fuzz: $work is in use by another run" >&2; exit 1; }
echo "fuzz: building into $work/build"
python3 tests/fuzz/build.py --out "$work/build" "${harnesses[@]}" >/dev/null

# One harness for $seconds, restarted after each crash; writes $dir/summary.
run_one() {
    local h=$1 dir="$work/$1"
    mkdir -p "$dir/corpus" "$dir/crashes"
    local start end left n=0 execs=0
    start=$(date +%s)
    end=$((start + seconds))
    rm -f "$dir"/fuzz-*.log
    while :; do
        left=$((end - $(date +%s)))
        [ "$left" -gt 0 ] || break
        n=$((n + 1))
        local log="$dir/fuzz-$n.log"
        "$work/build/$h" -max_total_time="$left" -timeout=5 -rss_limit_mb=2048 -close_fd_mask=2 \
            -print_final_stats=1 -artifact_prefix="$dir/crashes/" \
            "$dir/corpus" "tests/fuzz/corpus/$h" </dev/null >"$log" 2>&1 || true
        local e
        e=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        execs=$((execs + ${e:-0}))
        grep -qE '^#[0-9]+[[:space:]]+DONE[[:space:]]' "$log" && break
        [ "$n" -le "$max_crashes" ] || break
        echo "fuzz: $h stopped early (see $log); going on"
    done
    local status cov ft corp crashes
    status=$(grep -E '^#[0-9]+.* cov: ' "$dir/fuzz-$n.log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
    corp=$(find "$dir/corpus" -type f | wc -l)
    crashes=$(find "$dir/crashes" -type f -newermt "@$start" | wc -l)
    printf '%-16s %9s %9s %6s %6s %7s %8s\n' "$h" "$(( $(date +%s) - start ))s" "$execs" \
        "${cov:--}" "${ft:--}" "$corp" "$crashes" >"$dir/summary"
}

pids=()
for h in "${harnesses[@]}"; do
    echo "fuzz: $h for ${seconds}s (work dir $work/$h)"
    if [ "$parallel" = 1 ]; then
        run_one "$h" &
        pids+=($!)
    else
        run_one "$h"
    fi
done
for p in "${pids[@]}"; do wait "$p"; done

echo
printf '%-16s %9s %9s %6s %6s %7s %8s\n' harness time execs cov ft corpus crashes
status=0
for h in "${harnesses[@]}"; do
    cat "$work/$h/summary"
    found=$(find "$work/$h/crashes" -type f -newer "$work/build/$h" 2>/dev/null || true)
    if [ -n "$found" ]; then
        status=1
        sed 's/^/    /' <<<"$found"
    fi
done
exit "$status"
