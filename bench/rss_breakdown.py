#!/usr/bin/env python3
"""Where a process's resident memory is, from /proc/PID/smaps.

Usage: rss_breakdown.py PID [--watch SECONDS | --files]
  Prints the resident MiB by kind: the executable, the Swift runtime and
  Foundation, librados/librbd and their dependencies, other libraries, the
  main heap, glibc's per-thread malloc arenas, thread stacks, other anonymous
  memory (large buffers: the converter's windows, a download's window), and
  the threads by name. With --watch, samples every SECONDS until the process
  exits (or the watch gets SIGINT or SIGTERM) and prints the breakdown of the sample
  with the most resident memory: the peak. With --files, the mappings with
  the most resident memory, by path.
"""
import collections
import os
import re
import signal
import sys
import time

MIB = 1024.0 * 1024.0
CEPH = re.compile(r'/(librados|librbd|libceph|libboost|libssl|libcrypto|'
                  r'libibverbs|librdmacm|libnl|liblttng|libfmt|libblkid|'
                  r'libudev|libcap|libnuma|libtcmalloc)')
SWIFT = re.compile(r'/(libswift|libFoundation|lib_Foundation|libdispatch|'
                   r'libBlocksRuntime)')
ARENA = 64 << 20   # glibc HEAP_MAX_SIZE on 64-bit: arenas are aligned to it


def regions(pid):
    """(start, end, perms, path, rss_kib) for every mapping."""
    out = []
    cur = None
    with open('/proc/%d/smaps' % pid) as f:
        for line in f:
            head = re.match(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$',
                            line)
            if head:
                if cur:
                    out.append(cur)
                cur = [int(head.group(1), 16), int(head.group(2), 16),
                       head.group(3), head.group(4).strip(), 0]
            elif line.startswith('Rss:') and cur:
                cur[4] = int(line.split()[1])
    if cur:
        out.append(cur)
    return out


def classify(pid):
    kinds = collections.OrderedDict(
        (k, 0) for k in ('executable', 'swift runtime + Foundation',
                         'librados/librbd + deps', 'other libraries',
                         '[heap] (main arena)', 'malloc arenas (threads)',
                         'thread stacks', 'other anonymous (buffers)'))
    exe = os.path.realpath('/proc/%d/exe' % pid)
    maps = regions(pid)
    for i, (start, end, perms, path, rss) in enumerate(maps):
        if path == exe:
            kinds['executable'] += rss
        elif SWIFT.search(path):
            kinds['swift runtime + Foundation'] += rss
        elif CEPH.search(path):
            kinds['librados/librbd + deps'] += rss
        elif path.startswith('/'):
            kinds['other libraries'] += rss
        elif path == '[heap]':
            kinds['[heap] (main arena)'] += rss
        elif path.startswith('[stack'):
            kinds['thread stacks'] += rss
        elif path == '':
            guarded = i > 0 and maps[i - 1][2] == '---p' and \
                maps[i - 1][1] == start and maps[i - 1][1] - maps[i - 1][0] <= 65536
            if start % ARENA == 0 or (i > 0 and maps[i - 1][0] % ARENA == 0 and
                                      maps[i - 1][1] == start and
                                      maps[i - 1][2] == 'rw-p'):
                kinds['malloc arenas (threads)'] += rss
            elif guarded and 'rw' in perms:
                kinds['thread stacks'] += rss
            else:
                kinds['other anonymous (buffers)'] += rss
        else:
            kinds['other anonymous (buffers)'] += rss
    threads = collections.Counter()
    for t in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/comm' % (pid, t)) as f:
                name = f.read().strip()
        except OSError:
            continue
        threads[re.sub(r'[-_:]?\d+$', '', name) or name] += 1
    return kinds, threads


def total(kinds):
    return sum(kinds.values())


FILE_KINDS = ('executable', 'swift runtime + Foundation',
              'librados/librbd + deps', 'other libraries')


def report(kinds, threads, title):
    mapped = sum(kinds[k] for k in FILE_KINDS)
    print('%s: %.1f MiB resident (%.1f MiB file-backed, %.1f MiB anonymous)'
          % (title, total(kinds) / 1024.0, mapped / 1024.0,
             (total(kinds) - mapped) / 1024.0))
    for k, v in kinds.items():
        print('  %-30s %7.1f MiB' % (k, v / 1024.0))
    print('  threads: %d (%s)' % (
        sum(threads.values()),
        ', '.join('%s %d' % (n, c) for n, c in threads.most_common())))


def main():
    pid = int(sys.argv[1])
    if '--files' in sys.argv:
        by_path = collections.Counter()
        for _, _, _, path, rss in regions(pid):
            by_path[path or '[anonymous]'] += rss
        for path, rss in by_path.most_common(15):
            print('  %7.1f MiB  %s' % (rss / 1024.0, path))
        return
    if '--watch' not in sys.argv:
        kinds, threads = classify(pid)
        report(kinds, threads, 'pid %d' % pid)
        return
    interval = float(sys.argv[sys.argv.index('--watch') + 1])

    def stop(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, stop)
    best = None
    try:
        while os.path.exists('/proc/%d' % pid):
            try:
                sample = classify(pid)
            except (OSError, ValueError):
                break
            if best is None or total(sample[0]) > total(best[0]):
                best = sample
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    if best:
        report(best[0], best[1], 'peak of pid %d' % pid)


if __name__ == '__main__':
    main()
