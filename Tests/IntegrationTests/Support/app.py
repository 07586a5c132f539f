#!/usr/bin/env python3
"""HTTP app for the proxy tests (behind nginx, or alone).

  app.py PORT TAG [--host ADDR]   HTTP/1.1 keep-alive server:
    GET  /            "TAG <client-address>" and the X-Forwarded-For/-Proto and Forwarded it got
    GET  /big         4 MiB of deterministic bytes
    GET  /huge        256 MiB: /big's bytes 64 times
    GET  /slow        a chunked body sent in 5 pieces over about a second
    POST /...         "sha256 <hex> <length>" of the body (Content-Length or chunked; any size, streamed;
                      with X-Stall: S it waits S seconds before reading a Content-Length body)
    GET with Upgrade: 101, then echoes raw bytes until the client half-closes, then closes
    GET /.well-known/acme-challenge/T   "TAG challenge T" (a stand-in ACME client server)
    CONNECT           405, and the connection stays open (an app that does not tunnel)
  With APP_LOG=FILE, every request line it reads is appended to FILE.
"""
import os
import hashlib
import socket
import sys
import threading
import time

BIG = hashlib.sha256(b"seed").digest() * (4 * 1024 * 1024 // 32)


def read_head(conn, buf):
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def read_exact(conn, buf, n):
    while len(buf) < n:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    return buf[:n], buf[n:]


def read_line(conn, buf):
    while b"\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError
        buf += chunk
    line, _, rest = buf.partition(b"\r\n")
    return line, rest


def respond(conn, status, body, extra=b"", close=False):
    conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra
                 + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body)


def serve(conn, addr, tag):
    host = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
    buf = b""
    with conn:
        while True:
            head, buf = read_head(conn, buf)
            if head is None:
                return
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            close = fields.get("connection", "").lower() == "close"
            if os.environ.get("APP_LOG"):
                with open(os.environ["APP_LOG"], "a") as log:
                    log.write(lines[0] + "\n")
            if method == "CONNECT":
                respond(conn, b"405 Method Not Allowed", b"no tunnels here\n", close=close)
            elif method == "POST":
                digest, length = hashlib.sha256(), 0
                if fields.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        line, buf = read_line(conn, buf)
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            while True:
                                line, buf = read_line(conn, buf)
                                if not line:
                                    break
                            break
                        data, buf = read_exact(conn, buf, size + 2)
                        digest.update(data[:-2])
                        length += size
                else:
                    # Streamed, so that bodies of any size pass; X-Stall: S waits S seconds first.
                    time.sleep(float(fields.get("x-stall", "0")))
                    want = int(fields.get("content-length", "0"))
                    while length < want:
                        if not buf:
                            buf = conn.recv(min(1 << 20, want - length))
                            if not buf:
                                raise EOFError
                        take, buf = buf[:want - length], buf[want - length:]
                        digest.update(take)
                        length += len(take)
                respond(conn, b"200 OK", f"sha256 {digest.hexdigest()} {length}\n".encode(), close=close)
            elif "upgrade" in fields:
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + fields["upgrade"].encode()
                             + b"\r\nConnection: Upgrade\r\n\r\n")
                if buf:
                    conn.sendall(buf)
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        conn.sendall(b"bye\n")
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(chunk)
            elif target == "/big":
                respond(conn, b"200 OK", BIG, close=close)
            elif target == "/huge":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(64 * len(BIG)).encode() + b"\r\n\r\n")
                for _ in range(64):
                    conn.sendall(BIG)
            elif target == "/slow":
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(5):
                    time.sleep(0.2)
                    piece = f"piece {i}\n".encode()
                    conn.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.sendall(b"0\r\n\r\n")
            elif target.startswith("/.well-known/acme-challenge/"):
                forwarded = "".join(f" {k}={fields[k]}" for k in ("x-forwarded-for", "x-forwarded-proto", "forwarded") if k in fields)
                respond(conn, b"200 OK", f"{tag} challenge {target.rsplit('/', 1)[1]}{forwarded}\n".encode(), close=close)
            else:
                forwarded = " ".join(f"{k}={fields[k]}" for k in ("x-forwarded-for", "x-forwarded-proto", "forwarded") if k in fields)
                body = f"{tag} {fields.get('x-real-ip', host)} {forwarded}".strip().encode() + b"\n"
                respond(conn, b"200 OK", b"" if method == "HEAD" else body, close=close)
            if close:
                return


def main():
    port, tag = int(sys.argv[1]), sys.argv[2]
    address = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--host" else "::"
    family = socket.AF_INET if "." in address else socket.AF_INET6
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((address, port))
    listener.listen(256)
    while True:
        conn, addr = listener.accept()
        threading.Thread(target=serve, args=(conn, addr, tag), daemon=True).start()


if __name__ == "__main__":
    main()
