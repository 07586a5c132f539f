#!/usr/bin/env python3
"""Hostile clients for the proxy tests: each prints one line saying what the server did.

  hostile.py answer HOST HEX          send these bytes, half-close, print the first status line
                                      received ("status 400"), or "closed" with nothing
  hostile.py responses HOST HEX       the same, but print every status line received, comma-separated
  hostile.py slowloris HOST N SECONDS N connections each sending a request head a byte every 0.5 s;
                                      print "closed K of N, median S s" (closed by the server)
  hostile.py flood HOST N SECONDS     open N idle connections at once and hold them; print "open N"
                                      once they are all connected, then "closed K of N" at the end
  hostile.py slowbody HOST N SECONDS  N POSTs announcing a 1 MB body, each sending a body byte every
                                      0.5 s; print "open K of N after S s", then "closed K of N" once
                                      the server closes them (or at 60 s)
  hostile.py burst HOST N PATH        N connections at once, each sending GET PATH (Connection: close)
                                      and reading the answer; print "answered K of N, 200 x K, ..."
  hostile.py download HOST PATH PAUSE GET PATH, wait PAUSE seconds before reading, then read it all;
                                      print "read N bytes"
  hostile.py upload HOST MIB STALL    POST MIB MiB with X-Stall: STALL (the app waits before reading);
                                      print the app's answer
"""
import resource
import select
import socket
import statistics
import sys
import time


def connect(host, port=80, timeout=10):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


def read_all(s, limit=1 << 20):
    data = b""
    try:
        while len(data) < limit:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def statuses(data):
    return [line.split(b" ")[1].decode() for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def send_and_read(host, hexbytes):
    """Sends the bytes, half-closes, and returns all that comes back."""
    s = connect(host)
    try:
        s.sendall(bytes.fromhex(hexbytes))
        s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_all(s)


def answer(host, hexbytes, every=False):
    found = statuses(send_and_read(host, hexbytes))
    if not found:
        print("closed")
    elif every:
        print("statuses " + ",".join(found))
    else:
        print(f"status {found[0]}")


def exchange(host, hexbytes):
    """Sends the bytes, half-closes, and prints every byte of the answer on one line (CR LF as ' | ')."""
    data = send_and_read(host, hexbytes)
    print(data.decode("latin-1").replace("\r\n", " | ").replace("\n", " | ") if data else "closed")


def cap(host, n):
    """Opens n idle connections, then one more; prints how the extra one and then the first fared."""
    held = [connect(host) for _ in range(n)]
    time.sleep(0.5)
    extra = connect(host)
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    outcomes = []
    for s in (extra, held[0]):
        try:
            s.sendall(request)
            found = statuses(read_all(s))
            outcomes.append(f"status {found[0]}" if found else "closed")
        except (BrokenPipeError, ConnectionResetError):
            outcomes.append("closed")
    print(f"extra {outcomes[0]}, first {outcomes[1]}")


def slowloris(host, n, seconds):
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 4000
    conns = [connect(host) for _ in range(n)]
    for c in conns:
        c.setblocking(False)
    started = time.monotonic()
    closed_at = {}
    sent = 0
    while time.monotonic() - started < seconds and len(closed_at) < n:
        for i, c in enumerate(conns):
            if i in closed_at:
                continue
            try:
                c.send(head[sent:sent + 1])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                closed_at[i] = time.monotonic() - started
                continue
            try:
                if c.recv(4096) == b"":
                    closed_at[i] = time.monotonic() - started
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                closed_at[i] = time.monotonic() - started
        sent = min(sent + 1, len(head) - 1)
        time.sleep(0.5)
    median = statistics.median(closed_at.values()) if closed_at else 0
    print(f"closed {len(closed_at)} of {n}, median {median:.1f} s")


def flood(host, n, seconds):
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, n + 256))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    conns = []
    pending = []
    for _ in range(n):
        s = socket.socket(family)
        s.setblocking(False)
        s.connect_ex((host, 80))
        pending.append(s)
    deadline = time.monotonic() + 30
    poller = select.poll()
    for s in pending:
        poller.register(s, select.POLLOUT)
    by_fd = {s.fileno(): s for s in pending}
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            s = by_fd.pop(fd, None)
            if s is None:
                continue
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                conns.append(s)
            else:
                s.close()
    print(f"open {len(conns)}", flush=True)
    time.sleep(seconds)
    closed = 0
    for s in conns:
        try:
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(f"closed {closed} of {len(conns)}")


def slowbody(host, n, seconds):
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
    conns = [connect(host) for _ in range(n)]
    for c in conns:
        c.sendall(head)
        c.setblocking(False)
    started = time.monotonic()
    closed = set()
    reported = False
    while len(closed) < n and time.monotonic() - started < 60:
        for i, c in enumerate(conns):
            if i in closed:
                continue
            try:
                if not reported:
                    c.send(b"a")
                if c.recv(4096) == b"":
                    closed.add(i)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                closed.add(i)
        if not reported and time.monotonic() - started >= seconds:
            print(f"open {n - len(closed)} of {n} after {seconds:g} s", flush=True)
            reported = True
        time.sleep(0.5)
    print(f"closed {len(closed)} of {n}")


def burst(host, n, path):
    resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, n + 256))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    poller = select.poll()
    state = {}
    started = time.monotonic()
    for _ in range(n):
        s = socket.socket(family)
        s.setblocking(False)
        s.connect_ex((host, 80))
        poller.register(s, select.POLLOUT)
        state[s.fileno()] = [s, b"", False]
    times, statuses_seen, errors = [], {}, 0
    while state and time.monotonic() - started < 120:
        for fd, events in poller.poll(500):
            s, data, sent = state[fd]
            try:
                if not sent:
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        raise ConnectionError
                    s.sendall(request)
                    state[fd][2] = True
                    poller.modify(fd, select.POLLIN)
                    continue
                chunk = s.recv(65536)
                if chunk:
                    state[fd][1] = data + chunk
                    continue
                status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.") else "none"
                statuses_seen[status] = statuses_seen.get(status, 0) + 1
                times.append(time.monotonic() - started)
            except (OSError, ConnectionError):
                errors += 1
            poller.unregister(fd)
            del state[fd]
            s.close()
    answered = sum(statuses_seen.values())
    counts = ", ".join(f"{k} x {v}" for k, v in sorted(statuses_seen.items()))
    slowest = max(times) if times else 0
    print(f"answered {answered} of {n}, {counts}, {errors} errors, {len(state)} unanswered, "
          f"median {statistics.median(times) if times else 0:.1f} s, last {slowest:.1f} s")


def download(host, path, pause):
    s = connect(host, timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    time.sleep(pause)
    total = 0
    head = b""
    while True:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        if total == 0 and b"\r\n\r\n" not in head:
            head += chunk
            if b"\r\n\r\n" in head:
                total = len(head.split(b"\r\n\r\n", 1)[1])
            continue
        total += len(chunk)
    print(f"read {total} bytes")


def upload(host, mib, stall):
    s = connect(host, timeout=60)
    size = mib << 20
    s.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nX-Stall: {stall}\r\n"
              f"Connection: close\r\n\r\n".encode())
    block = b"u" * (1 << 20)
    for _ in range(mib):
        s.sendall(block)
    data = read_all(s)
    print(data.split(b"\r\n\r\n", 1)[-1].decode().strip() or "closed")


def stall(host, hexbytes, seconds):
    """Sends the bytes and then nothing (no half-close): prints how long until the proxy closed,
    with the statuses it answered, or that it was still open after `seconds`."""
    s = connect(host, timeout=seconds)
    s.sendall(bytes.fromhex(hexbytes))
    start = time.monotonic()
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                print(f"closed after {time.monotonic() - start:.1f} s, statuses {','.join(statuses(data))}")
                return
            data += chunk
    except socket.timeout:
        print(f"open after {seconds:.0f} s, statuses {','.join(statuses(data))}")
    except ConnectionResetError:
        print(f"reset after {time.monotonic() - start:.1f} s, statuses {','.join(statuses(data))}")


if __name__ == "__main__":
    case, host = sys.argv[1], sys.argv[2]
    if case == "answer":
        answer(host, sys.argv[3])
    elif case == "responses":
        answer(host, sys.argv[3], every=True)
    elif case == "exchange":
        exchange(host, sys.argv[3])
    elif case == "cap":
        cap(host, int(sys.argv[3]))
    elif case == "slowloris":
        slowloris(host, int(sys.argv[3]), float(sys.argv[4]))
    elif case == "flood":
        flood(host, int(sys.argv[3]), float(sys.argv[4]))
    elif case == "slowbody":
        slowbody(host, int(sys.argv[3]), float(sys.argv[4]))
    elif case == "burst":
        burst(host, int(sys.argv[3]), sys.argv[4])
    elif case == "download":
        download(host, sys.argv[3], float(sys.argv[4]))
    elif case == "stall":
        stall(host, sys.argv[3], float(sys.argv[4]))
    elif case == "upload":
        upload(host, int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit(f"unknown case {case}")
