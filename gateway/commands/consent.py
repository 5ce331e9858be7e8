"""Data-subject consent, for the operator (and the platform's batch tool):

  gateway consent secret --out FILE                  a new registry secret (0600), shared with the platform
  gateway consent issue CONSENTS.jsonl --secret S --key PLATFORM.key -o BATCH   (the platform's side)
  gateway consent import BATCH ... [-c CONFIG]       verify and import signed batches
  gateway consent withdraw [CID ...] [--id ID [--consumer C] [--scenario S]] [-c CONFIG]
  gateway consent check ID --consumer C --scenario S [--dataset D] [-c CONFIG]   exit 0 when consented

(`gateway usage report`, the settlement from these consents' transfers, is gateway/commands/usage.py.)
Exit status: 0 done (check: consented), 1 refused (a forged or altered batch, no consent), 2 usage or
I/O errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import orjson

from gateway.authz.claims import utc
from gateway.authz.consent import ConsentError, ConsentRegistry, batch_claims, consent_row
from gateway.authz.jose import PLATFORM_ROLE, add_signature, draft, load_private_key
from gateway.authz.subject import SUBJECT_HASHES, SubjectHasher, generate_secret, load_secret, normal_id
from gateway.commands import Refused, Usage, configuration
from gateway.config.load import DEFAULT_CONFIG
from gateway.dlp.validators import check_id_card


def register(subparsers: argparse._SubParsersAction) -> None:
    consent = subparsers.add_parser("consent", help="data subjects' consents (数据主体授权): import, withdraw, check")
    sub = consent.add_subparsers(dest="consent_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("secret", help="a new subject-key secret (0600), to share with the data-subject platform")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=guard(_secret))

    p = sub.add_parser("issue", help="(the platform's tool) sign a batch from JSON lines holding clear 'id' numbers")
    p.add_argument("consents", type=Path, help="JSON lines: a consent with 'id' (the ID number) for 'subject'")
    p.add_argument("--secret", type=Path, required=True)
    p.add_argument("--subject-hash", choices=SUBJECT_HASHES, default=SUBJECT_HASHES[0])
    p.add_argument("--key", type=Path, required=True, help="the platform's private key file")
    p.add_argument("--batch", help="batch id (default: a new UUID)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=guard(_issue))

    p = sub.add_parser("import", help="verify signed batches and import them (each whole or not at all)")
    p.add_argument("batches", type=Path, nargs="+")
    _config_arg(p)
    p.set_defaults(func=guard(_import))

    p = sub.add_parser("withdraw", help="withdraw consents by id, or all of a subject's (for a consumer, scenario)")
    p.add_argument("cids", nargs="*", metavar="CID")
    p.add_argument("--id", dest="id_number", help="the subject's ID number (hashed, never stored); - reads it from "
                                                  "standard input, out of sight of ps and the shell's history")
    p.add_argument("--consumer")
    p.add_argument("--scenario")
    _config_arg(p)
    p.set_defaults(func=guard(_withdraw))

    p = sub.add_parser("check", help="whether an ID number's subject consented; exit 0 when so")
    p.add_argument("id_number", metavar="ID", help="the subject's ID number; - reads it from standard input, out of "
                                                  "sight of ps and the shell's history")
    p.add_argument("--consumer", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--dataset", help="a dataset the consent must cover (default: show every consent)")
    p.add_argument("--separate", action="store_true", help="separate consent (单独同意) needed")
    _config_arg(p)
    p.set_defaults(func=guard(_check))


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--frontend", metavar="NAME")


def guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Refused as e:
            print(f"gateway: REFUSED: {e}", file=sys.stderr)
            return 1
        except (Usage, OSError) as e:
            print(f"gateway: {e}", file=sys.stderr)
            return 2
    return run


def _config(args: argparse.Namespace):
    config = configuration(args)
    if config.authz is None or config.authz.consent is None:
        raise Usage(f"{config.source}: no authz.consent section")
    return config


def _registry(config) -> ConsentRegistry:
    return ConsentRegistry(config.authz.consent.registry_path(config.state_dir))


# ---- consents -----------------------------------------------------------------------------------


def _secret(args: argparse.Namespace) -> int:
    try:
        generate_secret(args.out)
    except FileExistsError:
        raise Usage(f"{args.out} exists: a secret is never overwritten") from None
    print(f"{args.out}: a new secret (0600); give the platform the same file, offline")
    return 0


def _issue(args: argparse.Namespace) -> int:
    try:
        hasher = SubjectHasher(load_secret(args.secret), args.subject_hash)
        key = load_private_key(args.key)
    except ValueError as e:
        raise Usage(str(e)) from None
    lines, invalid = [], []
    with args.consents.open("rb") as source:
        for number, line in enumerate(source, start=1):
            if not line.strip():
                continue
            try:
                consent = orjson.loads(line)
                number_text = normal_id(consent.pop("id"))
            except (orjson.JSONDecodeError, KeyError, AttributeError):
                raise Usage(f"{args.consents}: line {number}: expected an object with 'id'") from None
            if number_text is None:
                raise Usage(f"{args.consents}: line {number}: 'id' is not an ID number")
            # Signed all the same (a provider's records may hold the same mistyped number), but said: a
            # consent to a number no resident holds is most often a typing error.
            failed = [label for label, ok in check_id_card(number_text) if not ok] if len(number_text) == 18 else []
            if failed:
                invalid.append(f"line {number} ({failed[0]})")
            subject = hasher.key(number_text)
            consent["subject"] = subject.hex()
            line = orjson.dumps(consent) + b"\n"
            try:
                consent_row(line, number)  # signed only as the gateway will take it at import
            except ConsentError as e:
                raise Usage(f"{args.consents}: {e}") from None
            lines.append(line)
    body = b"".join(lines)
    claims = batch_claims(args.batch or str(uuid.uuid4()), int(time.time()), body, len(lines), hasher.key_check(),
                          hasher.algorithm)
    manifest = json.dumps(add_signature(draft(claims), key, PLATFORM_ROLE), separators=(",", ":")).encode()
    args.output.write_bytes(manifest + b"\n" + body)
    print(f"batch {claims['batch']}: {len(lines)} consents signed by {key.kid} in {args.output}")
    if invalid:
        print(f"warning: {len(invalid)} of them name no valid GB 11643 ID number, so each matches only records "
              f"holding that very number: {args.consents} {', '.join(invalid[:5])}"
              + (", ..." if len(invalid) > 5 else ""), file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    config = _config(args)
    settings = config.authz.consent
    registry = _registry(config)
    refused = []
    for path in args.batches:
        started = time.perf_counter()
        try:
            with path.open("rb") as stream:
                batch = registry.import_batch(stream, settings.platform, config.authz.algorithms,
                                              settings.hasher.key_check(), settings.hasher.algorithm)
        except ConsentError as e:
            refused.append(f"{path}: {e}")
            print(f"{path}: REFUSED, nothing imported: {e}", file=sys.stderr)
            continue
        print(f"{path}: batch {batch.batch} issued {utc(batch.iat)}: {batch.count} consents imported "
              f"in {time.perf_counter() - started:.1f} s")
    registry.close()
    if refused:
        raise Refused(f"{len(refused)} of {len(args.batches)} batch(es) refused")
    return 0


def _subject(config, id_number: str) -> bytes:
    """The subject key of an ID number given on the command line, or read from standard input for `-`."""
    given = sys.stdin.readline().strip() if id_number == "-" else id_number
    subject = config.authz.consent.hasher.key(given)
    if subject is None:
        raise Usage("standard input holds no ID number" if id_number == "-" else f"'{given}' is not an ID number")
    return subject


def _withdraw(args: argparse.Namespace) -> int:
    config = _config(args)
    if bool(args.cids) == bool(args.id_number):
        raise Usage("give consent ids, or --id (not both)")
    subject = _subject(config, args.id_number) if args.id_number else None
    registry = _registry(config)
    count = registry.withdraw(args.cids, subject, args.consumer, args.scenario)
    registry.close()
    print(f"{count} consent(s) withdrawn: every worker refuses them from the next transfer")
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _config(args)
    subject = _subject(config, args.id_number)
    registry = _registry(config)
    now = time.time()
    consents = [c for c in registry.consents_of(subject)
                if c["consumer"] == args.consumer and c["scenario"] == args.scenario]
    issued = registry.issued()
    registry.close()
    valid = []
    for c in consents:
        problems = [problem for problem, failed in (
            ("withdrawn", c["withdrawn"]), (f"not valid before {utc(c['nbf'])}", now < c["nbf"]),
            (f"expired {utc(c['exp'])}", now >= c["exp"]), ("not separate consent", args.separate and not c["separate"]),
            (f"does not cover {args.dataset}", args.dataset is not None and args.dataset not in c["datasets"]))
            if failed]
        print(f"consent {c['cid']} (batch {c['batch']}): datasets {', '.join(c['datasets'])}, "
              f"{utc(c['nbf'])} to {utc(c['exp'])}{', separate' if c['separate'] else ''}: "
              f"{'VALID' if not problems else 'NOT VALID: ' + '; '.join(problems)}")
        if not problems:
            valid.append(c)
    age = None if issued is None else now - issued
    if age is None or age > config.authz.consent.max_age:
        print(f"registry: {'empty' if age is None else f'{int(age)} s old'}, older than authz.consent.max_age: "
              "the gateway refuses consent datasets")
    print(f"subject {subject.hex()[:16]}..., consumer {args.consumer}, scenario {args.scenario}: "
          f"{'CONSENTED' if valid else 'NO CONSENT'}")
    return 0 if valid else 1
