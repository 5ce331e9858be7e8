"""`gateway trace evidence` and `gateway trace check-evidence`: one transfer's evidence, checked offline
(their arguments are read by gateway.commands.trace, as its other subcommands').

The evidence file (JSON) holds the transfer id, the log's verifier key as the gateway knew it, and a
C2SP tlog-proof of the transfer's record (its completion, the last record of its id) against a signed
checkpoint: the newest one the witnesses cosigned when it covers the record (its cosignature lines ride
in the checkpoint note), else the log's newest. Whoever holds the log's public key (and the witnesses')
checks it with no access to the log.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gateway.trace.audit import (
    WITNESSED_FILE,
    WitnessPolicy,
    check_inclusion_proof,
    latest_record,
    newest_checkpoint,
    prove_inclusion,
)
from gateway.trace.merkle import ProofError
from gateway.trace.note import NoteError, Verifier, open_checkpoint
from gateway.trace.tiles import TileError

FORMAT = "gateway-evidence/v1"


def write(directory: Path, verifier: Verifier, transfer_id: str, output: Path) -> int:
    try:
        signed = newest_checkpoint(directory, verifier)
    except NoteError as e:
        print(f"TAMPERED: checkpoint: {e}")
        return 1
    found = latest_record(directory, signed[1].size, transfer_id)
    if found is None:
        print(f"gateway trace: transfer {transfer_id} is not in the log ({signed[1].size} records)", file=sys.stderr)
        return 1
    index, entry = found
    try:  # the witnesses' view, when it already covers the record
        witnessed = open_checkpoint((directory / WITNESSED_FILE).read_bytes(), verifier)
        if witnessed[1].size > index:
            signed = witnessed
    except (OSError, NoteError):
        pass
    try:
        text = prove_inclusion(directory, verifier, index, entry, signed)
    except (ProofError, TileError) as e:
        print(f"TAMPERED: cannot prove record {index}: {e} (run 'gateway trace verify')")
        return 1
    output.write_text(json.dumps({"format": FORMAT, "transfer_id": transfer_id, "log_key": verifier.vkey(),
                                  "proof": text}, ensure_ascii=False, indent=2))
    print(f"evidence of transfer {transfer_id} (record {index}, checkpoint {signed[1].size}, "
          f"{len(signed[0].signatures) - 1} cosignature(s)) written to {output}", file=sys.stderr)
    return 0


def check(path: Path, verifier: Verifier, policy: WitnessPolicy | None) -> int:
    try:
        bundle = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"gateway trace: {e}", file=sys.stderr)
        return 2
    try:
        if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
            raise ProofError(f"not a {FORMAT} file")
        index, record, checkpoint = check_inclusion_proof(bundle["proof"], verifier, policy)
        if record.get("id") != bundle.get("transfer_id"):
            raise ProofError(f"the record proven is transfer {record.get('id')}, not {bundle.get('transfer_id')}")
    except (ProofError, NoteError, ValueError, KeyError, TypeError) as e:
        print(f"INVALID: {e}")
        return 1
    print(json.dumps({"valid": True, "transfer_id": bundle["transfer_id"], "index": index,
                      "tree_size": checkpoint.size, "log": checkpoint.origin, "record": record}, ensure_ascii=False))
    return 0
