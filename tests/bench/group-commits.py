#!/usr/bin/env python3
"""Group-commit durations from a daemon log with LSMTPD_LOG=info,lsmtpd::spool::commit=trace
(the group_committed lines): count, waiters per commit, flush p50 / p90 / p99 / max.

    tests/bench/group-commits.py daemon.log [more.log ...]
"""
import re,sys,statistics
for fn in sys.argv[1:]:
    us=[];w=[]
    for line in open(fn):
        if 'group_committed' not in line: continue
        m=re.search(r'waiters=(\d+)',line); f=re.search(r'flush_us=(\d+)',line)
        if m and f: w.append(int(m.group(1))); us.append(int(f.group(1)))
    us.sort()
    q=lambda p: us[min(len(us)-1,int(p*len(us)))]
    print(f"{fn}: {len(us)} group commits, waiters mean {statistics.mean(w):.1f}, flush p50 {q(.5)/1000:.2f} p90 {q(.9)/1000:.2f} p99 {q(.99)/1000:.2f} max {us[-1]/1000:.2f} ms; zero-waiter flushes {sum(1 for x in w if x==0)}")
