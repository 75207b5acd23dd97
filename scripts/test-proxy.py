#!/usr/bin/env python3
"""A small HTTP/1.1 forwarding proxy the agent tests control, in front of the real Glance.

It counts requests (one line per request in --log: "METHOD PATH RANGE"), and on request misbehaves the way
real networks and servers do:
  --cut-after N       close the client connection after N response bytes, for the first --cuts responses
                      to GET .../file (a dropped connection mid-stream)
  --ignore-range      drop the Range header before forwarding (a server that answers a Range request with
                      the whole body and 200)
  --rate BYTES        send response bodies at most this fast (so a test can kill the agent mid-download)
  strip_query (control file only): forward requests without their query string (a Glance older than 33, which
                      ignores ?prefer=)
  fail_status, fails, fail_path (control file only): answer the first `fails` requests whose path ends with
                      `fail_path` with `fail_status` instead of forwarding them (an overloaded server's 5xx)
Control: the proxy re-reads --control (a JSON file with the same keys) before every request, so a test can
change the behaviour without restarting it.
"""
import argparse
import json
import os
import socket
import socketserver
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--listen", type=int, required=True, help="port; 0: any free port, written to --port-file")
parser.add_argument("--port-file")
parser.add_argument("--upstream", default="127.0.0.1:9292")
parser.add_argument("--log", required=True)
parser.add_argument("--control")
args = parser.parse_args()
host, port = args.upstream.split(":")
lock = threading.Lock()
cuts_done = 0
fails_done = 0


def settings():
    s = {"cut_after": 0, "cuts": 0, "ignore_range": False, "rate": 0, "fail_status": 0, "fails": 0, "fail_path": "",
         "strip_query": False}
    if args.control and os.path.exists(args.control):
        try:
            with open(args.control) as f:
                s.update(json.load(f))
        except (OSError, ValueError):
            pass
    return s


def read_head(f):
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            return None
        if line in (b"\r\n", b"\n"):
            return lines
        lines.append(line)


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        global cuts_done, fails_done
        while True:
            head = read_head(self.rfile)
            if not head:
                return
            s = settings()
            request_line = head[0].decode("latin-1").strip()
            method, path = request_line.split(" ")[:2]
            route = path.split("?", 1)[0]
            headers = head[1:]
            rng = ""
            kept = []
            length = 0
            for h in headers:
                name = h.split(b":", 1)[0].strip().lower()
                if name == b"range":
                    rng = h.split(b":", 1)[1].strip().decode("latin-1")
                    if s["ignore_range"]:
                        continue
                if name == b"content-length":
                    length = int(h.split(b":", 1)[1])
                if name == b"connection":
                    continue
                kept.append(h)
            body = self.rfile.read(length) if length else b""
            with lock:
                with open(args.log, "a") as log:
                    log.write(f"{method} {path} {rng or '-'}\n")
            fail = False
            if s["fail_status"] and route.endswith(s["fail_path"]):
                with lock:
                    if fails_done < s["fails"]:
                        fails_done += 1
                        fail = True
            if fail:
                text = b"injected failure"
                self.wfile.write(f"HTTP/1.1 {s['fail_status']} Injected\r\nContent-Type: text/plain\r\n"
                                 f"Content-Length: {len(text)}\r\nConnection: keep-alive\r\n\r\n".encode() + text)
                self.wfile.flush()
                continue
            up = socket.create_connection((host, int(port)))
            first = head[0]
            if s["strip_query"] and route != path:
                first = f"{method} {route} {request_line.split(' ')[2]}\r\n".encode("latin-1")
            up.sendall(first + b"".join(kept) + b"Connection: close\r\n\r\n" + body)
            uf = up.makefile("rb")
            status_line = uf.readline()
            resp_headers = read_head(uf) or []
            cut = 0
            if method == "GET" and route.endswith("/file") and s["cut_after"]:
                with lock:
                    if cuts_done < s["cuts"]:
                        cuts_done += 1
                        cut = s["cut_after"]
            keep_alive = True
            out_headers = []
            for h in resp_headers:
                if h.split(b":", 1)[0].strip().lower() == b"connection":
                    continue
                out_headers.append(h)
            self.wfile.write(status_line + b"".join(out_headers) + b"Connection: keep-alive\r\n\r\n")
            sent = 0
            start = time.monotonic()
            while True:
                chunk = uf.read1(65536)
                if not chunk:
                    break
                if cut and sent + len(chunk) >= cut:
                    self.wfile.write(chunk[: cut - sent])
                    self.wfile.flush()
                    keep_alive = False
                    break
                self.wfile.write(chunk)
                sent += len(chunk)
                if s["rate"]:
                    due = sent / s["rate"]
                    lag = due - (time.monotonic() - start)
                    if lag > 0:
                        time.sleep(lag)
            up.close()
            self.wfile.flush()
            if not keep_alive:
                self.connection.shutdown(socket.SHUT_RDWR)
                return


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


server = Server(("127.0.0.1", args.listen), Handler)
if args.port_file:
    # Listening already: whoever waits for this file can connect as soon as it appears.
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(args.port_file + ".tmp", args.port_file)
server.serve_forever()
