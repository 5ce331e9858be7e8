"""Data catalogue, open / conditional / contract classes, and double-authorised grants.

Plain library modules (no mitmproxy, no network), used by the `grant` pipeline stage
(gateway/filters/grant.py) and by the authorities' offline tools (gateway/commands/grant.py):

- catalog: datasets by upstream host, method and path, with their class, owner and fields;
- jose: signing keys, and JWS documents in the General JSON serialization (RFC 7515 §7.2.1), each
  signature with its own protected header naming `kid` and `role`, made and verified with joserfc;
- claims: the claims of grants, licences and revocation lists (unknown claims rejected);
- revocation: the bureau-signed revocation list as a worker sees it, re-read when it changes;
- quota: usage per grant and per consumer and dataset, in SQLite shared by the machine's workers;
- gate: the decision for one request, with its reason.
"""

# Why a conditional or contract transfer was refused: the reason types the pipeline records and counts.
REASONS = ("grant_missing", "grant_malformed", "grant_signature", "grant_signer_missing", "grant_expired",
           "grant_scope", "grant_revoked", "licence_missing", "licence_invalid", "grant_quota",
           "contract_raw", "revocation_stale", "uncatalogued", "path_not_normal",
           "grant_unfilterable", "grant_uncountable", "upgrade_refused", "method_override")
CLASSES = ("open", "conditional", "contract")
