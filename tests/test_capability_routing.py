"""``model: "auto"``: the router picks among models with the required capabilities and a live worker
(real worker processes and heartbeats), by load, price or latency; a killed worker drops out by itself."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferpool import CapabilityMismatch, Client, JobStatus
from inferpool.client._base import build_request
from inferpool.plumbing.local_pool import WorkerProcess

from .conftest import _start_workers, _stop_workers

pytestmark = pytest.mark.usefixtures("scheduler")

IMAGE = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]  # fmt: skip
HEARTBEAT_TTL_S = 3


@pytest.fixture(scope="module")
def vision_workers(redis_url: str, session_dir: Path) -> Iterator[list[WorkerProcess]]:
    """Workers for both vision models, with a short heartbeat so a dead one leaves routing quickly."""
    env = {"INFERPOOL_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S)}
    workers = _start_workers(redis_url, session_dir, "echo-vision", "echo-vision-cheap", env=env)
    yield workers
    _stop_workers([w for w in workers if w.proc.poll() is None])


def auto(messages: object, **routing: object) -> dict[str, object]:
    return {"model": "auto", "messages": messages, "max_tokens": 8, "routing": routing}


@pytest.mark.usefixtures("vision_workers")
def test_auto_picks_by_capability_and_price(client: Client) -> None:
    cheap = client.submit(auto(IMAGE, require=["vision"], prefer="cheapest")).result(30)
    assert cheap.stats is not None
    assert cheap.stats.model == "echo-vision-cheap"
    assert cheap.response is not None
    assert cheap.response.model == "echo-vision-cheap"
    large = client.submit(auto(IMAGE, require=["vision"], min_context=32000)).result(30)
    assert large.stats is not None
    assert large.stats.model == "echo-vision"
    implied = client.submit(auto(IMAGE, prefer="cheapest")).result(30)  # the image alone requires vision
    assert implied.stats is not None
    assert implied.stats.model == "echo-vision-cheap"


def test_a_capability_no_model_has_is_named_in_the_error(client: Client) -> None:
    lacks = r"it needs: vision, tools\).*echo \(vision, tools\).*echo-vision \(tools\)"
    with pytest.raises(CapabilityMismatch, match=lacks):
        client.submit(auto([{"role": "user", "content": "hi"}], require=["vision", "tools"]))


def test_a_killed_worker_leaves_routing_by_itself(client: Client, vision_workers: list[WorkerProcess]) -> None:
    cheap_worker = next(w for w in vision_workers if w.model == "echo-vision-cheap")
    os.killpg(cheap_worker.proc.pid, signal.SIGKILL)
    cheap_worker.proc.wait(timeout=10)
    request = build_request(auto(IMAGE, require=["vision"], prefer="cheapest"))
    deadline = time.monotonic() + 30
    # The heartbeat expires within its TTL and the client's live view refreshes every 2 s. (Requests routed
    # meanwhile wait in the dead model's queue for a worker; none is submitted here.)
    while client.route(request).spec.name != "echo-vision":
        assert time.monotonic() < deadline, "the dead worker's model was still chosen after 30 s"
        time.sleep(0.25)
    result = client.submit(request).result(30)
    assert result.stats is not None
    assert result.stats.model == "echo-vision"
    other = next(w for w in vision_workers if w.model == "echo-vision")
    os.killpg(other.proc.pid, signal.SIGKILL)
    other.proc.wait(timeout=10)
    time.sleep(HEARTBEAT_TTL_S + 2.5)
    with pytest.raises(CapabilityMismatch, match="have no live worker; start one with `inferpool worker"):
        client.submit(auto(IMAGE, require=["vision"]))


@pytest.mark.usefixtures("echo_slow_worker")
def test_load_spreads_over_two_workers_of_one_model(client: Client, redis_url: str, session_dir: Path) -> None:
    [second] = _start_workers(redis_url, session_dir, "echo-slow")
    try:
        lines = [f'{{"custom_id": "s{i}", "method": "POST", "url": "/v1/chat/completions", "body": {{"model": '
                 f'"echo-slow", "messages": [{{"role": "user", "content": "spread {i}"}}]}}}}' for i in range(400)]  # fmt: skip
        job = client.batches.wait(client.batches.create(lines).id, timeout=120, poll_s=0.1)
        assert job.status == JobStatus.COMPLETED
        workers = {r.stats.worker for r in client.batches.request_results(job.id) if r.stats}
        assert len(workers) == 2
    finally:
        _stop_workers([second])
