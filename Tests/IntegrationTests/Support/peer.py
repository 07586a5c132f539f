#!/usr/bin/env python3
"""Test peer for le-redirect's namespace tests.

  peer.py serve PORT TAG     listen on [::]:PORT (IPv4 and IPv6); answer every connection with
                             "TAG <client-address>\n" and close. Runs until killed.
  peer.py get HOST PORT [SOURCE-PORT [SOURCE-ADDRESS|- [TIMEOUT]]]
                             connect (from SOURCE-PORT, 0 for any, and SOURCE-ADDRESS if given),
                             print the line received; exit 1 on refusal, reset or timeout (3 s).
"""
import socket
import sys
import threading


def serve(port, tag):
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    # Transparent (IPV6_TRANSPARENT, 75): the stand-in for an external proxy gets the connections
    # le-redirect steers to it (tproxy hands them only to such a listener); harmless elsewhere.
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, 75, 1)
    except PermissionError:
        pass  # an unprivileged user's listener: it cannot be transparent
    listener.bind(("::", port))
    listener.listen(128)
    print("listening", flush=True)

    def answer(conn, addr):
        with conn:
            host = addr[0]
            if host.startswith("::ffff:"):
                host = host[7:]
            conn.sendall(f"{tag} {host}\n".encode())

    while True:
        conn, addr = listener.accept()
        threading.Thread(target=answer, args=(conn, addr), daemon=True).start()


def get(host, port, source_port=0, source_address=None, timeout=3.0):
    try:
        source = None
        if source_port or source_address:
            source = (source_address or ("::" if ":" in host else "0.0.0.0"), source_port)
        with socket.create_connection((host, port), timeout=timeout, source_address=source) as conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(256)
                if not chunk:
                    break
                data += chunk
            print(data.decode().strip())
            return 0 if data else 1
    except OSError as error:
        print(f"error {error.__class__.__name__}: {error}")
        return 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        extra = sys.argv[4:]
        sys.exit(get(sys.argv[2], int(sys.argv[3]), int(extra[0]) if len(extra) > 0 else 0,
                     extra[1] if len(extra) > 1 and extra[1] != "-" else None,
                     float(extra[2]) if len(extra) > 2 else 3.0))
