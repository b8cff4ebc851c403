#!/usr/bin/env bash
# One-command demo: install NetKernel and its demo tools, start it, serve a page with nginx
# from tenant "web", load it for 10 s with wrk from a peer namespace on the bridge, print a
# summary, and remove everything again. Run as root: sudo bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: must run as root (try: sudo bash scripts/demo.sh)" >&2
    exit 1
fi

echo "== installing packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends \
    build-essential cmake iproute2 procps psmisc curl nginx-light wrk python3-venv \
    pkg-config liblwip-dev bubblewrap nftables >/dev/null
service nginx stop >/dev/null 2>&1 || true   # Debian starts one; ours runs in the tenant

echo "== installing netkernel (pip install . into /opt/netkernel-venv)"
VENV=/opt/netkernel-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q .
NK="$VENV/bin/netkernel"

WORK=$(mktemp -d /tmp/netkernel-demo.XXXXXX)
chmod 755 "$WORK"   # the tenant's users are unprivileged on the host: they must reach it
PEER=nkp-demo
cleanup() {
    set +e
    "$NK" tenant delete web >/dev/null 2>&1
    ip netns del "$PEER" 2>/dev/null
    ip link del "$PEER" 2>/dev/null
    "$NK" down >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== netkernel up"
"$NK" down >/dev/null 2>&1 || true
"$NK" up

mkdir -p "$WORK/www" "$WORK/logs"
head -c 4096 /dev/urandom | base64 > "$WORK/www/index.html"
cat > "$WORK/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    client_body_temp_path $WORK/body;
    proxy_temp_path $WORK/proxy;
    fastcgi_temp_path $WORK/fastcgi;
    uwsgi_temp_path $WORK/uwsgi;
    scgi_temp_path $WORK/scgi;
    server {
        listen 80;
        root $WORK/www;
    }
}
CONF

echo "== starting nginx in tenant web"
"$NK" tenant create web
field() { "$NK" ps --json | python3 -c "import json,sys; print(next(t['$1'] for t in json.load(sys.stdin)['tenants'] if t['name']=='web'))"; }
IP=$(field ipv4)
# The host's files are read-only in a tenant, whose root is an unprivileged host uid: give it
# the work directory (pid, logs, temp files) and let it write there.
TENANT_ROOT=$(field uid_base)
chown -R "$TENANT_ROOT:$TENANT_ROOT" "$WORK"
"$NK" run --tenant web --rw "$WORK" -- nginx -c "$WORK/nginx.conf" -p "$WORK" &

# A "remote host": a namespace on bridge nk0 in the test-peer range.
ip netns add "$PEER"
ip -n "$PEER" link set lo up
ip link add "$PEER" type veth peer name eth0 netns "$PEER"
ip link set "$PEER" master nk0 up
ip -n "$PEER" addr add 198.19.200.1/15 dev eth0
ip -n "$PEER" link set eth0 up

for _ in $(seq 100); do
    ip netns exec "$PEER" curl -fs -o /dev/null "http://$IP/" && break
    sleep 0.1
done
ip netns exec "$PEER" curl -fsS -o /dev/null "http://$IP/" || {
    echo "demo: nginx in tenant web did not answer on $IP:80" >&2
    cat "$WORK/logs/error.log" >&2 || true
    exit 1
}

echo "== wrk: 10 s, 2 threads, 64 connections, http://$IP/ from $PEER"
ip netns exec "$PEER" wrk -t2 -c64 -d10s --latency "http://$IP/" > "$WORK/wrk.txt" || true
ok=1
if ! "$NK" ps; then
    ok=0
    echo "demo: NetKernel stopped during the load test; end of /var/log/netkernel.log:" >&2
    tail -n 15 /var/log/netkernel.log >&2
fi

echo "== summary"
awk '
    /Requests\/sec/           { rps = $2 }
    /^    Latency/            { lat = $2 " avg, " $3 " stdev, " $4 " max" }
    /Socket errors/           { sockerr = $0 }
    /Non-2xx/                 { non2xx = $NF }
    /requests in/             { total = $1 }
    END {
        printf "requests/s : %s\n", rps
        printf "requests   : %s in 10 s\n", total
        printf "latency    : %s\n", lat
        printf "errors     : %s\n", (sockerr == "" && non2xx == "") ? "none" : sockerr " non-2xx=" non2xx
    }' "$WORK/wrk.txt"
[ "$ok" = 1 ]
