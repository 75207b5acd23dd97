#!/usr/bin/env python3
"""Ask N agents at the same moment for a disk of one image; time each answer.

Usage: fire.py IMAGE_ID OUT_PREFIX SOCKET...

One process for the whole fleet: every connection is opened and every request
body made before the start, then all threads are released together and each
times its own POST /v1/disks from sending to the end of the answer.  Writes
"seconds method name" to OUT_PREFIX.I for the I-th socket (method "error" when
the request failed).  A client per node in a shell (a subshell, curl and a
JSON parser for each) spends the fleet's CPU on the client side: on this
2-core machine that is what the agents would be competing with, not each
other; compute nodes each run their own client.
"""

import http.client
import json
import socket
import sys
import threading
import time
import uuid


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__('localhost', timeout=3600)
        self.path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def main(argv):
    image, prefix, sockets = argv[1], argv[2], argv[3:]
    barrier = threading.Barrier(len(sockets) + 1)
    results = [None] * len(sockets)

    def node(i, path):
        body = json.dumps({'instance_uuid': str(uuid.uuid4()), 'image_id': image})
        conn = UnixConnection(path)
        try:
            conn.connect()
        except OSError as e:
            barrier.wait()
            results[i] = (0.0, 'error', str(e))
            return
        barrier.wait()
        t0 = time.monotonic()
        try:
            conn.request('POST', '/v1/disks', body=body,
                         headers={'Content-Type': 'application/json'})
            resp = conn.getresponse()
            data = resp.read()
            t1 = time.monotonic()
            if resp.status // 100 != 2:
                results[i] = (t1 - t0, 'error', '%d' % resp.status)
            else:
                d = json.loads(data)
                results[i] = (t1 - t0, d.get('method'), d.get('name'))
        except (OSError, http.client.HTTPException, ValueError) as e:
            results[i] = (time.monotonic() - t0, 'error', type(e).__name__)
        finally:
            conn.close()

    threads = [threading.Thread(target=node, args=(i, p))
               for i, p in enumerate(sockets)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    for i, (seconds, method, name) in enumerate(results):
        with open('%s.%d' % (prefix, i), 'w') as f:
            f.write('%.3f %s %s\n' % (seconds, method, name))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
