# Runs inside the guest (python3 from the test image): each argument is a
# check, each output line is `check => result`; failures print `ERR <why>`.
import socket, struct, sys, time, urllib.request

def dns_udp(server, name):
    q = struct.pack(">HHHHHH", 0x4d47, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(4)
    s.sendto(q, (server, 53))
    r, _ = s.recvfrom(4096)
    rcode = r[3] & 0xF
    if rcode:
        return "ERR rcode %d" % rcode
    ancount = struct.unpack(">H", r[6:8])[0]
    if not ancount:
        return "ERR no answer"
    return socket.inet_ntoa(r[-4:])

def dns_tcp(server, name):
    q = struct.pack(">HHHHHH", 0x4d48, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.create_connection((server, 53), timeout=4)
    s.sendall(struct.pack(">H", len(q)) + q)
    def read(n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise EOFError()
            b += chunk
        return b
    r = read(struct.unpack(">H", read(2))[0])
    if r[:2] != q[:2]:
        return "ERR id"
    rcode = r[3] & 0xF
    if rcode:
        return "ERR rcode %d" % rcode
    if not struct.unpack(">H", r[6:8])[0]:
        return "ERR no answer"
    return socket.inet_ntoa(r[-4:])

QTYPES = {"A": 1, "PTR": 12, "AAAA": 28, "AXFR": 252, "ANY": 255}

def dns_raw(server, qtype, name):
    """A query of any type over UDP: `rcode N` or `answers N`."""
    q = struct.pack(">HHHHHH", 0x4d49, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    q += b"\0" + struct.pack(">HH", QTYPES[qtype], 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(4)
    s.sendto(q, (server, 53))
    r, _ = s.recvfrom(4096)
    if r[3] & 0xF:
        return "rcode %d" % (r[3] & 0xF)
    return "answers %d" % struct.unpack(">H", r[6:8])[0]

def read_response(f):
    """One HTTP/1.1 response with a Content-Length from a file object."""
    status = f.readline()
    if not status:
        raise EOFError()
    length = 0
    while True:
        line = f.readline()
        if not line:
            raise EOFError()
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode().partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    return f.read(length)

def keepalive(ip, first, second):
    """Two requests on one connection: how many were answered."""
    s = socket.create_connection((ip, 80), timeout=5)
    f = s.makefile("rb")
    n = 0
    for host in (first, second):
        try:
            s.sendall(("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).encode())
            read_response(f)
            n += 1
        except (OSError, EOFError):
            break
    return "responses %d" % n

def many_headers(ip, host, count):
    """A request whose Host comes after `count` other headers."""
    s = socket.create_connection((ip, 80), timeout=5)
    pad = "".join("X-Pad-%d: %d\r\n" % (i, i) for i in range(int(count)))
    s.sendall(("GET / HTTP/1.1\r\n%sHost: %s\r\nConnection: close\r\n\r\n" % (pad, host)).encode())
    return read_response(s.makefile("rb")).decode()

def client_hello(sni, ech):
    name = sni.encode()
    exts = struct.pack(">HHHBH", 0, len(name) + 5, len(name) + 3, 0, len(name)) + name
    if ech:
        # encrypted_client_hello (outer): its contents do not matter here.
        exts += struct.pack(">HH", 0xFE0D, 8) + bytes(8)
    body = b"\x03\x03" + bytes(32) + b"\x00" + struct.pack(">HH", 2, 0x1301) + b"\x01\x00"
    body += struct.pack(">H", len(exts)) + exts
    return b"\x01" + struct.pack(">I", len(body))[1:] + body

def tls(ip, port, sni, mode):
    """Send a ClientHello (in one record, split over two, or with ECH);
    the server answers `hello` to anything that reaches it."""
    hs = client_hello(sni, mode == "ech")
    parts = [hs[:9], hs[9:]] if mode == "split" else [hs]
    s = socket.create_connection((ip, int(port)), timeout=5)
    for p in parts:
        s.sendall(b"\x16\x03\x01" + struct.pack(">H", len(p)) + p)
        time.sleep(0.2)
    got = s.recv(100)
    if not got:
        raise EOFError()
    return got.decode().strip()

def udp(ip, port):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(b"ping", (ip, int(port)))
    return s.recvfrom(100)[0].decode()

def ns_flood(iface, count):
    """Neighbour solicitations for the gateway's address from `count`
    made-up link-local sources (guest root, a raw socket): how many were
    sent."""
    import os, random
    def csum(data):
        if len(data) % 2:
            data += b"\0"
        s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return ~s & 0xFFFF
    target = socket.inet_pton(socket.AF_INET6, "fd6d:6967:7261:6e74::2")
    dst = socket.inet_pton(socket.AF_INET6, "ff02::1:ff00:2")
    mac = open("/sys/class/net/%s/address" % iface).read().strip()
    lladdr = bytes(int(x, 16) for x in mac.split(":"))
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    scope = socket.if_nametoindex(iface)
    sent = 0
    for _ in range(int(count)):
        src = b"\xfe\x80" + bytes(6) + os.urandom(8)
        body = struct.pack("!BBHI", 135, 0, 0, 0) + target + bytes([1, 1]) + lladdr
        pseudo = src + dst + struct.pack("!I3xB", len(body), 58)
        body = body[:2] + struct.pack("!H", csum(pseudo + body)) + body[4:]
        hdr = struct.pack("!IHBB", 6 << 28, len(body), 58, 255) + src + dst
        s.sendto(hdr + body, ("ff02::1:ff00:2", 0, 0, scope))
        sent += 1
    return "sent %d" % sent

def arp_flood(iface, count):
    """ARP requests for the gateway's address from `count` made-up sender
    addresses (guest root, a packet socket): how many were sent."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    mac = bytes(int(x, 16) for x in open("/sys/class/net/%s/address" % iface).read().strip().split(":"))
    sent = 0
    for i in range(int(count)):
        sender = bytes([45, 7, (i >> 8) & 255, i & 255])
        arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + sender + bytes(6) + bytes([10, 0, 2, 2])
        s.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
        sent += 1
    return "sent %d" % sent

def check(c):
    kind, _, arg = c.partition(":")
    if kind == "dns":
        return socket.gethostbyname(arg)
    if kind == "udpdns":
        server, name = arg.rsplit(":", 1)
        return dns_udp(server, name)
    if kind == "tcpdns":
        server, name = arg.rsplit(":", 1)
        return dns_tcp(server, name)
    if kind == "http":
        return urllib.request.urlopen(arg, timeout=6).read().decode()
    if kind == "httphost":
        ip, host = arg.split(":")
        req = urllib.request.Request("http://%s/" % ip, headers={"Host": host})
        return urllib.request.urlopen(req, timeout=6).read().decode()
    if kind == "tcp":
        ip, port = arg.rsplit(":", 1)
        socket.create_connection((ip, int(port)), timeout=5).close()
        return "open"
    if kind == "dnsq":
        server, qtype, name = arg.split(":")
        return dns_raw(server, qtype, name)
    if kind == "tcpfrom":
        src, ip, port = arg.split(":")
        socket.create_connection((ip, int(port)), timeout=5, source_address=(src, 0)).close()
        return "open"
    if kind == "say6":
        # From a chosen source, a line sent and the first answer read: a
        # proxied connection the policy refuses is reset after its
        # handshake, so only an answer proves it got through.
        src, ip, port = arg.split(",")
        s = socket.create_connection((ip, int(port)), timeout=5, source_address=(src, 0))
        s.sendall(b"hi\n")
        got = s.recv(100)
        if not got:
            raise EOFError()
        return got.decode().strip()
    if kind == "keepalive":
        return keepalive(*arg.split(":"))
    if kind == "manyheaders":
        return many_headers(*arg.split(":"))
    if kind == "tls":
        return tls(*arg.split(":"))
    if kind == "udp":
        return udp(*arg.split(":"))
    if kind == "udp6":
        ip, port = arg.rsplit(":", 1)
        return udp(ip, port)
    if kind == "arpflood":
        return arp_flood(*arg.split(","))
    if kind == "nsflood":
        return ns_flood(*arg.split(","))
    if kind == "dns6":
        return socket.getaddrinfo(arg, 80, socket.AF_INET6)[0][4][0]
    return "ERR unknown check"

for c in sys.argv[1:]:
    try:
        r = check(c)
    except Exception as e:
        r = "ERR %s" % type(e).__name__
    print("%s => %s" % (c, r), flush=True)
