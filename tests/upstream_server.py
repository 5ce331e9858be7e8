"""A real upstream HTTP server for the tests, run as its own process (also inside a namespace).

Every request it receives is appended to --log as one JSON line (method, path, body length and
SHA-256), so a test can prove what did or did not arrive. Endpoints:
  /echo            answers with the request body
  /ids?n=N         a JSON document holding N resident ID numbers (sensitive, for response-side tests)
  /card            a text holding one bank card number (for response-side redaction); ?hidden=1
                   adds it once more as base64
  /text?body=S     answers S as text/plain
  /api/residents*  a JSON array of 4 records (name, age, district, note), as a catalogued dataset serves;
                   ?encoding=gzip sends it gzip-coded; ?shape=NAME sends them in another envelope
                   holding a resident's name and mobile number beside them (RESIDENT_SHAPES); ?partial=1
                   answers 206 with a Content-Range
  /sink            reads the body in chunks (any size, chunked too) and answers its length and SHA-256
  /big?bytes=N&ids=K   N bytes of filler text ending in K resident ID numbers, sent in chunks
  /random?bytes=N  N random bytes (the same for every N: random.Random(0)), application/octet-stream
  ?framing=close or chunked (for /card, /big, /random) sends the answer with no Content-Length,
                   ending when the connection closes, or chunked
  anything else    200 "ok"
Any of them with ?delay=S answers S seconds after logging the request (transfers in flight for a while),
and with ?reason=TEXT (for /text and the others sent whole) has TEXT as its status line's reason phrase
(?reason=id: "OK" and a resident ID number, which the request itself then does not carry).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import random
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# Valid GB 11643 numbers (region 110105, check character computed), enough for bulk-export tests.
ID_NUMBERS = ["11010519491231002X", "110105194912310038", "110105199001011232", "440304198512152527",
              "320102198003153416", "51010419781224221X", "330106199203065017", "420106198507220036",
              "210102197605120013", "350102198811261226", "610103199504181212", "370102198302100014"]

BANK_CARD = "6228480012345671"  # Luhn-valid, UnionPay prefix
HEAD_FIELDS = {"card": ("X-Card", BANK_CARD), "id": ("X-Holder", ID_NUMBERS[0]), "plain": ("X-Other", "fine"),
               "resident": ("X-Resident-Name", "zhangsan-13912345678")}
_XML_RECORDS = "".join(f'<r age="{70 + i}"><name>张三</name><district>碧江区</district></r>' for i in range(2))
# Residents' records with personal data beside them (content type, body), as a careless upstream sends them.
RESIDENT_SHAPES = {
    "wrapped": ("application/json", json.dumps({"data": [{"name": "张三", "age": 70, "district": "碧江区"}],
                                                "note": "张三 13912345678 住址碧江区", "total": 1}, ensure_ascii=False)),
    "xml-attr": ("application/xml", f'<rs meta="张三 13912345678">{_XML_RECORDS}</rs>'),
    "xml-text": ("application/xml", f"<rs>张三 13912345678{_XML_RECORDS}</rs>"),
    "xml-total": ("application/xml", f'<rs><total>张三 13912345678 age 71</total><items note="张三">{_XML_RECORDS}'
                                     "</items></rs>"),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_lock = threading.Lock()

    def _chunks(self):
        """The request body as it arrives, Content-Length or chunked framing."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while size := int(self.rfile.readline().split(b";")[0], 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return
        remaining = int(self.headers.get("content-length") or 0)
        while remaining:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                raise ConnectionError("body cut short")
            remaining -= len(chunk)
            yield chunk

    def _handle(self) -> None:
        url = urlsplit(self.path)
        digest, size, body = hashlib.sha256(), 0, bytearray()
        for chunk in self._chunks():  # an upload cut short raises here: it is never logged as received
            digest.update(chunk)
            size += len(chunk)
            if url.path != "/sink":
                body += chunk
        with self.log_lock, open(self.server.log_path, "a") as log:
            data_headers = sorted(name for name in self.headers if name.lower().startswith("x-data-"))
            log.write(json.dumps({"method": self.command, "path": self.path, "host": self.headers.get("host"), "bytes": size,
                                  "data_headers": data_headers,
                                  "sha256": digest.hexdigest()}) + "\n")
        query = parse_qs(url.query)
        if "delay" in query:
            time.sleep(float(query["delay"][0]))
        # ?head=card, id or plain (repeatable) adds a field to the answer's head (the request stays clean).
        extra_headers = [HEAD_FIELDS[name] for name in query.get("head", [])]
        framing = query.get("framing", ["length"])[0]
        if url.path == "/big":
            ids = " ".join(ID_NUMBERS[:int(query.get("ids", ["0"])[0])])
            return self._big(int(query["bytes"][0]), f" {ids}\n" if ids else "", extra_headers, framing)
        if url.path == "/random":
            size = int(query["bytes"][0])
            return self._send("application/octet-stream", random_bytes(size), [], framing, size)
        content_type = "text/plain; charset=utf-8"
        status = 200
        if url.path == "/sink":
            answer = json.dumps({"bytes": size, "sha256": digest.hexdigest()}).encode()
            content_type = "application/json"
        elif url.path == "/echo":
            answer = bytes(body)
            content_type = self.headers.get("content-type", "application/octet-stream")
        elif url.path == "/ids":
            count = int(query.get("n", ["1"])[0])
            rows = [{"name": f"person {i}", "sfzh": ID_NUMBERS[i % len(ID_NUMBERS)]} for i in range(count)]
            answer = json.dumps({"rows": rows}).encode()
            content_type = "application/json"
        elif url.path == "/card":
            pad = "filler " * (int(query.get("pad", ["0"])[0]) // 7)  # pads the answer past inline scan sizes
            answer = f"{pad}card {BANK_CARD} ok".encode()
            if "hidden" in query:  # the number once more, as base64 (which no redaction can rewrite)
                answer += b" " + base64.b64encode(f"card {BANK_CARD}".encode())
        elif url.path == "/text":
            answer = query.get("body", [""])[0].encode()
        elif url.path.startswith("/api/residents"):
            answer = json.dumps([{"name": "张三", "age": 70 + i, "district": "碧江区", "note": "n"} for i in range(4)],
                                ensure_ascii=False).encode()
            content_type = "application/json"
            if "shape" in query:
                content_type, text = RESIDENT_SHAPES[query["shape"][0]]
                answer = text.encode()
            if "partial" in query:
                status = 206
                extra_headers.append(("Content-Range", f"bytes 0-{len(answer) - 1}/{len(answer) + 100}"))
            if query.get("encoding") == ["gzip"]:
                answer = gzip.compress(answer)
                extra_headers.append(("Content-Encoding", "gzip"))
        else:
            answer = b"ok"
        reason = query.get("reason", [None])[0]
        self._send(content_type, [answer], extra_headers, framing, len(answer),
                   f"OK {ID_NUMBERS[0]}" if reason == "id" else reason, status)

    def _send(self, content_type: str, pieces, extra_headers: list[tuple[str, str]], framing: str,
              length: int | None = None, reason: str | None = None, status: int = 200) -> None:
        self.send_response(status, reason)
        self.send_header("Content-Type", content_type)
        if framing == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        elif framing == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        for piece in filter(None, pieces):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
        if framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _big(self, size: int, tail: str, extra_headers: list[tuple[str, str]], framing: str) -> None:
        self._send("text/plain; charset=utf-8", filler(size, tail.encode()), extra_headers, framing, size)

    do_GET = do_POST = do_PUT = _handle


def filler(size: int, tail: bytes):
    line = b"filler text of a large export, nothing sensitive here\n"
    remaining = size - len(tail)
    block = line * (65536 // len(line))
    while remaining > 0:
        piece = block[:remaining]
        yield piece
        remaining -= len(piece)
    if tail:
        yield tail


def random_bytes(size: int):
    """`size` random bytes, the same every time (tests compute them to compare)."""
    rng = random.Random(0)
    while size > 0:
        piece = rng.randbytes(min(size, 1 << 20))
        yield piece
        size -= len(piece)

    def log_message(self, format, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", default="127.0.0.2")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log", required=True)
    parser.add_argument("--cert", help="serve HTTPS with this certificate (PEM) ...")
    parser.add_argument("--key", help="... and this key")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.log_path = args.log
    if args.cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
