#!/usr/bin/env python3
"""Send N TCP SYNs with spoofed source addresses out of an interface (test traffic only).

Usage: synflood.py IFACE SRC_MAC DST_MAC DST_IP DST_PORT N
Sources are 198.18.128.0/17 addresses with random ports (seeded: reproducible); frames are
built by hand (Ethernet + IPv4 + TCP SYN with valid checksums) and sent on an AF_PACKET socket.
"""

import random
import socket
import struct
import sys


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def main() -> int:
    iface, src_mac, dst_mac, dst_ip, dst_port, n = sys.argv[1:7]
    dst = socket.inet_aton(dst_ip)
    rng = random.Random(7)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    eth = mac(dst_mac) + mac(src_mac) + b"\x08\x00"
    for _ in range(int(n)):
        src = socket.inet_aton("198.18.%d.%d" % (rng.randint(128, 255), rng.randint(1, 254)))
        sport = rng.randint(1024, 65535)
        seq = rng.getrandbits(32)
        tcp = struct.pack("!HHIIBBHHH", sport, int(dst_port), seq, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
        tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        s.send(eth + ip + tcp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
