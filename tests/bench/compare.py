#!/usr/bin/env python3
"""Side-by-side benchmark: Postfix's smtp-sink and one or more lsmtpd binaries, by turns.

    tests/bench/compare.py --bin old=/work/bench/old/target/release/lsmtpd \\
        --bin new=target/release/lsmtpd --rounds 3 [--loads oneconn,persistent,brokerdown,single] \\
        [--scale 0.5] [--json out.json] [--set new:amqp.payload=raw]

Every round runs each load against smtp-sink first (the ceiling: it stores nothing), then against
each binary (in reverse order on odd rounds, so drift on a shared machine hits both alike). Every
lsmtpd run gets a fresh spool directory, a fresh RabbitMQ vhost (the daemon declares its queue,
`topology.declare: true`) and otherwise the default configuration: only the listen address, the
spool directory, the vhost, the routing key, the admin socket and, for `brokerdown`, a closed port
as `amqp.nodes` are set (`--set NAME:section.key=RON` changes one more for one binary name; the
same path may run under two names with different settings).

Loads (message counts times --scale), all with 4 KiB messages and one recipient, client
`lsmtp-bench` (--bench):
  oneconn     20 clients, one message per connection, 20,000 messages
  persistent  20 clients, 100 messages per connection, 40,000 messages
  brokerdown  as persistent, broker unreachable: accepting into the spool only
  single      1 client, persistent, 3,000 messages (latency)

Per run: accepted msg/s, its ratio to smtp-sink's in the same round, end-to-end msg/s (lsmtp-bench
consumes the queue until every accepted message arrived; lost must be 0), the daemon's CPU per
accepted message and RabbitMQ's (beam.smp; utime+stime from /proc over the client's whole run,
end-to-end wait included, so forwarding counts), end-of-DATA -> reply p50/p99, and the daemon's
peak RSS (VmHWM). RabbitMQ's figure includes delivering each message to the benchmark's consumer
(no_ack), as a real consumer would cost it.

Prints markdown tables (every run, then the median per binary and load); --json FILE writes all
runs ("-" for stdout, then the tables go to stderr). Needs root or permission to run rabbitmqctl.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

LOADS = {
    # name: (clients, messages, per_connection, broker)
    "oneconn": (20, 20000, 1, True),
    "persistent": (20, 40000, 100, True),
    "brokerdown": (20, 40000, 100, False),
    "single": (1, 3000, 100000, True),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    """A port nothing listens on right now (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_us(pid):
    """utime + stime of a whole process (all its threads) in microseconds."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000 // CLK_TCK


def vm_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def rabbitmqctl(*args, check=True):
    r = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def beam_pid():
    out = rabbitmqctl("eval", "os:getpid().")
    return int(out.strip().strip('"'))


def ron_config(port, spool, sock, vhost, nodes, overrides):
    sections = {
        "smtp": {"listen": f'["127.0.0.1:{port}"]'},
        "spool": {"dir": json.dumps(spool)},
        "amqp": {
            "nodes": "[" + ", ".join(json.dumps(n) for n in nodes) + "]",
            "vhost": json.dumps(vhost),
            "routing_key": '"bench"',
        },
        "admin": {"socket": json.dumps(sock)},
    }
    for key, value in overrides:
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    body = ",\n".join(
        f"    {s}: (" + ", ".join(f"{k}: {v}" for k, v in kv.items()) + ")"
        for s, kv in sections.items()
    )
    return "(\n" + body + ",\n)\n"


def wait_ready(port, vhost, proc, logf, timeout=60.0):
    """Waits until the daemon accepts SMTP connections and, with a vhost, has declared its queue
    there (it connected to the broker). Does not read the log: log.level may hide it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}; see {logf}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    while vhost and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}; see {logf}")
        if "bench" in rabbitmqctl("list_queues", "-p", vhost, "name", check=False).split():
            return
        time.sleep(0.2)
    if time.monotonic() >= deadline:
        raise RuntimeError(f"daemon not ready after {timeout}s; see {logf}")


def run_bench(args, addr, pid, load, amqp_uri=None):
    clients, messages, per_conn, _ = LOADS[load]
    messages = max(clients, int(messages * args.scale))
    cmd = [
        args.bench, "--addr", addr, "-c", str(clients), "-m", str(messages),
        "-k", str(per_conn), "-s", str(args.size), "--pid", str(pid), "--json",
    ]
    if amqp_uri:
        cmd += ["--amqp", amqp_uri, "--queue", "bench"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measured(args, addr, pid, load, beam, amqp_uri=None):
    """One lsmtp-bench run with the CPU of the server and RabbitMQ measured around it."""
    la = loadavg()
    c0, b0 = cpu_us(pid), cpu_us(beam)
    out = run_bench(args, addr, pid, load, amqp_uri)
    c1, b1 = cpu_us(pid), cpu_us(beam)
    accepted = out["accepted"]
    e2e = out.get("end_to_end")
    return {
        "load": load,
        "loadavg": la,
        "accepted": accepted,
        "msg_per_s": out["accepted_per_s"],
        "p50_ms": out["latency_ms"]["p50"],
        "p99_ms": out["latency_ms"]["p99"],
        "replies": out["replies"],
        "connection_errors": out["connection_errors"],
        "cpu_us_per_msg": (c1 - c0) / max(accepted, 1),
        "broker_cpu_us_per_msg": (b1 - b0) / max(accepted, 1) if amqp_uri else None,
        "peak_rss_kib": vm_hwm_kib(pid),
        "e2e_per_s": e2e["per_s"] if e2e else None,
        "lost": e2e["lost"] if e2e else None,
        "duplicates": e2e["duplicates"] if e2e else None,
    }


def run_daemon(args, name, path, overrides, envs, load, beam, run_no):
    broker = LOADS[load][3]
    tag = f"cmp{os.getpid()}-{run_no}"
    spool = os.path.join(args.workdir, tag + "-spool")
    sock = os.path.join(args.workdir, tag + ".sock")
    logf = os.path.join(args.workdir, tag + ".log")
    cfg = os.path.join(args.workdir, tag + ".ron")
    port = free_port()
    if broker:
        vhost, nodes = tag, [args.broker]
        rabbitmqctl("add_vhost", vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    else:
        vhost, nodes = "/", [f"127.0.0.1:{free_port()}"]
    with open(cfg, "w") as f:
        f.write(ron_config(port, spool, sock, vhost, nodes, overrides))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUST_LOG", "LSMTPD_LOG", "JOURNAL_STREAM", "LSMTPD_LOG_FORMAT")
           and not k.startswith("AMQP_") and not k.startswith("LSMTPD_")}
    env.update(envs)
    with open(logf, "w") as errf:
        proc = subprocess.Popen([path, "--config", cfg], stderr=errf, stdout=errf, env=env)
    r = None
    try:
        wait_ready(port, vhost if broker else None, proc, logf)
        uri = f"amqp://guest:guest@{args.broker}/{vhost}" if broker else None
        r = measured(args, f"127.0.0.1:{port}", proc.pid, load, beam, uri)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if broker:
            rabbitmqctl("delete_vhost", vhost, check=False)
        if not args.keep:
            shutil.rmtree(spool, ignore_errors=True)
        if not args.keep and r is not None:  # a failed run keeps its config and log
            for p in (cfg, logf):
                if os.path.exists(p):
                    os.remove(p)
    r["exit_code"] = proc.returncode
    return r


def start_sink(args):
    port = free_port()
    env = dict(os.environ)
    lib = args.sink_lib or os.path.normpath(
        os.path.join(os.path.dirname(args.sink), "..", "lib", "postfix"))
    env["LD_LIBRARY_PATH"] = lib
    cmd = [args.sink]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    cmd += [f"127.0.0.1:{port}", "1000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"smtp-sink exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("smtp-sink did not listen")


def fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def row(r, sink):
    ratio = r["msg_per_s"] / sink["msg_per_s"] if sink and sink["msg_per_s"] else None
    e2e = (f"{r['e2e_per_s']:,.0f} ({r['lost']}, {r['duplicates']})"
           if r.get("e2e_per_s") is not None else "–")
    bad = sum(n for c, n in r["replies"].items() if c != "250") + r["connection_errors"]
    return (f"| {r['round']} | {r['name']} | {r['msg_per_s']:,.0f} | {fmt(ratio, '.2f')} | {e2e} | "
            f"{r['cpu_us_per_msg']:.0f} | {fmt(r['broker_cpu_us_per_msg'], '.0f')} | "
            f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['peak_rss_kib'] / 1024:.1f} | "
            f"{r['loadavg']:.1f} | {bad} |")


def tables(results, names, loads):
    out = []
    for load in loads:
        runs = [r for r in results if r["load"] == load]
        if not runs:
            continue
        c, m, k, _ = LOADS[load]
        out.append(f"\n### {load} ({c} clients, {k} per connection)\n")
        out.append("| round | server | msg/s | ×sink | end-to-end msg/s (lost, dup) | CPU µs/msg "
                   "| RabbitMQ µs/msg | p50 / p99 ms | peak RSS MiB | load avg | not 250 |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            sink = next((s for s in runs if s["round"] == r["round"] and s["name"] == "smtp-sink"),
                        None)
            out.append(row(r, sink if r["name"] != "smtp-sink" else None))
        out.append("\nMedian over rounds:\n")
        out.append("| server | msg/s | ×sink | end-to-end msg/s | CPU µs/msg | RabbitMQ µs/msg "
                   "| p50 / p99 ms | peak RSS MiB | lost |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for name in ["smtp-sink"] + names:
            mine = [r for r in runs if r["name"] == name]
            if not mine:
                continue
            ratios = []
            for r in mine:
                sink = next((s for s in runs if s["round"] == r["round"]
                             and s["name"] == "smtp-sink"), None)
                if sink and name != "smtp-sink":
                    ratios.append(r["msg_per_s"] / sink["msg_per_s"])

            def med(key):
                vals = [r[key] for r in mine if r.get(key) is not None]
                return statistics.median(vals) if vals else None

            lost = [r["lost"] for r in mine if r.get("lost") is not None]
            out.append(
                f"| {name} | {med('msg_per_s'):,.0f} | "
                f"{fmt(statistics.median(ratios) if ratios else None, '.2f')} | "
                f"{fmt(med('e2e_per_s'), ',.0f')} | {med('cpu_us_per_msg'):.0f} | "
                f"{fmt(med('broker_cpu_us_per_msg'), '.0f')} | "
                f"{med('p50_ms'):.2f} / {med('p99_ms'):.2f} | "
                f"{med('peak_rss_kib') / 1024:.1f} | {sum(lost) if lost else '–'} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bin", action="append", required=True, metavar="NAME=PATH",
                   help="an lsmtpd binary to compare (repeat)")
    p.add_argument("--sink", default="/work/bench/postfix-x/usr/sbin/smtp-sink")
    p.add_argument("--sink-lib", help="LD_LIBRARY_PATH for smtp-sink (default: ../lib/postfix)")
    p.add_argument("--bench", default="target/release/lsmtp-bench")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loads", default="oneconn,persistent,brokerdown,single")
    p.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes")
    p.add_argument("--broker", default="127.0.0.1:5672", help="RabbitMQ host:port (guest/guest)")
    p.add_argument("--set", action="append", default=[], metavar="NAME:SECTION.KEY=RON",
                   help="one more config value for one binary name, e.g. new:amqp.payload=raw")
    p.add_argument("--env", action="append", default=[], metavar="NAME:VAR=VALUE",
                   help="an environment variable for one binary name, e.g. new:TOKIO_WORKER_THREADS=1")
    p.add_argument("--workdir", default=f"/var/tmp/lsmtp-compare-{os.getpid()}",
                   help="spools, configs, logs (on a real disk: fdatasync on tmpfs is free)")
    p.add_argument("--keep", action="store_true", help="keep spools, configs and logs")
    p.add_argument("--no-sink", action="store_true", help="skip smtp-sink")
    p.add_argument("--json", metavar="FILE", help="write every run as JSON ('-': stdout)")
    args = p.parse_args()

    bins = []
    for b in args.bin:
        name, sep, path = b.partition("=")
        if not sep or not os.access(path, os.X_OK):
            p.error(f"--bin {b}: want NAME=PATH to an executable")
        bins.append((name, os.path.abspath(path)))
    names = [n for n, _ in bins]
    overrides = {n: [] for n in names}
    for s in args.set:
        name, _, kv = s.partition(":")
        key, sep, value = kv.partition("=")
        if name not in overrides or not sep or "." not in key:
            p.error(f"--set {s}: want NAME:SECTION.KEY=RON with a --bin NAME")
        overrides[name].append((key, value))
    envs = {n: {} for n in names}
    for s in args.env:
        name, _, kv = s.partition(":")
        var, sep, value = kv.partition("=")
        if name not in envs or not sep:
            p.error(f"--env {s}: want NAME:VAR=VALUE with a --bin NAME")
        envs[name][var] = value
    loads = [x for x in args.loads.split(",") if x]
    for x in loads:
        if x not in LOADS:
            p.error(f"unknown load {x}; known: {', '.join(LOADS)}")
    if not os.access(args.bench, os.X_OK):
        p.error(f"--bench {args.bench} is not executable (cargo build --release -p lsmtp-e2e)")
    os.makedirs(args.workdir, exist_ok=True)
    beam = beam_pid()
    sink = None if args.no_sink else start_sink(args)
    results = []
    run_no = 0
    try:
        for rnd in range(1, args.rounds + 1):
            order = bins if rnd % 2 else list(reversed(bins))
            for load in loads:
                if sink:
                    r = measured(args, sink[1], sink[0].pid, load, beam)
                    r.update(name="smtp-sink", round=rnd)
                    r["broker_cpu_us_per_msg"] = None
                    results.append(r)
                    log(row(r, None))
                for name, path in order:
                    run_no += 1
                    r = run_daemon(args, name, path, overrides[name], envs[name], load, beam,
                                   run_no)
                    r.update(name=name, round=rnd, binary=path, settings=overrides[name],
                             env=envs[name])
                    results.append(r)
                    log(row(r, next((s for s in results if s["round"] == rnd
                                     and s["load"] == load and s["name"] == "smtp-sink"), None)))
    finally:
        if sink:
            sink[0].terminate()
            sink[0].wait()
        if not args.keep and not os.listdir(args.workdir):
            os.rmdir(args.workdir)
    text = tables(results, names, loads)
    meta = {"scale": args.scale, "size": args.size, "rounds": args.rounds,
            "bins": dict(bins), "settings": overrides, "env": envs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json == "-":
        print(text, file=sys.stderr)
        print(json.dumps({"meta": meta, "runs": results}, indent=1))
    else:
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "runs": results}, f, indent=1)


if __name__ == "__main__":
    main()
