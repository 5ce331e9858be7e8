"""Tamper-evident trace log: RFC 6962 Merkle tree in the C2SP tlog-tiles layout, with C2SP signed
checkpoints, group-committed durable appends, verification, proofs and witness cosigning.
Plain library: no mitmproxy, no network (except the witness module's explicit HTTP use)."""

from gateway.trace.hashing import BodyHasher, body_hasher
from gateway.trace.log import TraceLog, encode_record
from gateway.trace.store import TraceError
from gateway.trace.witness import WitnessConfig

__all__ = ["BodyHasher", "TraceError", "TraceLog", "WitnessConfig", "body_hasher", "encode_record"]
