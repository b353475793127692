"""Redis key names and other fixed names, in one place (every key inferpool writes starts with ``inferpool:``)."""

from __future__ import annotations

from enum import StrEnum

KEY_PREFIX = "inferpool:"

#: Task names, as Celery and Flower show them.
TASK_PROCESS_CHUNK = "inferpool.process_chunk"
#: The task that advances one provider batch (upload, create, poll, collect): ``inferpool.provider_batch``.
TASK_PROVIDER_BATCH_STEP = "inferpool.provider_batch_step"

#: Entry-point group through which backends (built-in and third-party alike) register.
BACKEND_ENTRY_POINT_GROUP = "inferpool.backends"
HOOK_ENTRY_POINT_GROUP = "inferpool.hooks"
DETECTOR_ENTRY_POINT_GROUP = "inferpool.detectors"


class Priority(StrEnum):
    """Request priority: one Celery queue each, which a worker always polls in this order."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


#: Queue names sort in priority order: workers poll their queues with kombu's "sorted" strategy, so
#: BRPOP always looks at high, then normal, then low (kombu's default round robin would not).
_QUEUE_RANK = {Priority.HIGH: "1-high", Priority.NORMAL: "2-normal", Priority.LOW: "3-low"}


def queue_name(model_name: str, priority: Priority = Priority.NORMAL) -> str:
    """The Celery queue that carries work of one priority for one served model."""
    return f"inferpool.model.{model_name}.{_QUEUE_RANK[priority]}"  # a plain "high" string finds its rank too


def split_adapter(model: str) -> tuple[str, str | None]:
    """``"base:adapter"`` -> ("base", "adapter"); a plain name -> (name, None). Names never contain ':'."""
    base, sep, adapter = model.partition(":")
    return (base, adapter) if sep else (model, None)


def model_queues(model_name: str) -> list[str]:
    """A model's queues, highest priority first (the order workers poll them in)."""
    return [queue_name(model_name, priority) for priority in Priority]


def worker_queue_name(model_name: str, worker_id: str, priority: Priority = Priority.NORMAL) -> str:
    """A worker's own queue of one priority (prefix affinity sends work there by name). It sorts just before
    the model's shared queue of the same priority ('@' < any letter), so a worker takes its own work first
    and never takes lower-priority work before higher."""
    return f"inferpool.model.{model_name}.{_QUEUE_RANK[priority][0]}-@{worker_id}"


def chunk_queue_name(model_name: str, priority: Priority, worker_id: str | None = None) -> str:
    """Where a chunk of ``priority`` goes: ``worker_id``'s own queue, else the model's shared one."""
    if worker_id is None:
        return queue_name(model_name, priority)
    return worker_queue_name(model_name, worker_id, priority)


def worker_queues(model_name: str, worker_id: str) -> list[str]:
    """A worker's own queues, highest priority first."""
    return [worker_queue_name(model_name, worker_id, priority) for priority in Priority]


def result_key(request_id: str) -> str:
    """String key holding one request's result (JSON), written once (``SET NX``)."""
    return f"{KEY_PREFIX}result:{request_id}"


def result_notify_key(request_id: str) -> str:
    """List pushed to when a request's result is written, so a waiter can ``BLPOP`` instead of polling."""
    return f"{KEY_PREFIX}result:{request_id}:notify"


def stream_key(request_id: str) -> str:
    """Stream of a streamed request's output as it is generated: ``start``, text deltas (field ``o`` the
    delta's character offset in the answer, ``t`` its text), then ``done`` written with the result. Capped
    (``MAXLEN ~``) and expiring; a view of progress, never the result itself."""
    return f"{KEY_PREFIX}stream:{request_id}"


def stream_cancel_key(request_id: str) -> str:
    """Set by a reader that stopped reading (a gateway client hung up): the worker stops generating."""
    return f"{KEY_PREFIX}stream:{request_id}:cancel"


#: Entries kept per output stream (approximately): a reader further behind than this loses deltas and is
#: given the rest of the answer from the result instead.
STREAM_MAX_ENTRIES = 10_000


def job_key(job_id: str) -> str:
    """Hash with a job's metadata and counters."""
    return f"{KEY_PREFIX}job:{job_id}"


def job_completed_stream_key(job_id: str) -> str:
    """Stream of a job's results in completion order, one entry per write call (a worker's chunk of results)."""
    return f"{KEY_PREFIX}job:{job_id}:completed"


def job_final_key(job_id: str) -> str:
    """List holding the job's final status once it has one: waiters block on it (``BRPOPLPUSH`` of the list onto
    itself, which leaves the entry for every other waiter) instead of polling the job."""
    return f"{KEY_PREFIX}job:{job_id}:final"


def worker_heartbeat_key(model_name: str, worker_id: str) -> str:
    """Expiring key a live worker refreshes; its absence means the worker is gone."""
    return f"{KEY_PREFIX}heartbeat:{model_name}:{worker_id}"


def worker_heartbeats_key(model_name: str) -> str:
    """Sorted set worker id -> when its heartbeat expires (Redis server time): live workers are counted
    with one ``ZCOUNT``, never by scanning the keyspace."""
    return f"{KEY_PREFIX}heartbeats:{model_name}"


def detected_windows_key(model_name: str) -> str:
    """Hash worker id -> the context window that worker's engine accepts (detected at its start); routing takes
    the smallest among live workers."""
    return f"{KEY_PREFIX}detected-window:{model_name}"


def reply_list_key(client_id: str) -> str:
    """List the results of a client's single requests are pushed onto (their JSON), as they are written: the
    client's one listener pops them (``inferpool.client.replies``). Expires when no client drains it."""
    return f"{KEY_PREFIX}replies:{client_id}"


#: Seconds a reply list outlives its last push (a client that died leaves nothing behind for long).
REPLY_LIST_TTL_S = 300


def hold_key(request_id: str) -> str:
    """What a single request's budget reservation holds (``nanos|spend key...``), settled with its result."""
    return f"{KEY_PREFIX}hold:{request_id}"


def job_holds_key(job_id: str) -> str:
    """Hash request id -> what its budget reservation holds (``nanos|spend key...``), settled with its result."""
    return f"{KEY_PREFIX}job:{job_id}:holds"


def job_costs_key(job_id: str) -> str:
    """Hash request id -> the most the line can cost (nano-USD), for jobs whose tenant or key has a budget."""
    return f"{KEY_PREFIX}job:{job_id}:costs"


def key_limit_keys(key_id: str) -> tuple[str, str, str]:
    """A gateway key's sliding minute of requests, of tokens (sorted sets by Redis time), and its requests in
    flight (sorted set scored by when a slot lapses if its gateway died holding it)."""
    base = f"{KEY_PREFIX}keylimit:{key_id}"
    return f"{base}:requests", f"{base}:tokens", f"{base}:inflight"


def model_availability_key(model_name: str) -> str:
    """JSON of the latest detection that found the model unavailable at its provider (expires unless renewed)."""
    return f"{KEY_PREFIX}unavailable:{model_name}"


#: Sorted set of every batch job id, scored by creation time (``batch list``).
JOBS_INDEX_KEY = f"{KEY_PREFIX}jobs"


def tenant_jobs_key(tenant: str) -> str:
    """Sorted set of one tenant's batch job ids, scored by creation time (the gateway's ``GET /v1/batches``)."""
    return f"{KEY_PREFIX}tenant:{tenant}:jobs"


#: Sorted set of the jobs the scheduler still has to drive (not yet in a final state).
JOBS_ACTIVE_KEY = f"{KEY_PREFIX}jobs:active"

#: Sorted set of the pipelines the scheduler still drives (inferpool.pipelines), scored by creation time.
PIPELINES_ACTIVE_KEY = f"{KEY_PREFIX}pipelines:active"
#: Sorted set of every pipeline id, scored by creation time (``pipeline list``).
PIPELINES_INDEX_KEY = f"{KEY_PREFIX}pipelines"


def pipeline_key(pipeline_id: str) -> str:
    """Hash of a pipeline: status, its file (JSON), rows loaded, and per step its job, the stream position its
    driver has read to, and counters (``lines:``, ``decided:``, ``skipped:``, ``blocked:`` + step name)."""
    return f"{KEY_PREFIX}pipeline:{pipeline_id}"


def pipeline_rows_key(pipeline_id: str) -> str:
    """Hash row number -> the row's columns (JSON): what later steps are rendered with."""
    return f"{KEY_PREFIX}pipeline:{pipeline_id}:rows"


def pipeline_marks_key(pipeline_id: str) -> str:
    """Hash ``<row>:<step>`` -> what was decided for that row's step (its request id, or how it ended without
    running), set once (``HSETNX``) in the script that queues the line: where "exactly once per step" lives."""
    return f"{KEY_PREFIX}pipeline:{pipeline_id}:marks"


def pipeline_outcomes_key(pipeline_id: str) -> str:
    """Hash ``<row>:<step>`` -> the step's outcome for the row (answer, usage, finish reason, error; JSON)."""
    return f"{KEY_PREFIX}pipeline:{pipeline_id}:outcomes"


def pipeline_final_key(pipeline_id: str) -> str:
    """List holding the pipeline's final status once it has one (waiters block on it, as on a job's)."""
    return f"{KEY_PREFIX}pipeline:{pipeline_id}:final"


#: Hash model -> requests of batch jobs dispatched to that model and not yet answered.
MODEL_INFLIGHT_KEY = f"{KEY_PREFIX}inflight"


def job_pending_key(job_id: str, model: str) -> str:
    """List of the request ids of a job's requests for one model that the scheduler has not dispatched yet."""
    return f"{KEY_PREFIX}job:{job_id}:pending:{model}"


def job_items_key(job_id: str) -> str:
    """Hash request id -> ``<served model>|<task item JSON>`` of a job's unanswered requests, pending or in
    flight: the one copy of each prompt. Chunks carry request ids only; a worker reads the items here, and
    the result script deletes an item with the writing of its result. The model prefix says which model
    holds the request (a fallback move rewrites it)."""
    return f"{KEY_PREFIX}job:{job_id}:items"


def job_inflight_since_key(job_id: str) -> str:
    """Sorted set request id -> when it was (last) dispatched: the job's requests in flight. The scheduler
    re-sends the stale ones."""
    return f"{KEY_PREFIX}job:{job_id}:inflight-since"


def job_usage_key(job_id: str) -> str:
    """Hash of a job's usage counters, ``<model>|<counter>`` -> value, counted once per result."""
    return f"{KEY_PREFIX}job:{job_id}:usage"


#: Tenant of requests that name none (no ``user`` field, no client tenant).
DEFAULT_TENANT = "default"

#: All-time usage counters (never expire; what the Prometheus exporter reports), same fields as a day's.
USAGE_TOTAL_KEY = f"{KEY_PREFIX}usage:total"

#: All-time latency histogram per model, over every tenant (fields ``model|bucket``): what routing by
#: "fastest" reads, bounded by models x buckets however many tenants there are.
MODEL_LATENCY_KEY = f"{KEY_PREFIX}usage:latency"
#: Hash model -> bytes its loaded model took, as measured by the first worker that loaded it (residency).
MODEL_FOOTPRINTS_KEY = f"{KEY_PREFIX}model-footprints"
#: Hash model -> seconds its last load took on a budgeted worker: the cost of a swap that placement weighs.
MODEL_LOAD_SECONDS_KEY = f"{KEY_PREFIX}model-load-seconds"
#: Hash model -> seconds its last wake from sleep took on a budgeted worker (a cheaper swap than a load).
MODEL_WAKE_SECONDS_KEY = f"{KEY_PREFIX}model-wake-seconds"

#: How long per-day usage counters are kept.
USAGE_RETENTION_S = 400 * 86400


#: Stream of dead letters: requests that failed after their retries and every fallback (``deadletters``).
DEAD_LETTERS_KEY = f"{KEY_PREFIX}dlq"

#: At most this many dead letters are kept (the oldest go first).
DEAD_LETTERS_MAX = 100_000


def usage_day_key(day: str) -> str:
    """Hash of one UTC day's usage, ``<tenant>|<model>|<counter>`` -> value (``day`` as YYYY-MM-DD)."""
    return f"{KEY_PREFIX}usage:{day}"


#: Hash SHA-256(API key) hex -> JSON ``{key_id, tenant, created_at}``: the gateway's keys. The keys themselves
#: are never stored.
API_KEYS_KEY = f"{KEY_PREFIX}apikeys"
#: Pub/sub channel on which every change of a key (revoked, new limits) is announced: gateways drop their cache.
API_KEYS_CHANGED_CHANNEL = f"{KEY_PREFIX}apikeys:changed"
#: Hash scope (``tenant:NAME``, ``key:KEY_ID``) -> its spend budget's JSON (``inferpool.state.budgets``).
BUDGETS_KEY = f"{KEY_PREFIX}budgets"
#: Hash tenant -> its weight in the fair share of each model's window (``inferpool tenants set --weight``).
TENANT_WEIGHTS_KEY = f"{KEY_PREFIX}tenant-weights"


def file_key(file_id: str) -> str:
    """Hash with an uploaded file's metadata (its bytes are in the gateway's file store)."""
    return f"{KEY_PREFIX}file:{file_id}"


def tenant_files_key(tenant: str) -> str:
    """Sorted set of one tenant's file ids, scored by upload time (``GET /v1/files``)."""
    return f"{KEY_PREFIX}tenant:{tenant}:files"


def tenant_file_bytes_key(tenant: str) -> str:
    """Bytes of one tenant's stored files (its upload quota is checked against it)."""
    return f"{KEY_PREFIX}tenant:{tenant}:file_bytes"


#: Sorted set of every uploaded file id, scored by upload time: the expiry sweep reads the oldest.
FILES_BY_AGE_KEY = f"{KEY_PREFIX}files:by_age"


# -- the response cache (its own prefix: it may live in another Redis, see INFERPOOL_CACHE_REDIS_URL) --------

CACHE_PREFIX = KEY_PREFIX + "cache:"
#: Sorted set of cached answers by the time they were stored (the oldest are evicted past the cap).
CACHE_INDEX_KEY = CACHE_PREFIX + "index"


def cache_entry_key(digest: str) -> str:
    return f"{CACHE_PREFIX}answer:{digest}"


def cache_lock_key(digest: str) -> str:
    """Held by the request computing an answer, while identical ones wait for it."""
    return f"{CACHE_PREFIX}lock:{digest}"


# -- scheduler leadership --------------------------------------------------------------------------------

#: The leader's lease: "<fencing token>|<owner>", expiring unless renewed.
SCHEDULER_LEASE_KEY = KEY_PREFIX + "scheduler:lease"
#: Counter of leaderships: each new leader's fencing token is larger than every earlier one.
SCHEDULER_FENCE_KEY = KEY_PREFIX + "scheduler:fence"


# -- provider batches (inferpool.provider_batch) ----------------------------------------------------------


def provider_batch_key(pbatch_id: str) -> str:
    """Hash: one provider batch's state (job, model, provider, state, provider file and batch ids)."""
    return f"{KEY_PREFIX}pbatch:{pbatch_id}"


def provider_batch_rids_key(pbatch_id: str) -> str:
    """List: the request ids a provider batch carries (its lines, in order)."""
    return f"{KEY_PREFIX}pbatch:{pbatch_id}:rids"


def provider_batch_lock_key(pbatch_id: str) -> str:
    """String: held by the worker advancing the provider batch now."""
    return f"{KEY_PREFIX}pbatch:{pbatch_id}:lock"


def provider_batch_create_lock_key(provider: str) -> str:
    """String: held while one provider batch of ``provider`` is being created, where creates are serialised
    (Anthropic: a batch interrupted mid-create is then told apart from others by its creation time)."""
    return f"{KEY_PREFIX}pbatch-create-lock:{provider}"


def job_provider_batches_key(job_id: str) -> str:
    """Sorted set: a job's provider batches, by creation time."""
    return f"{KEY_PREFIX}job:{job_id}:pbatches"


#: Sorted set: unfinished provider batches, scored by when their next step is due.
PROVIDER_BATCHES_DUE_KEY = f"{KEY_PREFIX}pbatches:due"
#: Sorted set: provider-side batch ids some provider batch has recorded, by time (recovery never adopts one
#: of these for another).
PROVIDER_BATCHES_CLAIMED_KEY = f"{KEY_PREFIX}pbatches:claimed"


# -- error codes a request's result can carry (besides the RequestError subclasses' own) -----------------

#: A batch line ended because its job was cancelled before it ran.
CANCELLED_CODE = "batch_cancelled"
#: A batch line ended because its job's completion window ran out before it ran.
EXPIRED_CODE = "batch_expired"
#: A batch line ended because its job failed before it ran (its upload broke off, say).
FAILED_CODE = "batch_failed"
#: A line sent ``--via provider-batch`` for a model that cannot use a provider's Batch API.
UNAVAILABLE_CODE = "provider_batch_unavailable"
#: A request (or batch line) whose most possible cost does not fit its tenant's or key's spend budget.
BUDGET_EXCEEDED_CODE = "budget_exceeded"
#: A pipeline step not run for a row because a step it uses failed for that row.
UPSTREAM_FAILED_CODE = "upstream_failed"
#: A pipeline step not run for a row because its ``when`` could not be evaluated, or its template rendered.
TEMPLATE_ERROR_CODE = "template_error"
#: A single request its client stopped reading or waiting for.
STREAM_CANCELLED_CODE = "request_cancelled"
#: A stream whose provider call was retried with a different text than the one already shown.
STREAM_RESTARTED_CODE = "stream_restarted"
#: A request whose model a worker holding several models could not load (the message says why).
MODEL_LOAD_ERROR_CODE = "model_load_error"


# -- fields of stream entries ------------------------------------------------------------------------------

#: A streamed request's output stream (``stream_key``): the worker took it (its model), a piece of text at
#: an offset, a new attempt began, the result is written.
STREAM_STARTED = "s"
STREAM_OFFSET = "o"
STREAM_TEXT = "t"
STREAM_RESTART = "r"
STREAM_DONE = "d"
#: A job's completion stream (``job_completed_stream_key``): one write call's results compressed together,
#: the positions of those not written, and one result per entry (the format before).
COMPLETED_RESULTS = "z2"
COMPLETED_SKIPPED = "s"
COMPLETED_RESULT_V1 = "z1"
