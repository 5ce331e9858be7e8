"""C2SP tlog-witness: a witness that cosigns logs' checkpoints (`gateway trace witness`) and the
log-side push of a checkpoint to a witness (`gateway trace witness-push`).

The witness keeps, per log origin, the size and root of the latest checkpoint it cosigned, and only
cosigns a checkpoint that the log proves (RFC 6962 consistency proof) extends it: a rollback or a
split view (another history under the same key) is refused. Checking the old size and persisting
the new state happen under one lock, so concurrent requests cannot roll the state back.
"""

import base64
import hashlib
import http.client
import os
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from gateway.trace.audit import WITNESSED_FILE, newest_checkpoint
from gateway.trace.merkle import (
    HASH_SIZE,
    ProofError,
    consistency_proof,
    verify_consistency,
)
from gateway.trace.note import (
    Checkpoint,
    Note,
    NoteError,
    SignatureLine,
    Signer,
    Verifier,
    parse_checkpoint_body,
    parse_decimal,
    parse_note,
    parse_vkey,
    verify_signature,
)
from gateway.trace.tiles import tail_reader

MAX_PROOF_LINES = 63
MAX_BODY = 64 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"


class WitnessRefusal(Exception):
    def __init__(self, status: int, message: str, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else message + "\n"


class WitnessState:
    """Latest cosigned (size, root) per log origin, one small file per log, replaced atomically."""

    def __init__(self, directory: Path, logs: dict[str, Verifier], signer: Signer) -> None:
        self.directory = directory
        self.logs = logs
        self.signer = signer
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, origin: str) -> Path:
        return self.directory / hashlib.sha256(origin.encode()).hexdigest()

    def latest(self, origin: str) -> tuple[int, bytes | None]:
        path = self._path(origin)
        try:
            lines = path.read_text().split("\n")
        except FileNotFoundError:
            return 0, None
        size = parse_decimal(lines[1]) if len(lines) > 2 else None
        try:
            root = base64.b64decode(lines[2], validate=True) if size is not None else b""
        except ValueError:
            root = b""
        if len(root) != HASH_SIZE:  # fail closed: cosign nothing for this log until an operator looks
            raise WitnessRefusal(500, f"witness state {path.name} is unreadable")
        return size, root

    def _store(self, checkpoint: Checkpoint) -> None:
        path = self._path(checkpoint.origin)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{checkpoint.origin}\n{checkpoint.size}\n{base64.b64encode(checkpoint.root).decode()}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def add_checkpoint(self, body: bytes) -> str:
        """Handle an add-checkpoint request body; returns the cosignature line(s) or raises
        WitnessRefusal with the HTTP status the spec prescribes."""
        old_size, proof, note, checkpoint = parse_request(body)
        verifier = self.logs.get(checkpoint.origin)
        if verifier is None:
            raise WitnessRefusal(404, f"unknown log {checkpoint.origin!r}")
        try:
            verify_signature(note, verifier)
        except NoteError as exc:
            raise WitnessRefusal(403, f"checkpoint signature: {exc}") from None
        if old_size > checkpoint.size:
            raise WitnessRefusal(400, f"old size {old_size} is larger than the checkpoint size {checkpoint.size}")
        with self._lock:
            known_size, known_root = self.latest(checkpoint.origin)
            if old_size != known_size:
                raise WitnessRefusal(409, f"old size {old_size} is not the latest cosigned size {known_size}",
                                     f"{known_size}\n")
            if old_size == checkpoint.size:
                if proof:
                    raise WitnessRefusal(422, "a proof between equal sizes must be empty")
                if known_root is not None and known_root != checkpoint.root:
                    raise WitnessRefusal(409, "same size as the cosigned checkpoint but a different root "
                                              "(split view)", f"{known_size}\n")
            elif old_size == 0:
                if proof:
                    raise WitnessRefusal(422, "a proof from size 0 must be empty")
            else:
                try:
                    verify_consistency(old_size, checkpoint.size, known_root, checkpoint.root, proof)
                except ProofError as exc:
                    raise WitnessRefusal(422, f"consistency proof: {exc} (rollback or split view)") from None
            self._store(checkpoint)
        return self.signer.cosign(note.text)


def parse_request(body: bytes) -> tuple[int, list[bytes], Note, Checkpoint]:
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise WitnessRefusal(400, "request is not UTF-8") from None
    head, sep, note_text = text.partition("\n\n")
    lines = head.split("\n")
    if not sep or not lines[0].startswith("old "):
        raise WitnessRefusal(400, "request must start with an old size line and a blank line")
    old_size = parse_decimal(lines[0][4:])
    if old_size is None:
        raise WitnessRefusal(400, f"old size {lines[0][4:]!r} is not a decimal number")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise WitnessRefusal(400, f"more than {MAX_PROOF_LINES} proof lines")
    try:
        proof = [base64.b64decode(line, validate=True) for line in lines[1:]]
        note = parse_note(note_text)
        checkpoint = parse_checkpoint_body(note.text)
    except (ValueError, NoteError) as exc:
        raise WitnessRefusal(400, f"malformed request: {exc}") from None
    return old_size, proof, note, checkpoint


def serve(listen: tuple[str, int], state: WitnessState) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/").rsplit("/", 1)[-1] != "add-checkpoint":
                return self._answer(404, "not found\n")
            length = parse_decimal(self.headers.get("Content-Length") or "0")
            if length is None:
                self.close_connection = True  # the body's end is unknown
                return self._answer(400, "Content-Length is not a decimal number\n")
            if length > MAX_BODY:
                return self._answer(400, "request too large\n")
            body = self.rfile.read(length)
            try:
                self._answer(200, state.add_checkpoint(body))
            except WitnessRefusal as refusal:
                kind = SIZE_CONTENT_TYPE if refusal.status == 409 else "text/plain; charset=utf-8"
                self._answer(refusal.status, refusal.body, kind)

        def _answer(self, status: int, text: str, kind: str = "text/plain; charset=utf-8") -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            pass

    return ThreadingHTTPServer(listen, Handler)


@dataclass(frozen=True)
class WitnessConfig:
    url: str  # submission prefix, e.g. http://127.0.0.1:7380
    verifier_key: str  # the witness's cosignature verifier key


class PushError(Exception):
    pass


def _post(url: str, body: bytes) -> tuple[int, str]:
    parts = urllib.parse.urlsplit(url.rstrip("/") + "/add-checkpoint")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    try:
        conn.request("POST", parts.path, body, {"Content-Type": "text/plain"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def push_checkpoint(directory: Path, log_verifier: Verifier, witness: WitnessConfig,
                    note: Note | None = None) -> str:
    """Push the log's newest checkpoint (or `note`) to a witness with a consistency proof from the
    size it last cosigned, store the cosignature beside the checkpoint (WITNESSED_FILE) and return
    it. Raises PushError when the witness refuses."""
    witness_verifier = parse_vkey(witness.verifier_key)
    if note is None:
        note, checkpoint = newest_checkpoint(directory, log_verifier)
    else:
        checkpoint = parse_checkpoint_body(note.text)
    state_file = directory / f"witness-{witness_verifier.name.replace('/', '_')}.size"
    try:
        old = int(state_file.read_text())
    except (FileNotFoundError, ValueError):
        old = 0
    for _ in range(2):  # a 409 tells the size the witness holds; retry once from it
        if old > checkpoint.size:
            raise PushError(f"witness {witness_verifier.name} cosigned size {old}, beyond this log's {checkpoint.size}")
        proof = consistency_proof(tail_reader(directory, checkpoint.size).node_hash, old, checkpoint.size) \
            if 0 < old < checkpoint.size else []  # reading the tail costs: only when there is something to prove
        body = (f"old {old}\n" + "".join(base64.b64encode(p).decode() + "\n" for p in proof) + "\n"
                + note.render()).encode()
        status, text = _post(witness.url, body)
        if status == 409 and text.strip().isdigit() and int(text) != old:
            old = int(text)
            continue
        break
    if status != 200:
        raise PushError(f"witness {witness_verifier.name} refused size {checkpoint.size}: {status} {text.strip()}")
    lines = [line + "\n" for line in text.splitlines() if line]
    cosigned = parse_note(note.render() + "".join(lines))
    verify_signature(cosigned, witness_verifier)
    _store_cosignature(directory, note, lines)
    state_file.write_text(f"{checkpoint.size}\n")
    return "".join(lines)


def _store_cosignature(directory: Path, note: Note, lines: list[str]) -> None:
    """Add cosignature lines to WITNESSED_FILE, keeping other witnesses' ones already there for the same
    checkpoint; a witness's newer cosignature (a checkpoint pushed again) replaces its older one."""
    path = directory / WITNESSED_FILE
    by_witness: dict[tuple[str, int], SignatureLine] = {}
    try:
        current = parse_note(path.read_bytes())
        if current.text == note.text:  # cosignatures beyond the log's own
            by_witness = {(s.name, s.key_id): s for s in current.signatures[len(note.signatures):]}
    except (FileNotFoundError, NoteError):
        pass
    for s in parse_note(note.render() + "".join(lines)).signatures[len(note.signatures):]:
        by_witness[(s.name, s.key_id)] = s
    merged = Note(note.text, note.signatures + list(by_witness.values())).render()
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(merged)
    os.replace(tmp, path)


def cosignature_times(directory: Path) -> dict[str, int]:
    """Witness name -> Unix time of its newest cosignature in the log's WITNESSED_FILE (written only by
    push_checkpoint, after checking each cosignature); empty when there is none. For monitoring: an
    auditor checks the cosignatures themselves (`gateway trace verify --witness`)."""
    try:
        note = parse_note((directory / WITNESSED_FILE).read_bytes())
    except (OSError, NoteError):
        return {}
    times: dict[str, int] = {}
    for sig in note.signatures[1:]:  # the first is the log's own signature
        if len(sig.signature) == 72:  # tlog-cosignature/v1: 8-byte time, then Ed25519
            times[sig.name] = max(times.get(sig.name, 0), int.from_bytes(sig.signature[:8], "big"))
    return times
