"""Prometheus metrics, scraped over HTTP from the real scheduler process during and after a job."""

from __future__ import annotations

import json
import secrets
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from inferpool import Client, Settings

pytestmark = pytest.mark.usefixtures("scheduler", "echo_slow_worker")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_during_and_after_a_job(settings: Settings, metrics_port: int) -> None:
    tenant = f"metrics-{secrets.token_hex(4)}"
    lines = [
        json.dumps({"custom_id": f"m{i}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "echo-slow", "messages": [{"role": "user", "content": f"m {i}"}]}})
        for i in range(300)
    ]  # fmt: skip
    with Client(settings=settings, tenant=tenant) as client:
        job = client.batches.create(lines)
        during: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            during = scrape(metrics_port)
            if during.get(("inferpool_in_flight", (("model", "echo-slow"),)), 0) > 0:
                break
            time.sleep(0.05)
        assert during[("inferpool_in_flight", (("model", "echo-slow"),))] > 0
        assert during[("inferpool_live_workers", (("model", "echo-slow"),))] >= 1
        assert during[("inferpool_batch_jobs_active", ())] >= 1
        assert ("inferpool_queue_depth", (("model", "echo-slow"),)) in during
        client.batches.wait(job.id, timeout=120, poll_s=0.2)
    after = scrape(metrics_port)
    labels = (("model", "echo-slow"), ("tenant", tenant))
    assert after[("inferpool_requests_total", labels)] == 300
    assert after[("inferpool_request_errors_total", labels)] == 0
    assert after[("inferpool_prompt_tokens_total", labels)] == 600
    assert after[("inferpool_completion_tokens_total", labels)] == 900
    assert after[("inferpool_request_latency_seconds_count", labels)] == 300
    assert after[("inferpool_request_latency_seconds_sum", labels)] > 0
    # echo answers all at once: its first token exists when the answer does, so every answer has a TTFT.
    assert after[("inferpool_time_to_first_token_seconds_count", labels)] == 300
    assert after[("inferpool_time_to_first_token_seconds_sum", labels)] > 0
    assert (
        after[("inferpool_time_to_first_token_seconds_sum", labels)]
        <= after[("inferpool_request_latency_seconds_sum", labels)]
    )
    with Client(settings=settings) as client:
        [usage] = client.usage(tenant=tenant)
    assert usage.ttft_count == 300
    assert usage.ttft_p50_s is not None
    assert usage.latency_p95_s is not None
    assert usage.ttft_p50_s <= usage.latency_p95_s
