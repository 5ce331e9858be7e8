"""The machines of one boundary and how their trace logs vouch for each other: the peers file.

Each machine's log is cosigned by the other machines' witnesses (C2SP tlog-witness, see
gateway.trace.witness), so no machine can later rewrite or fork its log without the others' signed
view of it disagreeing. The peers file lists every machine once; the same file serves the witness
service on each machine (`gateway cluster witness`), the auditor (`gateway trace verify --peers`,
`trace meter --peers`, `gateway usage report --peers`) and `gateway doctor --peers`:

    quorum: 1                 # optional: cosignatures of other machines' witnesses each log needs
                              # (default: every other machine's)
    peers:
      - name: gw1
        log_key: lab.gwc/gw1/trace+1a2b3c4d+AXs...     # STATE/trace-signing.pub: its name is the origin
        witness_key: gwc-gw1/witness+5e6f7a8b+BPq...   # STATE/witness.pub
        witness: http://198.18.20.21:7380              # this machine's witness (its submission prefix)
        management: http://198.18.20.21:9464           # its management listener (doctor --peers)
        log: gw1/trace                                 # where an auditor finds a copy of its log
                                                       # (relative to this file)

`gateway cluster peer -c CONFIG --witness URL` prints a machine's entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.trace.audit import VerifyReport, WitnessPolicy, verify_log
from gateway.trace.note import SIG_COSIGNATURE_V1, SIG_ED25519, NoteError, Verifier, parse_vkey
from gateway.yamlnodes import ErrorSink, Node, load_document

PEER_KEYS = {"name", "log_key", "witness_key", "witness", "management", "log"}


@dataclass(frozen=True)
class Peer:
    name: str
    log_key: Verifier  # the log's checkpoint key; its name is the log's origin
    witness_key: Verifier  # the machine's witness cosignature key
    witness: str  # the witness's submission prefix (http://HOST:PORT)
    management: str | None = None  # the management listener's URL
    log: Path | None = None  # a copy of the log, for auditing

    @property
    def origin(self) -> str:
        return self.log_key.name


@dataclass(frozen=True)
class Peers:
    source: Path
    peers: tuple[Peer, ...]
    quorum: int | None = None  # None: every other machine's witness

    def by_origin(self, origin: str) -> Peer | None:
        return next((peer for peer in self.peers if peer.origin == origin), None)

    def others(self, origin: str) -> list[Peer]:
        return [peer for peer in self.peers if peer.origin != origin]

    def logs(self) -> list[tuple[Peer, Path, WitnessPolicy]]:
        """Each machine with its log copy and the cross-witness policy it must meet (to sum them all);
        ValueError if a machine names no log."""
        missing = [peer.name for peer in self.peers if peer.log is None]
        if missing:
            raise ValueError(f"{self.source}: no log named for {', '.join(missing)}")
        return [(peer, peer.log, self.policy(peer.origin)) for peer in self.peers]

    def policy(self, origin: str) -> WitnessPolicy:
        """What a log of `origin` must carry: the other machines' cosignatures, `quorum` of them."""
        witnesses = [peer.witness_key for peer in self.others(origin)]
        return WitnessPolicy(witnesses, min(self.quorum or len(witnesses), len(witnesses)))


def load_peers(file: Path) -> Peers:
    """The peers file, checked: every error with its file, line and key (gateway.yamlnodes.ConfigError)."""
    sink = ErrorSink()
    root = load_document(file.resolve(), sink)
    top = root.mapping({"peers", "quorum"}, {"peers"}) if root is not None else None
    peers: list[Peer] = []
    quorum = None
    if top:
        quorum = top["quorum"].integer(minimum=1) if "quorum" in top else None
        for item in top["peers"].items() if "peers" in top else ():
            peer = _peer(item)
            if peer is None:
                continue
            for other in peers:
                if peer.name == other.name or peer.origin == other.origin:
                    item.error(f"machine {peer.name} ({peer.origin}) is listed twice")
                elif peer.witness_key.name == other.witness_key.name:
                    item.error(f"witness name {peer.witness_key.name} is also {other.name}'s")
            peers.append(peer)
        if "peers" in top and len(peers) < 2 and not sink.errors:
            top["peers"].error("a boundary of several machines lists at least two")
        if quorum is not None and peers and quorum > len(peers) - 1:
            top["quorum"].error(f"at most {len(peers) - 1}: each log has that many other machines' witnesses")
    sink.raise_if_any()
    return Peers(file.resolve(), tuple(peers), quorum)


def _peer(node: Node) -> Peer | None:
    errors_before = len(node.sink.errors)
    e = node.mapping(PEER_KEYS, {"name", "log_key", "witness_key", "witness"}) or {}
    name = e["name"].string() if "name" in e else None
    log_key = _key(e["log_key"], SIG_ED25519, "a log's checkpoint key") if "log_key" in e else None
    witness_key = _key(e["witness_key"], SIG_COSIGNATURE_V1, "a witness's cosignature key") \
        if "witness_key" in e else None
    witness = _url(e["witness"], ("http://",)) if "witness" in e else None  # what witness pushes speak
    management = _url(e["management"], ("http://", "https://")) if "management" in e else None
    log = e["log"].path_value() if "log" in e else None
    if len(node.sink.errors) > errors_before:
        return None
    return Peer(name, log_key, witness_key, witness, management, log)


def _key(node: Node, sig_type: int, what: str) -> Verifier | None:
    text = node.string()
    if text is None:
        return None
    try:
        verifier = parse_vkey(text)
    except NoteError as exc:
        node.error(f"not a verifier key: {exc}")
        return None
    if verifier.sig_type != sig_type:
        node.error(f"not {what} (signature type {verifier.sig_type:#04x})")
        return None
    return verifier


def _url(node: Node, schemes: tuple[str, ...]) -> str | None:
    text = node.string()
    if text is not None and not text.startswith(schemes):
        node.error(f"expected a {' or '.join(schemes)} URL")
        return None
    return text


@dataclass
class PeerVerdict:
    peer: Peer
    report: VerifyReport | None  # None: no log to check (problem says why)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report.ok


def verify_peers(peers: Peers) -> list[PeerVerdict]:
    """Every machine's log (its `log` copy) verified against its key and its cross-witness policy."""
    verdicts = []
    for peer in peers.peers:
        if peer.log is None:
            verdicts.append(PeerVerdict(peer, None, f"{peers.source}: {peer.name} names no log to check"))
        elif not peer.log.is_dir():
            verdicts.append(PeerVerdict(peer, None, f"{peer.log}: no such log directory"))
        else:
            verdicts.append(PeerVerdict(peer, verify_log(peer.log, peer.log_key, peers.policy(peer.origin))))
    return verdicts

