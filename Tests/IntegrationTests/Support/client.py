#!/usr/bin/env python3
"""HTTP client for the proxy tests: each case prints "ok ..." or fails with exit 1.

  client.py pipeline HOST     keep-alive + pipelining: GET, HEAD, GET /big, POST (length), POST (chunked)
  client.py upgrade HOST      Upgrade -> 101, raw echo, half-close, server's last bytes
  client.py slow HOST         a slow server's chunked answer
  client.py slowclient HOST   a request sent a few bytes at a time
  client.py get HOST PATH [HEADER...]   one request (Connection: close); prints status and body
  client.py raw HOST          connects and reports whether the server closes without a word
  client.py proxied HOST v1|v2 PATH [split]   a PROXY header (from 192.0.2.7 / 2001:db8::7, as a
                              load balancer sends it), then one request; with split, in two writes
                              cut inside the header (the proxy must wait for the rest; nginx does not)
  client.py typed HOST PATH   one request; prints status, Content-Type, X-Content-Type-Options, body
"""
import ipaddress
import struct
import hashlib
import socket
import sys
import threading
import time

BIG = hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32)


def connect(host, port=80):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(10)
    # A link-local address names its interface (fe80::1%eth0): getaddrinfo gives the scope id.
    s.connect(socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)[0][4] if "%" in host else (host, port))
    return s


class Reader:
    def __init__(self, s):
        self.s, self.buf = s, b""

    def fill(self):
        chunk = self.s.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def until(self, sep):
        while sep not in self.buf:
            self.fill()
        out, _, self.buf = self.buf.partition(sep)
        return out

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only=False):
        head = self.until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        fields = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in head[1:]}
        if head_only or status in (101, 204, 304):
            return status, fields, b""
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    while self.until(b"\r\n"):
                        pass
                    return status, fields, body
                body += self.exact(size)
                self.exact(2)
        return status, fields, self.exact(int(fields.get("content-length", "0")))


def pipeline(host):
    s = connect(host)
    post = b"x" * 3_000_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [b"a" * 70000, b"b" * 5, b"c" * 123456]) + b"0\r\n\r\n"
    # Sent from another thread: the answers come back while the bodies are still going out.
    threading.Thread(target=s.sendall, daemon=True, args=(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" + b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n"
              + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(post) + post
              + b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,)).start()
    r = Reader(s)
    status, _, body = r.response()
    assert status == 200 and body.startswith(b"app "), body
    status, fields, _ = r.response(head_only=True)
    assert status == 200, status
    status, _, body = r.response()
    assert status == 200 and body == BIG, (status, len(body))
    status, _, body = r.response()
    assert body.decode().split()[1:] == [hashlib.sha256(post).hexdigest(), str(len(post))], body
    status, _, body = r.response()
    plain = b"a" * 70000 + b"b" * 5 + b"c" * 123456
    assert body.decode().split()[1:] == [hashlib.sha256(plain).hexdigest(), str(len(plain))], body
    print("ok pipeline")


def upgrade(host):
    s = connect(host)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    r = Reader(s)
    status, _, _ = r.response()
    assert status == 101, status
    s.sendall(b"hello through the window")
    assert r.exact(24) == b"hello through the window"
    s.shutdown(socket.SHUT_WR)
    rest = r.buf
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert rest == b"bye\n", rest
    print("ok upgrade")


def slow(host):
    s = connect(host)
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, body = Reader(s).response()
    assert status == 200 and body == b"".join(b"piece %d\n" % i for i in range(5)), body
    print("ok slow")


def slowclient(host):
    s = connect(host)
    request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    for i in range(0, len(request), 7):
        s.sendall(request[i:i + 7])
        time.sleep(0.05)
    status, _, body = Reader(s).response()
    assert status == 200 and body.startswith(b"app"), body
    print("ok slowclient")


def get(host, path, headers):
    s = connect(host)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode() + "".join(h + "\r\n" for h in headers).encode() + b"\r\n")
    status, _, body = Reader(s).response()
    print(status, body.decode().strip())


def proxy_header(version, host):
    v6 = ":" in host
    source = "2001:db8::7" if v6 else "192.0.2.7"
    if version == "v1":
        return f"PROXY {'TCP6' if v6 else 'TCP4'} {source} {host} 51234 80\r\n".encode()
    family = 0x21 if v6 else 0x11
    addresses = ipaddress.ip_address(source).packed + ipaddress.ip_address(host).packed + struct.pack("!HH", 51234, 80)
    tlv = b"\x04" + struct.pack("!H", 3) + b"abc"  # a TLV of no meaning here (NOOP), passed on with the rest
    body = addresses + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def proxied(host, version, path, split):
    s = connect(host)
    header = proxy_header(version, host)
    if split:
        s.sendall(header[:9])
        time.sleep(0.2)
        header = header[9:]
    s.sendall(header + f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    status, _, body = Reader(s).response()
    print(status, body.decode().strip())


def typed(host, path):
    s = connect(host)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    status, fields, body = Reader(s).response()
    print(status, fields.get("content-type"), fields.get("x-content-type-options"), body.decode().strip())


def raw(host, port):
    s = connect(host, port)
    try:
        data = s.recv(100)
        print("closed" if not data else f"data {data!r}")
    except ConnectionResetError:
        print("closed")


if __name__ == "__main__":
    case, host = sys.argv[1], sys.argv[2]
    if case == "get":
        get(host, sys.argv[3], sys.argv[4:])
    elif case == "raw":
        raw(host, int(sys.argv[3]))
    elif case == "proxied":
        proxied(host, sys.argv[3], sys.argv[4], sys.argv[5:] == ["split"])
    elif case == "typed":
        typed(host, sys.argv[3])
    else:
        globals()[case](host)
