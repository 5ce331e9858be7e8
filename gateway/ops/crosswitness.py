"""Cross-witnessing on one machine of a boundary: `gateway cluster witness -c CONFIG --peers FILE`.

One small service per machine does both halves of the existing witness protocol (C2SP tlog-witness,
gateway.trace.witness):

- it is this machine's **witness** for the other machines' logs: it cosigns a checkpoint only when the
  log proves it extends the one it cosigned before (state in STATE/witness/, key STATE/witness.key);
- it **pushes** this machine's newest checkpoint to every other machine's witness every `interval`
  seconds, and stores their cosignatures beside the log (checkpoint.witnessed). It pushes even when
  the log has not grown, so a fresh cosignature time shows the others still see this log
  (`gateway_trace_witnessed_timestamp_seconds`, the "not witnessed" alert).

It runs apart from `gateway run` (its own systemd unit, systemd/gateway-witness.service): it only
reads the log's files and writes its own, so a witness being down or slow never holds up a transfer,
and a machine that restarts catches up by itself: its pushes carry a consistency proof from the size
each witness last cosigned, and the others' pushes, refused while it was down, succeed again.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from pathlib import Path

import yaml

from gateway.config.load import Config
from gateway.trace.audit import newest_checkpoint
from gateway.trace.note import SIG_COSIGNATURE_V1, NoteError, Signer, load_or_create_signer
from gateway.trace.peers import Peers
from gateway.trace.witness import WitnessConfig, WitnessState, push_checkpoint, serve

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0  # seconds between pushes; the "not witnessed" alert waits 10 minutes


class CrossWitnessError(Exception):
    pass


def witness_key_path(state_dir: Path) -> Path:
    return state_dir / "witness.key"


def witness_signer(config: Config) -> Signer:
    """This machine's witness key, created on first use (mode 0600, witness.pub beside it)."""
    try:
        return load_or_create_signer(witness_key_path(config.state_dir), f"{config.name}/witness",
                                     SIG_COSIGNATURE_V1)
    except (OSError, NoteError) as exc:
        raise CrossWitnessError(f"witness key: {exc}") from None


def listen_address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not parts.port:
        raise CrossWitnessError(f"witness URL {url}: expected http://HOST:PORT")
    return parts.hostname, parts.port


class CrossWitness:
    def __init__(self, config: Config, peers: Peers, interval: float = DEFAULT_INTERVAL,
                 listen: tuple[str, int] | None = None):
        me = peers.by_origin(config.trace_origin)
        if me is None:
            raise CrossWitnessError(f"{peers.source} lists no machine with this log's origin {config.trace_origin!r}")
        signer = witness_signer(config)
        if signer.verifier.vkey() != me.witness_key.vkey():
            raise CrossWitnessError(f"{peers.source}: {me.name}'s witness_key is not this machine's "
                                    f"({witness_key_path(config.state_dir).with_suffix('.pub')}: {signer.verifier.vkey()})")
        self.me = me
        self.others = peers.others(me.origin)
        self.trace_dir = config.trace_dir
        self.interval = interval
        self.listen = listen or listen_address(me.witness)
        self.state = WitnessState(config.state_dir / "witness", {p.origin: p.log_key for p in self.others}, signer)
        self.failing: dict[str, str] = {}  # peer name -> last push error, logged once until it clears
        self._stop = threading.Event()

    def push_once(self) -> dict[str, str | None]:
        """Push this log's newest checkpoint to every other machine's witness; peer name -> error or None."""
        results = {}
        try:  # the journal's newest frame: the checkpoint file may trail it while the log is idle
            note, _ = newest_checkpoint(self.trace_dir, self.me.log_key)
        except (OSError, NoteError) as exc:  # no log yet (the gateway never started), or one that fails
            results = {peer.name: f"checkpoint: {exc}" for peer in self.others}
        else:
            for peer in self.others:
                try:
                    push_checkpoint(self.trace_dir, self.me.log_key,
                                    WitnessConfig(peer.witness, peer.witness_key.vkey()), note)
                    results[peer.name] = None
                except Exception as exc:  # a witness down or refusing must not stop the pushes to the others
                    results[peer.name] = f"{peer.witness}: {exc}"
        self._log_changes(results)
        return results

    def _log_changes(self, results: dict[str, str | None]) -> None:
        for name, error in results.items():
            if error and self.failing.get(name) != error:
                log.warning("witness push to %s failed: %s", name, error)
            elif not error and name in self.failing:
                log.info("witness push to %s works again", name)
            if error:
                self.failing[name] = error
            else:
                self.failing.pop(name, None)

    def run(self, ready=lambda: None) -> None:
        """Serve the witness and push every `interval` seconds until stop()."""
        try:
            server = serve(self.listen, self.state)
        except OSError as exc:
            raise CrossWitnessError(f"witness listener {self.listen[0]}:{self.listen[1]}: {exc.strerror or exc}") \
                from None
        thread = threading.Thread(target=server.serve_forever, name="witness", daemon=True)
        thread.start()
        log.info("witness %s on %s:%d for %s; pushing %s to %s every %g s", self.state.signer.name,
                 *self.listen, ", ".join(p.origin for p in self.others), self.me.origin,
                 ", ".join(p.name for p in self.others), self.interval)
        ready()
        try:
            while not self._stop.is_set():
                self.push_once()
                self._stop.wait(self.interval)
        finally:
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        self._stop.set()


def peer_entry(config: Config, signer: Signer, log_key: str, witness: str, management: str | None,
               log_copy: str | None) -> str:
    """This machine's entry for the peers file (YAML, a list item)."""
    entry = {"name": config.name, "log_key": log_key, "witness_key": signer.verifier.vkey(), "witness": witness}
    entry |= {key: value for key, value in (("management", management), ("log", log_copy)) if value}
    return yaml.safe_dump([entry], sort_keys=False, width=1000)
