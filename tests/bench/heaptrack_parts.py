#!/usr/bin/env python3
"""Splits a heaptrack peak profile of lsmtpd by the daemon's parts (BENCHMARKS.md, issue 15).

    heaptrack -o /tmp/run target/release/lsmtpd --config bench.ron    # then run a load, stop it
    heaptrack_print -f /tmp/run.zst -p 0 -a 0 -T 0 -F /tmp/run.stacks --flamegraph-cost-type peak
    tests/bench/heaptrack_parts.py /tmp/run.stacks [-v]

Each line of the stacks file is "frame;frame;...;frame BYTES" (root first): the bytes that call
stack held at the heap's peak. A stack is charged to the first part below whose pattern matches
any of its frames, so the order matters (lapin's copy is found before the forwarder that called
it). The patterns name functions and files of lsmtpd, sled and lapin as they are today: when the
code moves, update them, or the bytes land in "other" (-v lists the biggest of those).
These are heap bytes allocated, not resident: sled allocates metrics histograms and a zeroed
page table at open that are mostly never touched.
"""
import collections
import re
import sys

PARTS = [
    ("lapin: body frames copied by basic_publish", r"send_method_frame_with_body|basic_publish"),
    ("lapin: I/O loop buffers", r"\(io_loop\.rs\)|\(buffer\.rs\)"),
    ("forwarder: JSON payload encoding", r"encode \(payload\.rs\)"),
    ("forwarder: body read back at lease", r"read_body \((store|reader)\.rs\)|load_for_lease"),
    ("session: body buffer (DATA/BDAT)", r"receive_data|receive_bdat|copy_chunk|feed \(data\.rs\)"),
    ("group commit (flusher.rs: sled transaction and log)", r"\(flusher\.rs\)"),
    ("sled: open (metrics histograms, page table)", r"lock_and_open"),
    ("sled: pages the spool's open scan read (its cache)", r"scan \(open\.rs\)|scan_one"),
    ("sled (other)", r"\(pagecache|\(tree\.rs\)|\(iobuf\.rs\)|\(logger\.rs\)|sled"),
    ("session: other", r"\(session\.rs\)|\(listener\.rs\)"),
    ("lapin (other, e.g. body frames when inlined)", r"lapin|\(channel\.rs\)|\(connection\.rs\)"),
]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    costs = collections.Counter()
    other = collections.Counter()
    with open(sys.argv[1], errors="replace") as f:
        for line in f:
            stack, _, cost = line.rstrip("\n").rpartition(" ")
            try:
                size = int(cost)
            except ValueError:
                continue
            frames = stack.split(";")
            part = next(
                (name for name, pat in PARTS if any(re.search(pat, fr) for fr in frames)),
                None,
            )
            if part is None:
                part = "other"
                other[frames[-1][:120] if frames else "?"] += size
            costs[part] += size
    print(f"peak heap, all stacks: {sum(costs.values()) / 2**20:.1f} MiB")
    for part, size in costs.most_common():
        print(f"{size / 2**20:8.1f} MiB  {part}")
    if "-v" in sys.argv:
        for frame, size in other.most_common(10):
            print(f"   other {size / 2**20:8.1f} MiB  {frame}")


if __name__ == "__main__":
    main()
