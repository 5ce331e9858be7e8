"""Brief property-based fuzzing (hypothesis, derandomized, a few seconds per target) of the content
decoders and redaction, the rule and configuration loaders, and request heads sent to a running
gateway. The long runs: bench/fuzz_*.py (docs/hostile-input.md)."""

from __future__ import annotations

import socket
import time

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import fuzzing
from tests.gatewayproc import gateway_config, listener_url, start_gateway, write_config

BRIEF = settings(max_examples=60, derandomize=True, deadline=2000, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


def seeded(test):
    for seed in fuzzing.SEEDS:
        for content_type in ("application/json", "text/csv; charset=gbk"):
            test = example(data=seed, content_type=content_type, content_encoding=None)(test)
    return test


@BRIEF
@seeded
@given(data=st.binary(max_size=8192), content_type=st.sampled_from(fuzzing.CONTENT_TYPES),
       content_encoding=st.sampled_from(fuzzing.CONTENT_ENCODINGS))
def test_decoders_and_redaction_take_any_body(data, content_type, content_encoding):
    fuzzing.scan_and_redact(data, content_type, content_encoding)


yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                         max_size=4), max_leaves=12)
rule_like = st.fixed_dictionaries({"rules": st.lists(st.dictionaries(
    st.sampled_from(["id", "detectors", "action", "severity", "direction", "patterns", "examples", "x"]),
    yaml_values, max_size=6), max_size=3)})


@BRIEF
@given(document=st.one_of(yaml_values, rule_like).map(lambda v: yaml.safe_dump(v).encode()) | st.binary(max_size=512))
def test_rule_loader_takes_any_file(document):
    fuzzing.load_rules_text(document)


@BRIEF
@given(document=st.one_of(yaml_values.map(lambda v: yaml.safe_dump({"gateway": v, "policy": v}).encode()),
                          st.binary(max_size=512)))
def test_config_loader_takes_any_file(document):
    fuzzing.load_config_text(document)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    config = gateway_config(root / "state")
    process = start_gateway(write_config(root / "gateway.yaml", config))
    yield process, listener_url(config, "forward").removeprefix("http://").split(":")
    process.stop()


HEAD_SEEDS = [b"GET http://127.0.0.2/ HTTP/9.9\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
              b"POST http://127.0.0.2/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
              b"GET http://127.0.0.2/ HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
              f"GET http://{fuzzing.ID_NUMBER}.x.example/ HTTP/1.1\r\n\r\n".encode()]


def test_request_heads_of_any_bytes_get_an_answer_or_a_close(gateway):
    process, (host, port) = gateway

    @settings(max_examples=40, derandomize=True, deadline=None, database=None)
    @given(head=st.binary(max_size=2048) | st.sampled_from(HEAD_SEEDS))
    def exchange(head):
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError) as e:
                assert not isinstance(e, TimeoutError), f"no answer and no close in 5 s for {head!r}"
        assert time.monotonic() - started < 5
        assert process.proc.poll() is None, process.output[-2000:]

    exchange()
