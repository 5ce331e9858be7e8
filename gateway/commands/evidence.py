"""`gateway trace evidence` and `gateway trace check-evidence`: one transfer's evidence, checked offline.

The evidence file (JSON) holds the transfer id, the log's verifier key as the gateway knew it, and a
C2SP tlog-proof of the transfer's record against a signed checkpoint: the newest one the witnesses
cosigned when it covers the record (its cosignature lines ride in the checkpoint note), else the log's
newest. Whoever holds the log's public key (and the witnesses') checks it with no access to the log.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.trace.audit import (
    WITNESSED_FILE,
    WitnessPolicy,
    check_inclusion_proof,
    format_inclusion_proof,
    iter_entries,
    newest_checkpoint,
)
from gateway.trace.merkle import ProofError, inclusion_proof, leaf_hash, verify_inclusion
from gateway.trace.note import NoteError, Verifier, open_checkpoint, parse_vkey
from gateway.trace.tiles import TileError, tail_reader

FORMAT = "gateway-evidence/v1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evidence", help="one transfer's record, inclusion proof and signed (cosigned) checkpoint "
                                        "in one file, for offline checking")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("transfer_id")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--pubkey", type=Path, required=True, help="the log's verifier key file")
    p.set_defaults(func=_evidence)

    p = sub.add_parser("check-evidence", help="verify an evidence file offline; exit 1 when it does not hold")
    p.add_argument("evidence", type=Path)
    p.add_argument("--pubkey", type=Path, required=True, help="the log's verifier key file (obtained out of band)")
    p.add_argument("--witness", type=Path, action="append", default=[], metavar="KEY",
                   help="require this witness's cosignature (repeatable)")
    p.set_defaults(func=_check)


def _vkey(path: Path) -> Verifier:
    return parse_vkey(path.read_text().strip().splitlines()[0])


def _evidence(args: argparse.Namespace) -> int:
    try:
        verifier = _vkey(args.pubkey)
        note, checkpoint = newest_checkpoint(args.directory, verifier)
    except (OSError, NoteError) as e:
        print(f"gateway trace: {e}", file=sys.stderr)
        return 2
    found = None
    for index, entry in iter_entries(args.directory, checkpoint.size):
        try:
            if json.loads(entry).get("id") == args.transfer_id:
                found = (index, entry)
        except ValueError:
            continue
    if found is None:
        print(f"gateway trace: transfer {args.transfer_id} is not in the log ({checkpoint.size} records)",
              file=sys.stderr)
        return 1
    index, entry = found
    try:  # the witnesses' view, when it already covers the record
        witnessed = open_checkpoint((args.directory / WITNESSED_FILE).read_bytes(), verifier)
        if witnessed[1].size > index:
            note, checkpoint = witnessed
    except (OSError, NoteError):
        pass
    try:
        reader = tail_reader(args.directory, checkpoint.size)
        proof = inclusion_proof(reader.node_hash, index, checkpoint.size)
        verify_inclusion(index, checkpoint.size, leaf_hash(entry), proof, checkpoint.root)
    except (ProofError, TileError) as e:
        print(f"TAMPERED: cannot prove record {index}: {e} (run 'gateway trace verify')")
        return 1
    text = format_inclusion_proof(index, entry, proof, note.render().encode())
    args.output.write_text(json.dumps({"format": FORMAT, "transfer_id": args.transfer_id,
                                       "log_key": verifier.vkey(), "proof": text}, ensure_ascii=False, indent=2))
    print(f"evidence of transfer {args.transfer_id} (record {index}, checkpoint {checkpoint.size}, "
          f"{len(note.signatures) - 1} cosignature(s)) written to {args.output}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        verifier = _vkey(args.pubkey)
        witnesses = [_vkey(path) for path in args.witness]
        bundle = json.loads(args.evidence.read_text())
    except (OSError, ValueError, NoteError) as e:
        print(f"gateway trace: {e}", file=sys.stderr)
        return 2
    try:
        if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
            raise ProofError(f"not a {FORMAT} file")
        policy = WitnessPolicy(witnesses, len(witnesses)) if witnesses else None
        index, record, checkpoint = check_inclusion_proof(bundle["proof"], verifier, policy)
        if record.get("id") != bundle.get("transfer_id"):
            raise ProofError(f"the record proven is transfer {record.get('id')}, not {bundle.get('transfer_id')}")
    except (ProofError, NoteError, ValueError, KeyError, TypeError) as e:
        print(f"INVALID: {e}")
        return 1
    print(json.dumps({"valid": True, "transfer_id": bundle["transfer_id"], "index": index,
                      "tree_size": checkpoint.size, "log": checkpoint.origin, "record": record}, ensure_ascii=False))
    return 0
