#!/usr/bin/env python3
"""Splits a perf profile of lsmtpd into where the CPU goes, as shares of all samples.

    perf record -F 1999 --call-graph dwarf,32768 -p $(pidof lsmtpd) -o perf.data   # during a load
    perf script -i perf.data > stacks.txt
    tests/bench/perf-split.py stacks.txt

Each sample goes to one class, tried in this order: the thread it ran on for lapin's and sled's
I/O threads; then what the kernel was doing (fdatasync, futex/scheduler/epoll, page faults,
socket I/O); then the leaf-most user-space frame that names a known part (the allocator, sled,
logging and formatting, the forwarder and lapin, the spool, the SMTP session, tokio). Numbers
only: a measurement aid for BENCHMARKS.md, not a test.
"""
import collections
import re
import sys

USER = [
    (r"^(_int_malloc|_int_free|malloc|__libc_malloc|cfree|__libc_free|_int_realloc|__libc_calloc"
     r"|realloc|malloc_consolidate|unlink_chunk)", "allocator (glibc malloc/free)"),
    (r"^sled::|<sled::", "sled tree operations (inserts, splits, reads, log reservations)"),
    (r"tracing_subscriber|tracing_core::|core::fmt::", "logging and formatting"),
    (r"lsmtpd::forward|lapin::|amq_protocol", "forwarder (lease, encode, publish, confirms)"),
    (r"lsmtpd::spool", "spool (our code)"),
    (r"lsmtpd::smtp|lsmtp_wire", "SMTP session (our code)"),
    (r"tokio::", "tokio runtime"),
]


def classify(comm, frames):
    kern = " ".join(f for f, dso in frames if "kernel" in dso)
    user = [f for f, dso in frames if "kernel" not in dso]
    if comm.startswith("lapin"):
        return "lapin's I/O thread (AMQP socket, frames)"
    if comm.startswith("sled-io"):
        return "sled's I/O threads (log writes, waiting for work)"
    if "fdatasync" in kern or any("Syncer::sync" in f for f in user):
        return "group commit: fdatasync and directory checks"
    if any("garbage::release" in f or "crossbeam_epoch" in f for f in user):
        return "sled's deferred frees"
    if re.search(r"futex|schedule|epoll|finish_task_switch", kern):
        return "thread hand-offs: futex, scheduler, epoll (kernel)"
    if "page_fault" in kern:
        return "page faults"
    if kern and not any("sled::" in f for f in user):
        if re.search(r"sendto|recvfrom|tcp_|sock_|writev|readv", kern):
            return "socket I/O (kernel)"
        return "other kernel"
    for f in user:
        for pattern, name in USER:
            if re.search(pattern, f):
                return name
    return "other"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    counts = collections.Counter()
    for block in open(sys.argv[1], errors="replace").read().split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) < 2:
            continue
        comm = lines[0].split()[0]
        frames = []
        for line in lines[1:]:
            m = re.match(r"^\s*[0-9a-f]+\s+(.*) \((.*)\)$", line)
            if m:
                frames.append((m.group(1), m.group(2)))
        counts[classify(comm, frames)] += 1
    total = sum(counts.values()) or 1
    print(f"{total} samples")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f} %  {name}")


if __name__ == "__main__":
    main()
