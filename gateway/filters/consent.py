"""Stage 3b (after inspect): a `legal_basis: consent` dataset's records leave in clear only with consent.

The grant stage named the consumer and scenario; this stage refuses before anything is forwarded when
the consent registry is too old to trust (`consent_stale`), and on the response looks up every
record's subject (gateway.authz.records): records with consent pass, the others are masked or dropped,
or the transfer is refused (`consent_missing`). A body whose records cannot be read is refused
(`consent_unfilterable`, 502), and so is one the gateway spools to disk (above dlp.spool_threshold:
records are filtered only in a body held whole): its head is held with it (gateway.proxy.heldheads),
so that refusal replaces the upstream's answer, whose body is dropped. The response's header and
trailer fields are outside the records: an ID number in them of a subject without consent is masked
where it is written (`unconsented: refuse`: the response is refused), and a field in which one is
still read once masked is refused (`consent_unfilterable`). The counts go to the trace record
(`consent`) and the metrics.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

from mitmproxy import http

from gateway.authz.catalog import Dataset
from gateway.authz.consent import ConsentRegistry, RegistryView, Scope
from gateway.authz.idscan import id_numbers, mask_id_numbers
from gateway.authz.records import Outcome, RecordFilter, Unfilterable
from gateway.authz.settings import ConsentSettings
from gateway.config.runtime import Runtime
from gateway.filters import CONSENT_DATASET, RECORDS_READ, refuse, transfer_of
from gateway.ops.metrics import GatewayMetrics
from gateway.transfer.model import Reason, Transfer

INLINE_LIMIT = 64 * 1024  # bodies above this are filtered in a worker thread, off the event loop


class ConsentGateway(Protocol):
    runtime: Runtime
    metrics: GatewayMetrics


class Consent:
    def __init__(self, gateway: ConsentGateway):
        self.gateway = gateway
        self._settings: ConsentSettings | None = None
        self._view: RegistryView | None = None
        self._filters: dict[str, RecordFilter] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        grant = transfer.extra.get("grant") if transfer is not None else None
        if grant is None or grant["result"] != "allow" or flow.response:
            return
        authz = self.gateway.runtime.config.authz
        dataset = authz.catalog.get(grant["dataset"])
        if dataset is None or dataset.consent is None:
            return
        view = self._current_view()
        now = time.time()
        if not view.fresh(now):
            age = view.age(now)
            detail = "no consent batch imported" if age is None else \
                f"newest consent batch {int(age)} s old (max {int(view.max_age)} s)"
            self._refuse(flow, transfer, dataset, "consent_stale", detail, 403)
            return
        transfer.extra[CONSENT_DATASET] = dataset

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        if transfer is None or CONSENT_DATASET not in transfer.extra or not callable(flow.response.stream):
            return
        dataset = transfer.extra[CONSENT_DATASET]

        def held_whole() -> bool:
            # Runs only if the body is spooled (inspect's HeldBody, past dlp.spool_threshold): it is never
            # held whole, so its records cannot be filtered. Its head is held with it: nothing has left,
            # and the refusal goes out in place of the upstream's answer.
            transfer.extra.pop(CONSENT_DATASET, None)
            self._refuse(flow, transfer, dataset, "consent_unfilterable",
                         "response body above dlp.spool_threshold (records are filtered in memory only)", 502)
            return False
        # First: the grant stage's check (a counted dataset's) would refuse the body as uncountable, which
        # says less about why a consent dataset's records cannot leave.
        transfer.before_release.insert(0, held_whole)

    async def response(self, flow: http.HTTPFlow) -> None:
        transfer = transfer_of(flow)
        read = transfer.extra.pop(RECORDS_READ, None) if transfer is not None else None
        if transfer is None or CONSENT_DATASET not in transfer.extra or flow.metadata.get("gateway_refused"):
            return
        dataset: Dataset = transfer.extra.pop(CONSENT_DATASET)
        response = flow.response
        grant = transfer.extra["grant"]
        record_filter = self._filter(dataset)
        scope = Scope(grant["consumer"], grant["scenario"], dataset.id, dataset.consent.separate)
        now = time.time()

        def apply():
            return record_filter.apply(body, response.headers.get("content-type", ""),
                                       self._view.consented(scope, now), records)

        try:
            body = response.content  # content codings undone (a body that does not decode is refused)
            # The records the grant stage read to count them, if the body is still the one it read (DLP
            # redaction, say, may have changed it since).
            records = read[1] if read is not None and read[0] == body else None
            # A large body, or a scope to load from the registry first, is worked on off the event loop.
            inline = len(body) <= INLINE_LIMIT and self._view.loaded(scope, now)
            outcome = apply() if inline else await asyncio.to_thread(apply)
        except (Unfilterable, ValueError) as e:
            self._refuse(flow, transfer, dataset, "consent_unfilterable", f"response body: {e}", 502)
            return
        except sqlite3.Error as e:  # fail closed: no answer from the registry, no records
            self._refuse(flow, transfer, dataset, "consent_stale", f"consent registry unreadable: {e}", 403)
            return
        transfer.extra["consent"] = outcome.counts()
        if outcome.refused:
            self.gateway.metrics.consent_records.labels(dataset.id, "refused").inc(outcome.refused)
            self._refuse(flow, transfer, dataset, "consent_missing",
                         f"{outcome.records} records, {outcome.refused} without the subject's consent", 403)
            return
        try:
            cleared = self._clear_head(flow, transfer, dataset, lambda numbers: self._unconsented(numbers, scope, now))
        except sqlite3.Error as e:
            self._refuse(flow, transfer, dataset, "consent_stale", f"consent registry unreadable: {e}", 403)
            return
        if not cleared:
            return
        response.content = outcome.body  # encoded again as sent; Content-Length follows
        for outcome_name in ("passed", "masked", "dropped"):
            if count := getattr(outcome, outcome_name):
                self.gateway.metrics.consent_records.labels(dataset.id, outcome_name).inc(count)

    def _clear_head(self, flow: http.HTTPFlow, transfer: Transfer, dataset: Dataset,
                    unconsented: Callable[[set[str]], set[str]]) -> bool:
        """Masks, in the response's header and trailer fields (names and values), each ID number of a
        subject without consent; False when it refused the response instead: `unconsented: refuse`, or a
        field in which the consent stage still reads one once masked (a form the masking does not find,
        or the field's bytes read as GB 18030). The ID numbers found are counted (`header_ids`)."""
        response = flow.response
        heads = [(kind, fields) for kind, fields in (("header", response.headers), ("trailer", response.trailers))
                 if fields is not None]
        every_part = b"\0".join(part for _, fields in heads for raw in fields.fields for part in raw)
        if not id_numbers(_readings((every_part,))):
            return True  # (most heads: one scan of all their fields)
        masked: dict[str, int] = {}  # "header:NAME" (the name masked) -> ID numbers masked in the field
        uncleared: dict[str, int] = {}
        for kind, fields in heads:
            kept = []
            for raw in fields.fields:
                field, found = zip(*(_masked(part, unconsented) for part in raw))
                place = f"{kind}:{field[0].decode('utf-8', 'replace')}"
                if sum(found):
                    masked[place] = masked.get(place, 0) + sum(found)
                if left := unconsented(id_numbers(_readings(field))):
                    uncleared[place] = uncleared.get(place, 0) + len(left)
                kept.append(field)
            if masked:
                fields.fields = tuple(kept)
        if not (masked or uncleared):
            return True
        counts = transfer.extra["consent"]
        header_ids = sum(masked.values()) + sum(uncleared.values())
        if uncleared or dataset.consent.unconsented == "refuse":
            # Nothing leaves: the records decided count as in a refused response.
            transfer.extra["consent"] = Outcome(records=counts["records"]).counts() | {"header_ids": header_ids}
            places = ", ".join({**masked, **uncleared})
            if dataset.consent.unconsented == "refuse":
                self._refuse(flow, transfer, dataset, "consent_missing",
                             f"response {places}: an ID number without the subject's consent", 403)
            else:
                self._refuse(flow, transfer, dataset, "consent_unfilterable", f"response {', '.join(uncleared)}: "
                             "an ID number without the subject's consent, written so that it is not masked", 502)
            return False
        counts["header_ids"] = header_ids
        transfer.escalate("redact", [Reason(dataset.id, "consent_header_masked", place, "redact") for place in masked])
        return True

    def _unconsented(self, numbers: set[str], scope: Scope, now: float) -> set[str]:
        """Those of these ID numbers whose subject has no valid consent in this scope."""
        if not numbers:  # (most fields: no registry look-up)
            return set()
        keys = {number: self._settings.hasher.key(number) for number in numbers}
        consented = self._view.consented(scope, now)({key for key in keys.values() if key is not None})
        return {number for number, key in keys.items() if key not in consented}

    def done(self) -> None:
        if self._view is not None:
            self._view.close()

    def _refuse(self, flow: http.HTTPFlow, transfer: Transfer, dataset: Dataset, reason: str, detail: str,
                status: int) -> None:
        transfer.escalate("deny", [Reason(dataset.id, reason, detail, "deny")])
        refuse(flow, transfer, status=status, error="consent refused")

    def _current_view(self) -> RegistryView:
        """The registry of the configuration in use, opened again when a reload replaced its settings."""
        config = self.gateway.runtime.config
        settings = config.authz.consent
        if self._view is None or settings is not self._settings:
            if self._view is not None:
                self._view.close()
            self._settings, self._filters = settings, {}
            self._view = RegistryView(ConsentRegistry(settings.registry_path(config.state_dir)), settings.max_age)
        return self._view

    def _filter(self, dataset: Dataset) -> RecordFilter:
        record_filter = self._filters.get(dataset.id)
        if record_filter is None or record_filter.dataset is not dataset:
            record_filter = self._filters[dataset.id] = RecordFilter(dataset, self._settings.hasher)
        return record_filter


def _masked(part: bytes, unconsented: Callable[[set[str]], set[str]]) -> tuple[bytes, int]:
    """A header field's name or value with its unconsented ID numbers masked (mask_id_numbers), read and
    written back as UTF-8, or byte for byte as Latin-1 when it is not UTF-8 (its GB 18030 reading is
    checked afterwards); and how many were masked."""
    try:
        text, codec = part.decode(), "utf-8"
    except UnicodeDecodeError:
        text, codec = part.decode("latin-1"), "latin-1"
    text, count = mask_id_numbers(text, unconsented)
    return (text.encode(codec) if count else part), count


def _readings(field: tuple[bytes, ...]) -> list[str]:
    """A header field's name and value (or other bytes) as a client may read them: UTF-8, and GB 18030
    when not ASCII."""
    return [reading for part in field for reading in (
        [part.decode("utf-8", "replace")] + ([] if part.isascii() else [part.decode("gb18030", "replace")]))]
