"""Parsing batch files: each kind of bad line gets its own code and a message saying what to fix."""

from __future__ import annotations

import json

import pytest

from inferpool import Registry
from inferpool.scheduler import AcceptedLine, BatchLineParser, RejectedLine, Router


def _line(custom_id: str | None = "c1", **body: object) -> str:
    data: dict[str, object] = {
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **body},
    }
    if custom_id is not None:
        data["custom_id"] = custom_id
    return json.dumps(data)


@pytest.fixture
def parser() -> BatchLineParser:
    return BatchLineParser(Router(Registry.load()), max_line_bytes=2000)


def test_good_line_is_accepted_and_routed(parser: BatchLineParser) -> None:
    parsed = parser.parse_line(1, _line(model="smollm2"))
    assert isinstance(parsed, AcceptedLine)
    assert parsed.spec.name == "smollm2-135m"
    assert parsed.custom_id == "c1"


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ('{"custom_id": "c1", "method": "POST",', "invalid_json", "not valid JSON"),
        ("[1, 2]", "invalid_json", "JSON object"),
        (_line(custom_id=None), "missing_custom_id", "custom_id"),
        (_line(custom_id=""), "missing_custom_id", "custom_id"),
        (json.dumps({"custom_id": "c1", "url": "/v1/chat/completions", "body": {}}), "invalid_line", "method"),
        (_line().replace("/v1/chat/completions", "/v1/audio/speech"), "unsupported_url", "/v1/audio/speech"),
        (_line().replace("/v1/chat/completions", "/v1/embeddings"), "invalid_request", "body.input: Field required"),
        (_line(messages=None), "invalid_request", "body.messages"),
        (json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo"}}),
         "invalid_request", "body.messages: Field required"),
        (_line(max_tokens=-3), "invalid_request", "body.max_tokens"),
        (_line(temprature=0.5), "invalid_request", "body.temprature: unknown parameter"),
        (_line(model="no-such-model"), "model_not_found", "no-such-model"),
        (_line(max_tokens=100_000), "invalid_request", "max_tokens=100000"),
        (_line(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
         "capability_mismatch", "vision"),
        (_line(messages=[{"role": "user", "content": "x" * 3000}]), "line_too_large", "over the limit"),
    ],
)  # fmt: skip
def test_bad_lines_get_their_own_error(parser: BatchLineParser, raw: str, code: str, fragment: str) -> None:
    parsed = parser.parse_line(7, raw)
    assert isinstance(parsed, RejectedLine)
    assert parsed.error.code == code
    assert fragment in parsed.error.message
    assert parsed.error.message.startswith("line 7: ")


def test_duplicate_custom_id_rejects_the_second_line_only(parser: BatchLineParser) -> None:
    first, second = list(parser.parse([_line("same"), _line("same")]))
    assert isinstance(first, AcceptedLine)
    assert isinstance(second, RejectedLine)
    assert second.error.code == "duplicate_custom_id"
    assert "line 1" in second.error.message


def test_blank_lines_are_skipped_and_numbering_follows_the_file(parser: BatchLineParser) -> None:
    parsed = list(parser.parse([_line("a"), "", "   ", "not json"]))
    assert len(parsed) == 2
    assert isinstance(parsed[1], RejectedLine)
    assert parsed[1].line_number == 4
