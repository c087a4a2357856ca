# Runs inside the guest (python3 from the test image): each argument is a
# check, each output line is `check => result`; failures print `ERR <why>`.
import socket, struct, sys, urllib.request

def dns_udp(server, name):
    q = struct.pack(">HHHHHH", 0x4d47, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        q += bytes([len(part)]) + part.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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

def check(c):
    kind, _, arg = c.partition(":")
    if kind == "dns":
        return socket.gethostbyname(arg)
    if kind == "udpdns":
        server, name = arg.split(":")
        return dns_udp(server, name)
    if kind == "tcpdns":
        server, name = arg.split(":")
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
    return "ERR unknown check"

for c in sys.argv[1:]:
    try:
        r = check(c)
    except Exception as e:
        r = "ERR %s" % type(e).__name__
    print("%s => %s" % (c, r), flush=True)
