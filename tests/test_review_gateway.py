"""Issue 25, the gateway's items (1, 2, 3, 9, 11, 15): abandoned requests, the event loop, bounded uploads,
client mistakes answered in OpenAI's shape, file expiry and quotas. A real gateway process (with small
limits), real workers and the real scheduler; hostile HTTP from hypothesis."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inferpool import Client, Settings
from inferpool.constants import MODEL_LATENCY_KEY, USAGE_TOTAL_KEY
from inferpool.gateway.admission import Admission
from inferpool.gateway.errors import HTTPError
from inferpool.state.api_keys import ApiKeys
from inferpool.state.load import read_latency_p50

from .conftest import start_gateway, stop_gateway, wait_until

pytestmark = pytest.mark.usefixtures("echo_worker", "echo_trickle_worker", "scheduler")

MAX_UPLOAD = 1_000_000
BOUNDARY = "inferpoolboundary"


@pytest.fixture(scope="module")
def gateway(redis_url: str, session_dir: Path) -> Iterator[tuple[str, psutil.Process, Path]]:
    files = session_dir / "review-gateway-files"
    env = {"INFERPOOL_FILES_DIR": str(files), "INFERPOOL_GATEWAY_REQUEST_TIMEOUT_S": "2",
           "INFERPOOL_GATEWAY_MAX_IN_FLIGHT_PER_TENANT": "3", "INFERPOOL_FILES_MAX_PER_TENANT": "3",
           "INFERPOOL_FILES_TTL_S": "4", "INFERPOOL_BATCH_MAX_BYTES": str(MAX_UPLOAD)}  # fmt: skip
    log_path = session_dir / "review-gateway.log"
    proc, url = start_gateway(redis_url, log_path, env)
    yield url, psutil.Process(proc.pid), files
    log = stop_gateway(proc, log_path)
    # Client mistakes are answered, not logged above info (issue 25.11).
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line], log[-3000:]


@pytest.fixture(scope="module")
def keys(redis_url: str) -> dict[str, str]:
    store = ApiKeys(redis.Redis.from_url(redis_url))
    return {t: store.create(t)[0] for t in ("review-caps", "review-files", "review-quota", "review-hyp")}


def _auth(keys: dict[str, str], tenant: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys[tenant]}", **extra}


def _chat(model: str, text: str, **more: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


def _assert_openai_error(reply: httpx.Response, status: int) -> dict[str, object]:
    assert reply.status_code == status, (reply.status_code, reply.text[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


def _blocked_result_waiters(client: redis.Redis) -> int:
    """Connections blocked in BLPOP now (flag b): a connection back in its pool still shows its last command."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "blpop" and "b" in c.get("flags", ""))


# -- 1: abandoned requests end, the wait is bounded, and open requests are capped --------------------------


def test_clients_that_give_up_leave_no_waiter_behind(gateway: tuple[str, psutil.Process, Path],
                                                     keys: dict[str, str], redis_client: redis.Redis) -> None:  # fmt: skip
    url = gateway[0]
    headers = _auth(keys, "review-files")  # not the capped tenant: 3 at once are allowed anyway
    stopped_before = len(list(redis_client.scan_iter("inferpool:stream:*:cancel", count=1000)))
    for _ in range(3):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=_chat("echo-trickle", "give up"), headers=headers,
                       timeout=0.3)  # fmt: skip
    wait_until(lambda: _blocked_result_waiters(redis_client) == 0, 5, "the abandoned requests' waiters to end")
    # Each abandoned request was stopped: a worker that has not begun it will not run it.
    stopped = len(list(redis_client.scan_iter("inferpool:stream:*:cancel", count=1000)))
    assert stopped - stopped_before >= 3


def test_a_request_past_the_gateway_timeout_is_a_504_and_is_stopped(gateway: tuple[str, psutil.Process, Path],
                                                                   keys: dict[str, str],
                                                                   redis_client: redis.Redis) -> None:  # fmt: skip
    reply = httpx.post(f"{gateway[0]}/v1/chat/completions", json=_chat("echo-trickle", "too slow"),
                       headers=_auth(keys, "review-files"), timeout=30)  # fmt: skip
    error = _assert_openai_error(reply, 504)
    assert "INFERPOOL_GATEWAY_REQUEST_TIMEOUT_S" in str(error["message"])
    request_id = reply.headers["x-request-id"]
    assert redis_client.exists(f"inferpool:stream:{request_id}:cancel")  # the worker is told nobody waits


def test_a_tenant_over_its_open_requests_gets_429_with_retry_after(gateway: tuple[str, psutil.Process, Path],
                                                                  keys: dict[str, str]) -> None:  # fmt: skip
    url = gateway[0]

    def send(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=_chat("echo-trickle", "hold"),
                          headers=_auth(keys, "review-caps"), timeout=30)  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(send, range(6)))
    refused = [r for r in replies if r.status_code == 429]
    assert len(refused) == 3  # 3 held open (each ends at the 2 s timeout), 3 refused at once
    assert all(r.status_code == 504 for r in replies if r not in refused)
    error = _assert_openai_error(refused[0], 429)
    assert error["code"] == "rate_limit_exceeded"
    assert refused[0].headers["retry-after"] == "1"
    # The slots are free again once the requests end.
    reply = httpx.post(f"{url}/v1/chat/completions", json=_chat("echo", "again"), headers=_auth(keys, "review-caps"),
                       timeout=30)  # fmt: skip
    assert reply.status_code == 200


def test_admission_counts_the_process_and_each_tenant() -> None:
    admission = Admission(most=3, most_per_tenant=2)
    admission.acquire("a")
    admission.acquire("a")
    with pytest.raises(HTTPError) as per_tenant:
        admission.acquire("a")
    assert per_tenant.value.status == 429
    assert "PER_TENANT" in per_tenant.value.message
    admission.acquire("b")
    with pytest.raises(HTTPError) as whole:
        admission.acquire("c")
    assert "INFERPOOL_GATEWAY_MAX_IN_FLIGHT)" in whole.value.message
    for tenant in ("a", "a", "b"):
        admission.release(tenant)
    assert admission.open == 0
    admission.acquire("c")


# -- 2: routing reads a bounded per-model latency view ---------------------------------------------------


def test_fastest_routing_reads_the_per_model_latency_not_the_tenants_usage(client: Client,
                                                                         redis_client: redis.Redis) -> None:  # fmt: skip
    client.chat("echo", [{"role": "user", "content": "latency sample"}], timeout=30)
    latencies = read_latency_p50(redis_client)
    assert "echo" in latencies
    assert any(field.startswith(b"echo|") for field in redis_client.hkeys(MODEL_LATENCY_KEY))
    # Thousands of tenants' counters do not change (or slow) what is read: the view is models x buckets.
    redis_client.hset(USAGE_TOTAL_KEY, mapping={f"t{n}|echo|latency|0.5": 1 for n in range(2000)})
    try:
        assert read_latency_p50(redis_client) == latencies
    finally:
        redis_client.hdel(USAGE_TOTAL_KEY, *[f"t{n}|echo|latency|0.5" for n in range(2000)])


def test_auto_routing_through_the_gateway(gateway: tuple[str, psutil.Process, Path], keys: dict[str, str],
                                          client: Client) -> None:  # fmt: skip
    # "fastest" picks among models with measured answers (an unmeasured one counts as infinitely slow): echo
    # has one here whatever ran before this test.
    client.chat("echo", [{"role": "user", "content": "measured"}], timeout=30)
    body = {**_chat("auto", "pick one"), "routing": {"prefer": "fastest"}}
    reply = httpx.post(f"{gateway[0]}/v1/chat/completions", json=body, headers=_auth(keys, "review-files"),
                       timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text


# -- 3, 9: uploads are bounded and must be whole -------------------------------------------------------


def _multipart(parts: list[tuple[str, bytes]], *, close: bool = True, boundary: str = BOUNDARY) -> bytes:
    pieces = []
    for name, value in parts:
        filename = '; filename="in.jsonl"' if name == "file" else ""
        pieces.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n'.encode())
        pieces.append(value + b"\r\n")
    pieces.append(f"--{boundary}--\r\n".encode() if close else b"")
    return b"".join(pieces)


def _upload(url: str, headers: dict[str, str], body: bytes, boundary: str = BOUNDARY) -> httpx.Response:
    return httpx.post(f"{url}/v1/files", content=body, timeout=60,
                      headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip


LINE = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                   "body": _chat("echo", "hi")}).encode() + b"\n"  # fmt: skip


def test_an_upload_of_many_fields_is_refused_without_growing_the_gateway(
    gateway: tuple[str, psutil.Process, Path], keys: dict[str, str]
) -> None:
    url, process, _ = gateway
    headers = _auth(keys, "review-files")
    before = process.memory_info().rss
    many = _multipart([(f"f{i}", b"x" * 1000) for i in range(40_000)])  # ~42 MB of form fields
    reply = _upload(url, headers, many)
    assert reply.status_code in (400, 413)  # over the parts cap, or over the body's bytes: whichever comes first
    _assert_openai_error(reply, reply.status_code)
    small_many = _multipart([(f"f{i}", b"") for i in range(5_000)])  # under the byte limit: the parts cap
    assert "form parts" in str(_assert_openai_error(_upload(url, headers, small_many), 400)["message"])
    assert process.memory_info().rss - before < 30 * 1024 * 1024
    # Bytes outside the file count too: a body of headers and padding past the limit is a 413.
    padded = b"x" * (2 * MAX_UPLOAD) + _multipart([("purpose", b"batch"), ("file", LINE)])
    error = _assert_openai_error(_upload(url, headers, padded), 413)
    assert error["code"] == "file_too_large"


def test_a_cut_off_upload_is_refused_and_not_stored(gateway: tuple[str, psutil.Process, Path],
                                                    keys: dict[str, str]) -> None:  # fmt: skip
    url, _, files = gateway
    headers = _auth(keys, "review-files")
    before = sorted(files.glob("*")) if files.exists() else []
    cut = _multipart([("purpose", b"batch"), ("file", LINE * 3 + LINE[:20])], close=False)
    error = _assert_openai_error(_upload(url, headers, cut), 400)
    assert "cut off" in str(error["message"])
    assert (sorted(files.glob("*")) if files.exists() else []) == before
    listed = httpx.get(f"{url}/v1/files", headers=headers, timeout=10).json()["data"]
    assert not [f for f in listed if f["bytes"] == len(LINE * 3 + LINE[:20])]


# -- 11: every client mistake is a 4xx in OpenAI's shape --------------------------------------------------


def test_client_mistakes_are_4xx_openai_errors(gateway: tuple[str, psutil.Process, Path], keys: dict[str, str]) -> None:
    url = gateway[0]
    headers = _auth(keys, "review-files")
    # A malformed multipart body, and a boundary over 256 bytes.
    _assert_openai_error(_upload(url, headers, b"--" + BOUNDARY.encode() + b"\r\ngarbage\r\n\r\n\x00\x01"), 400)
    long_boundary = "b" * 300
    _assert_openai_error(_upload(url, headers, _multipart([("file", LINE)], boundary=long_boundary), long_boundary),
                         400)  # fmt: skip
    # A limit that str.isdigit() accepts and int() does not.
    _assert_openai_error(httpx.get(f"{url}/v1/files", params={"limit": "²"}, headers=headers), 400)
    _assert_openai_error(httpx.get(f"{url}/v1/batches", params={"limit": "٣"}, headers=headers), 400)
    # A lone surrogate in a body.
    surrogate = b'{"model": "echo", "messages": [{"role": "user", "content": "\\ud800"}]}'
    json_headers = {**headers, "Content-Type": "application/json"}
    error = _assert_openai_error(httpx.post(f"{url}/v1/chat/completions", content=surrogate, headers=json_headers), 400)
    assert "surrogate" in str(error["message"])
    batch = b'{"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"k": "\\udfff"}}'
    _assert_openai_error(httpx.post(f"{url}/v1/batches", content=batch, headers=json_headers), 400)
    # Unknown routes and methods, and ids that are Redis keys of another type.
    assert _assert_openai_error(httpx.get(f"{url}/v1/nothing", headers=headers), 404)["code"] == "unknown_url"
    _assert_openai_error(httpx.delete(f"{url}/v1/batches", headers=headers), 405)
    _assert_openai_error(httpx.get(f"{url}/v1/batches/batch_x:pending:echo", headers=headers), 404)
    _assert_openai_error(httpx.get(f"{url}/v1/files/file-out-x:pending:echo/content", headers=headers), 404)


ROUTES = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/{id}"),
          ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{id}"), ("DELETE", "/v1/files/{id}"),
          ("GET", "/v1/files/{id}/content"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
          ("GET", "/v1/batches/{id}"), ("POST", "/v1/batches/{id}/cancel"), ("PUT", "/v1/batches"),
          ("GET", "/v1/{id}")]  # fmt: skip
HOSTILE_TEXT = st.text(st.characters(codec=None, categories=("L", "N", "P", "S", "Cc", "Cs", "Zs")), max_size=40)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | HOSTILE_TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
                       max_leaves=12)  # fmt: skip


def _raw_json(value: object) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")  # escapes a lone surrogate as \udXXX


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), ident=HOSTILE_TEXT, query=st.dictionaries(HOSTILE_TEXT, HOSTILE_TEXT, max_size=3),
       body=st.one_of(st.binary(max_size=300), JSONISH.map(_raw_json),
                      st.fixed_dictionaries({"model": st.sampled_from(["echo", "auto", "nope"]),
                                             "messages": JSONISH}).map(_raw_json)),
       content_type=st.sampled_from(["application/json", f"multipart/form-data; boundary={BOUNDARY}",
                                     "multipart/form-data", "text/plain", ""]))  # fmt: skip
def test_malformed_http_at_every_route_is_never_a_5xx(
    gateway: tuple[str, psutil.Process, Path],
    keys: dict[str, str],
    route: tuple[str, str],
    ident: str,
    query: dict[str, str],
    body: bytes,
    content_type: str,
) -> None:
    method, template = route
    raw = ident.encode("utf-8", "surrogatepass")  # a lone surrogate goes out as its (invalid) UTF-8 bytes
    path = template.replace("{id}", urllib.parse.quote(raw, safe="") or "x")
    query_string = urllib.parse.urlencode({k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass")
                                           for k, v in query.items()})  # fmt: skip
    headers = _auth(keys, "review-hyp", **({"Content-Type": content_type} if content_type else {}))
    target = f"{gateway[0]}{path}" + (f"?{query_string}" if query_string else "")
    reply = httpx.request(method, target, content=body, headers=headers, timeout=30)
    assert reply.status_code < 500 or reply.status_code in (502, 503, 504), (method, path, reply.text[:300])
    assert reply.status_code != 500, reply.text[:300]
    if reply.status_code >= 400:
        _assert_openai_error(reply, reply.status_code)


# -- 15: uploaded files expire and have a per-tenant quota ------------------------------------------------


def test_files_expire_and_a_tenant_has_a_quota(gateway: tuple[str, psutil.Process, Path], keys: dict[str, str],
                                               settings: Settings) -> None:  # fmt: skip
    url, _, files = gateway
    headers = _auth(keys, "review-quota")
    made = []
    for _ in range(3):
        reply = _upload(url, headers, _multipart([("purpose", b"batch"), ("file", LINE)]))
        assert reply.status_code == 200, reply.text
        assert reply.json()["expires_at"] == reply.json()["created_at"] + 4
        made.append(reply.json()["id"])
    error = _assert_openai_error(_upload(url, headers, _multipart([("purpose", b"batch"), ("file", LINE)])), 413)
    assert error["code"] == "file_quota_exceeded"
    assert "INFERPOOL_FILES_MAX_PER_TENANT" in str(error["message"])
    # A deleted file frees its place.
    assert httpx.delete(f"{url}/v1/files/{made[0]}", headers=headers).json()["deleted"] is True
    assert _upload(url, headers, _multipart([("purpose", b"batch"), ("file", LINE)])).status_code == 200
    # Four seconds on, every one has expired: not shown, and deleted from the store by the next listing.
    time.sleep(4.5)
    for file_id in made[1:]:
        _assert_openai_error(httpx.get(f"{url}/v1/files/{file_id}", headers=headers), 404)
    assert httpx.get(f"{url}/v1/files", headers=headers).json()["data"] == []
    assert not [p for p in files.glob("*.jsonl") if p.stem in made]
    assert _upload(url, headers, _multipart([("purpose", b"batch"), ("file", LINE)])).status_code == 200
