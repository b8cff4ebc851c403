#!/usr/bin/env bash
# The control for the static/Go path's request rate (docs/benchmarks.md, "Programs GuestLib
# does not reach"): how fast the bench's Go HTTP server answers wrk natively, and natively
# with one more kernel TCP connection and a forwarding process between them (scripts/hop.c,
# the data movement the engine does for a relayed connection and nothing else) — without
# NetKernel. Both in the same run, interleaved, in two namespaces this script makes and
# removes (a veth pair, 10.251.0.1 and .2: traffic stays inside them).
#
#   scripts/hop_control.sh [SECONDS_PER_RUN] [RUNS]      (default 5 s, 3 runs each)
#
# Keep-alive requests (32 connections), then a connection per request (Connection: close).
# Needs root, gcc, golang-go and wrk. Prints each run and the medians' ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
runs=${2:-3}
work=$(mktemp -d /tmp/nk-hop.XXXXXX)
srv=nkh-srv-$$
cli=nkh-cli-$$
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$srv" 2>/dev/null || true
    ip netns del "$cli" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

gcc -O2 -Wall -o "$work/hop" scripts/hop.c
cp src/netkernel/bench/programs/gohttp.go "$work/"
(cd "$work" && CGO_ENABLED=0 GO111MODULE=off GOCACHE="$work/.gocache" GOPATH="$work/.gopath" \
    go build -o gohttp gohttp.go)

ip netns add "$srv"
ip netns add "$cli"
ip link add nkh-s$$ netns "$srv" type veth peer name nkh-c$$ netns "$cli"
ip -n "$srv" addr add 10.251.0.1/24 dev nkh-s$$
ip -n "$cli" addr add 10.251.0.2/24 dev nkh-c$$
for ns in "$srv" "$cli"; do
    ip -n "$ns" link set lo up
done
ip -n "$srv" link set nkh-s$$ up
ip -n "$cli" link set nkh-c$$ up

ip netns exec "$srv" "$work/gohttp" 0.0.0.0:80 2>"$work/gohttp.log" &
pids+=($!)
ip netns exec "$srv" "$work/hop" 81 127.0.0.1 80 >"$work/hop.log" &
pids+=($!)
for _ in $(seq 50); do
    grep -q READY "$work/hop.log" && ip netns exec "$cli" bash -c '</dev/tcp/10.251.0.1/80' 2>/dev/null && break
    sleep 0.1
done

rate() { # port [wrk options] -> requests/s
    local port=$1
    shift
    ip netns exec "$cli" wrk -t1 -c32 -d"${secs}s" "$@" "http://10.251.0.1:$port/1k.bin" |
        awk '/^Requests\/sec:/ {print $2}'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Keep-alive (the request rate), then a connection per request (the connection rate).
for mode in keep-alive close; do
    opts=()
    [ "$mode" = close ] && opts=(-H "Connection: close")
    direct=()
    hopped=()
    for i in $(seq "$runs"); do
        d=$(rate 80 "${opts[@]}")
        h=$(rate 81 "${opts[@]}")
        echo "$mode run $i: direct ${d} req/s, through the hop ${h} req/s"
        direct+=("$d")
        hopped+=("$h")
    done
    md=$(median "${direct[@]}")
    mh=$(median "${hopped[@]}")
    awk -v m="$mode" -v d="$md" -v h="$mh" \
        'BEGIN {printf "%s median: direct %.0f req/s, through the hop %.0f req/s: %.2f\n", m, d, h, h / d}'
done
