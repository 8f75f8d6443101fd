#!/usr/bin/env bash
# One quick CPU measurement of an lsmtpd binary, for comparing two builds by turns:
#   tests/bench/cpu-quick.sh BIN brokerdown|persistent|oneconn [MESSAGES]
# Starts BIN on a fresh spool under /var/tmp (default configuration; for persistent and oneconn
# a fresh RabbitMQ vhost on 127.0.0.1:5672, guest/guest, via rabbitmqctl), runs lsmtp-bench with
# 20 clients and 4 KiB messages (100 per connection, or 1 for oneconn; MESSAGES, default
# 40,000), and prints one line: msg/s, the daemon's CPU per message, its minor page faults and
# voluntary context switches per message (all threads, from /proc), p50/p99, peak RSS and, with
# the broker, how many messages did not arrive. LSMTP_BENCH overrides the client's path
# (default target/release/lsmtp-bench). Numbers only; compare.py is the side-by-side with
# smtp-sink.
set -euo pipefail
BIN=$1 LOAD=$2 N=${3:-40000}
BENCH=${LSMTP_BENCH:-target/release/lsmtp-bench}
W=$(mktemp -d /var/tmp/lsmtp-quick.XXXXXX)
PORT=$((20000 + RANDOM % 20000))
VH=quick$$
if [ "$LOAD" = brokerdown ]; then
    NODES='["127.0.0.1:1"]' VHOST=/ AMQP=()
else
    NODES='["127.0.0.1:5672"]' VHOST=$VH
    AMQP=(--amqp "amqp://guest:guest@127.0.0.1:5672/$VH" --queue bench)
    rabbitmqctl add_vhost "$VH" >/dev/null
    rabbitmqctl set_permissions -p "$VH" guest '.*' '.*' '.*' >/dev/null
fi
printf '(\n smtp: (listen: ["127.0.0.1:%s"]),\n spool: (dir: "%s/spool"),\n amqp: (nodes: %s, vhost: "%s", routing_key: "bench"),\n admin: (socket: "%s/s.sock"),\n)\n' \
    "$PORT" "$W" "$NODES" "$VHOST" "$W" > "$W/c.ron"
"$BIN" --config "$W/c.ron" 2> "$W/daemon.log" &
PID=$!
cleanup() {
    kill -TERM "$PID" 2>/dev/null && wait "$PID" || true
    [ "$LOAD" = brokerdown ] || rabbitmqctl delete_vhost "$VH" >/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
K=100; [ "$LOAD" = oneconn ] && K=1
faults() { awk '{print $10}' "/proc/$PID/stat"; }
switches() { cat /proc/"$PID"/task/*/status | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'; }
F0=$(faults) S0=$(switches)
"$BENCH" --addr "127.0.0.1:$PORT" -c 20 -m "$N" -k "$K" -s 4096 --pid "$PID" "${AMQP[@]}" --json > "$W/bench.json"
F1=$(faults) S1=$(switches)
python3 - "$W/bench.json" "$(basename "$BIN")" "$LOAD" $((F1 - F0)) $((S1 - S0)) <<'PY'
import json, sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
n = d["accepted"]
lost = (d.get("end_to_end") or {}).get("lost")
print(f"{sys.argv[2]} {sys.argv[3]}: {d['accepted_per_s']:.0f} msg/s, CPU {d['daemon_cpu_us_per_msg']:.1f} us/msg, "
      f"minor faults {int(sys.argv[4]) / n:.2f}/msg, voluntary switches {int(sys.argv[5]) / n:.2f}/msg, "
      f"p50/p99 {d['latency_ms']['p50']:.2f}/{d['latency_ms']['p99']:.2f} ms, "
      f"peak RSS {d['daemon_peak_rss_kib'] / 1024:.1f} MiB, lost {lost}")
PY
