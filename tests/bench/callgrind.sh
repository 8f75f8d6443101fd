#!/bin/bash
# usage: tests/bench/callgrind.sh BIN OUT MSGS [broker=1]
# Runs the daemon BIN under callgrind (profile to OUT) while lsmtp-bench (BENCH, default
# target/release/lsmtp-bench) sends MSGS messages on 4 connections, 100 per connection; with
# broker=1 (RabbitMQ at 127.0.0.1:5672, guest) it waits until all are at the broker. Then:
#   callgrind_annotate --inclusive=yes OUT | less
BIN=$1; OUT=$2; M=$3; BROKER=${4:-1}
VH=cg$$; PORT=2791
rm -rf /var/tmp/cg-spool
if [ $BROKER = 1 ]; then rabbitmqctl -q add_vhost $VH; rabbitmqctl -q set_permissions -p $VH guest ".*" ".*" ".*"; NODES='"127.0.0.1:5672"'; else NODES='"127.0.0.1:1"'; fi
cat > /tmp/cg.ron <<R
(
 smtp: (listen: ["127.0.0.1:$PORT"]),
 spool: (dir: "/var/tmp/cg-spool"),
 amqp: (nodes: [$NODES], vhost: "$VH", routing_key: "bench"),
 admin: (socket: "/tmp/cg.sock"),
)
R
valgrind --tool=callgrind --callgrind-out-file=$OUT --collect-atstart=yes $BIN --config /tmp/cg.ron 2>/tmp/cg-daemon.log & PID=$!
for i in $(seq 600); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done
if [ $BROKER = 1 ]; then for i in $(seq 300); do rabbitmqctl -q list_queues -p $VH name | grep -q bench && break; sleep 0.5; done; AM="--amqp amqp://guest:guest@127.0.0.1:5672/$VH --queue bench"; fi
${BENCH:-target/release/lsmtp-bench} --addr 127.0.0.1:$PORT -c 4 -m $M -k 100 $AM --amqp-timeout 300s
kill $PID; wait $PID
[ $BROKER = 1 ] && rabbitmqctl -q delete_vhost $VH
rm -rf /var/tmp/cg-spool
