"""A DNS server for the tests that writes down every name it is asked for, one per line, and answers
each A query with one address (dnslib). Run inside a network namespace whose resolv.conf names it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class RecordingResolver(BaseResolver):
    def __init__(self, log: Path, address: str):
        self.log = log
        self.address = address

    def resolve(self, request, handler):
        name = str(request.q.qname)
        with self.log.open("a") as log:
            log.write(name + "\n")
        reply = request.reply()
        if request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.address), ttl=60))
        return reply


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--answer", default="127.0.0.2", help="the address every A query is answered with")
    args = parser.parse_args()
    args.log.touch()
    server = DNSServer(RecordingResolver(args.log, args.answer), address=args.bind, port=53,
                       logger=DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data"))
    server.start_thread()
    print("ready", flush=True)
    while server.isAlive():
        time.sleep(0.5)


if __name__ == "__main__":
    main()
