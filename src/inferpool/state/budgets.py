"""Spend budgets of tenants and gateway keys: set, reserved at admission, settled in the result's own write.

A budget is USD per window (``day`` or ``month``, UTC, or ``none``) for a scope: ``tenant:NAME`` or
``key:KEY_ID``, kept in one hash (``inferpool:budgets``). Spend lives per scope and window in a hash of two
integers in nano-USD: ``spent`` (settled) and ``held`` (reserved by requests not yet answered).

Admission reserves the most a request can cost (``inferpool.state.costs``) on every scope with a budget, in one
script: if any would pass its budget (spent + held + this > budget) nothing is reserved and the request is
refused. What a request reserved travels with it as its *hold* (``nanos|spend key|spend key``): in the
single request's item, or in its job's holds hash for a batch line. The exactly-once result script
(``inferpool.state.results``) settles a hold in the same call that writes the result: the hold leaves
``held`` and the real cost joins ``spent``. A redelivered chunk writes nothing the second time, so it settles
nothing twice; an error or a cancelled request costs 0, which releases its hold. Spend therefore never passes
a budget unless a request costs more than the most it could (a fallback to a dearer model), and what is held
too much is held only until the request's answer is written.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from collections.abc import Sequence
from typing import Any, Literal

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferpool._exceptions import ConfigurationError
from inferpool.constants import BUDGETS_KEY, KEY_PREFIX, TENANT_WEIGHTS_KEY, hold_key, job_costs_key, job_holds_key
from inferpool.plumbing.redis_connection import decode_text

#: Nano-USD per USD: spend is counted in integers, so sums are exact whatever the order.
NANOS = 1_000_000_000
SPEND_PREFIX = f"{KEY_PREFIX}spend:"
BudgetWindow = Literal["day", "month", "none"]
_BUDGET_TEXT = re.compile(r"^\s*\$?(\d+(?:\.\d+)?)\s*(?:/\s*(day|month|none))?\s*$")
#: How long a window's spend key lives after a reservation: the window, then days more for audits.
_DAY_KEY_TTL_S = 4 * 86400
_MONTH_KEY_TTL_S = 101 * 86400


class Budget(BaseModel):
    """USD a scope may spend per window."""

    model_config = ConfigDict(extra="forbid")
    usd: float = Field(ge=0, le=1e9)  # exact to the nano-dollar up to $9,007,199 (Lua counts in doubles)
    window: BudgetWindow = "month"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``50/day``, ``2000/month``, ``100`` (a month) or ``100/none`` (for ever)."""
        match = _BUDGET_TEXT.match(text)
        if match is None:
            raise ConfigurationError(f"budget {text!r} is not USD per window: write e.g. 50/day, 2000/month, 100/none")
        try:
            return cls(usd=float(match.group(1)), window=match.group(2) or "month")
        except ValidationError:
            raise ConfigurationError(f"budget {text!r}: at most $1,000,000,000 per window") from None

    @property
    def nanos(self) -> int:
        return math.floor(self.usd * NANOS)

    def describe(self) -> str:
        return f"${self.usd:g}/{self.window}"


def to_nanos(usd: float) -> int:
    """A cost in nano-USD, rounded as the result script rounds it."""
    return math.floor(usd * NANOS + 0.5)


def period(window: str, now: dt.datetime | None = None) -> str:
    """The label of the current window: ``day:2026-12-05``, ``month:2026-12`` or ``none``."""
    now = now or dt.datetime.now(dt.UTC)
    if window == "day":
        return f"day:{now:%Y-%m-%d}"
    if window == "month":
        return f"month:{now:%Y-%m}"
    return "none"


def spend_key(scope: str, window: str, now: dt.datetime | None = None) -> str:
    return f"{SPEND_PREFIX}{scope}:{period(window, now)}"


# Settling one hold inside another script: ``hold`` is 'nanos|key|key...', ``cost`` the real cost in nano-USD.
LUA_SETTLE = """
local function settle_hold(hold, cost)
  local amount = nil
  for part in string.gmatch(hold, '[^|]+') do
    if amount == nil then
      amount = part
    else
      redis.call('HINCRBY', part, 'held', '-' .. amount)
      redis.call('HINCRBY', part, 'spent', string.format('%d', cost))
    end
  end
end
"""

# Reserving: KEYS[1] the budgets hash, KEYS[2] a job's holds hash (or anything, for single requests). ARGV: day
# label, month label, spend key prefix, hold lifetime (s), then triples for each request: its scopes (','-separated),
# the amount in nano-USD, and where its hold is kept: 'k:KEY' (a single request's own key, set to expire) or
# 'h:REQUEST_ID' (the job's holds hash). One that already holds is skipped: reserving is idempotent.
# Returns, per request, its hold ('' when nothing was reserved: no budget, or free) or '!scope|budget|spent|held'.
_RESERVE = (
    """
local labels = {day = ARGV[1], month = ARGV[2], none = 'none'}
local prefix, hold_ttl = ARGV[3], ARGV[4]
local out = {}
local configs = {}
local function config(scope)
  if configs[scope] == nil then
    local raw = redis.call('HGET', KEYS[1], scope)
    configs[scope] = raw and cjson.decode(raw) or false
  end
  return configs[scope]
end
local function holding(dest)
  if dest == '' then return false end
  if string.sub(dest, 1, 2) == 'k:' then return redis.call('EXISTS', string.sub(dest, 3)) == 1 end
  return redis.call('HEXISTS', KEYS[2], string.sub(dest, 3)) == 1
end
for i = 5, #ARGV, 3 do
  local scopes, amount, dest = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local keys, refused = {}, ''
  if amount <= 0 or holding(dest) then
    out[#out + 1] = ''
  else
    for scope in string.gmatch(scopes, '[^,]+') do
      local c = config(scope)
      if c then
        local key = prefix .. scope .. ':' .. labels[c.window]
        local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
        local held = tonumber(redis.call('HGET', key, 'held') or '0')
        local limit = math.floor(c.usd * 1000000000)
        if refused == '' and spent + held + amount > limit then
          refused = string.format('%s|%d|%d|%d', scope, limit, spent, held)
        end
        keys[#keys + 1] = {key, c.window}
      end
    end
    if refused == '' and #keys > 0 then
      local hold = string.format('%d', amount)
      for _, k in ipairs(keys) do
        redis.call('HINCRBY', k[1], 'held', hold)
        if k[2] == 'day' then redis.call('EXPIRE', k[1], """
    + str(_DAY_KEY_TTL_S)
    + """)
        elseif k[2] == 'month' then redis.call('EXPIRE', k[1], """
    + str(_MONTH_KEY_TTL_S)
    + """) end
        hold = hold .. '|' .. k[1]
      end
      if string.sub(dest, 1, 2) == 'k:' then
        redis.call('SET', string.sub(dest, 3), hold, 'EX', hold_ttl)
      elseif dest ~= '' then
        redis.call('HSET', KEYS[2], string.sub(dest, 3), hold)
        redis.call('EXPIRE', KEYS[2], hold_ttl)
      end
      out[#out + 1] = hold
    else
      out[#out + 1] = refused == '' and '' or ('!' .. refused)
    end
  end
end
return out
"""
)


class Refused(BaseModel):
    """Why a reservation was refused: the scope whose budget it would pass, and where that scope stands."""

    scope: str
    budget_nanos: int
    spent_nanos: int
    held_nanos: int
    wanted_nanos: int

    def message(self) -> str:
        left = max(0, self.budget_nanos - self.spent_nanos - self.held_nanos) / NANOS
        what = self.scope.replace(":", " ", 1)
        return (f"{what} has ${left:.6f} left of its budget of ${self.budget_nanos / NANOS:g} this window (spent "
                f"${self.spent_nanos / NANOS:.6f}, ${self.held_nanos / NANOS:.6f} held by requests in flight); this "
                f"request may cost up to ${self.wanted_nanos / NANOS:.6f}. Lower max_tokens, or ask an operator to "
                "raise the budget (`inferpool tenants set`)")  # fmt: skip


def _reserve_args(requests: Sequence[tuple[Sequence[str], int, str]], hold_ttl_s: int) -> list[str | int]:
    now = dt.datetime.now(dt.UTC)
    args: list[str | int] = [period("day", now), period("month", now), SPEND_PREFIX, hold_ttl_s]
    for scopes, amount, rid in requests:
        args += [",".join(scopes), amount, rid]
    return args


def _answers(raw: Any, requests: Sequence[tuple[Sequence[str], int, str]]) -> list[str | Refused]:
    """Per request: its hold ('' if nothing was reserved) or the ``Refused``."""
    out: list[str | Refused] = []
    for answer, (_scopes, amount, _rid) in zip(raw, requests, strict=True):
        text = decode_text(answer)
        if text.startswith("!"):
            scope, budget, spent, held = text[1:].rsplit("|", 3)
            out.append(Refused(scope=scope, budget_nanos=int(budget), spent_nanos=int(spent), held_nanos=int(held),
                               wanted_nanos=amount))  # fmt: skip
        else:
            out.append(text)
    return out


class Budgets:
    """Setting and reading budgets, and reserving against them (sync: the CLI, the client, the scheduler)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(_RESERVE)

    def set(self, scope: str, budget: Budget | None) -> None:
        """Give ``scope`` a budget (None: none); admissions use it from their next request."""
        if budget is None:
            self._redis.hdel(BUDGETS_KEY, scope)
        else:
            self._redis.hset(BUDGETS_KEY, scope, budget.model_dump_json())

    def all(self) -> dict[str, Budget]:
        return {decode_text(k): Budget.model_validate_json(v) for k, v in self._redis.hgetall(BUDGETS_KEY).items()}

    def standing(self, scopes: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Where each budget stands this window (of ``scopes``, or all), in USD: what ``inferpool tenants``, the
        gateway's costs answer and audits show."""
        configured = self.all()
        rows = []
        for scope in sorted(configured) if scopes is None else [s for s in scopes if s in configured]:
            budget = configured[scope]
            spent, held = self.spend(scope, budget)
            left = max(0, budget.nanos - spent - held)
            rows.append({"scope": scope, "budget_usd": budget.usd, "window": budget.window, "spent_usd": spent / NANOS,
                         "held_usd": held / NANOS, "left_usd": left / NANOS})  # fmt: skip
        return rows

    def spend(self, scope: str, budget: Budget) -> tuple[int, int]:
        """(spent, held) of ``scope`` in its current window, in nano-USD."""
        values: Any = self._redis.hmget(spend_key(scope, budget.window), ["spent", "held"])
        return int(values[0] or 0), int(values[1] or 0)

    def reserve(self, requests: Sequence[tuple[Sequence[str], int, str]], hold_ttl_s: int,
                holds_key: str = "") -> list[str | Refused]:  # fmt: skip
        """Reserve each (scopes, nano-USD, where its hold goes: ``single_hold(request_id)`` or ``job_hold(request
        id)`` into ``holds_key``) in order, in one call."""
        if not requests:
            return []
        raw = self._reserve(keys=[BUDGETS_KEY, holds_key or BUDGETS_KEY], args=_reserve_args(requests, hold_ttl_s))
        return _answers(raw, requests)

    def reserve_lines(self, job_id: str, scopes: Sequence[str], request_ids: Sequence[str], hold_ttl_s: int,
                      *, batch_price: bool = False) -> dict[str, Refused]:  # fmt: skip
        """Reserve a job's lines as they are dispatched (the most each can cost was stored at upload; at the batch
        price for lines going to a provider's Batch API); returns the refused ones. Lines that already hold
        (re-sent) are not reserved again."""
        costs: Any = self._redis.hmget(job_costs_key(job_id), list(request_ids))
        wanted = [(scopes, _line_cost(cost, batch_price), job_hold(rid))
                  for rid, cost in zip(request_ids, costs, strict=True)]  # fmt: skip
        answers = self.reserve(wanted, hold_ttl_s, job_holds_key(job_id))
        return {rid: answer for rid, answer in zip(request_ids, answers, strict=True) if isinstance(answer, Refused)}


def _line_cost(stored: bytes | str | None, batch_price: bool) -> int:
    """A line's stored most-possible cost ('REALTIME' or 'REALTIME,BATCH'); the real-time one when no batch one."""
    if not stored:
        return 0
    parts = decode_text(stored).split(",")
    return int(parts[1] if batch_price and len(parts) > 1 else parts[0])


class AsyncBudgets:
    """``Budgets.reserve`` on an asyncio client (``AsyncClient``, the gateway)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._reserve = client.register_script(_RESERVE)

    async def reserve(self, requests: Sequence[tuple[Sequence[str], int, str]], hold_ttl_s: int) -> list[str | Refused]:
        if not requests:
            return []
        raw = await self._reserve(keys=[BUDGETS_KEY, BUDGETS_KEY], args=_reserve_args(requests, hold_ttl_s))
        return _answers(raw, requests)


def single_hold(request_id: str) -> str:
    """Where a single request's hold is kept (its own key; the result script settles and deletes it)."""
    return f"k:{hold_key(request_id)}"


def job_hold(request_id: str) -> str:
    """Where a batch line's hold is kept (its job's holds hash, ``job_holds_key``)."""
    return f"h:{request_id}"


_RELEASE = (
    LUA_SETTLE
    + """
local hold = redis.call('GET', KEYS[1])
if hold then
  redis.call('DEL', KEYS[1])
  settle_hold(hold, 0)
end
"""
)


def release_single(client: redis.Redis, request_id: str) -> None:
    """Give back a single request's hold at no cost (it was never sent)."""
    client.eval(_RELEASE, 1, hold_key(request_id))


class TenantWeights:
    """Tenants' weights in the fair share of each model's window (default 1), read at most every 2 s."""

    def __init__(self, client: redis.Redis, refresh_s: float = 2.0) -> None:
        self._redis = client
        self._refresh_s = refresh_s
        self._cached: dict[str, float] = {}
        self._read_at = float("-inf")

    def set(self, tenant: str, weight: float | None) -> None:
        if weight is None:
            self._redis.hdel(TENANT_WEIGHTS_KEY, tenant)
        else:
            self._redis.hset(TENANT_WEIGHTS_KEY, tenant, repr(float(weight)))

    def all(self) -> dict[str, float]:
        return {decode_text(k): float(v) for k, v in self._redis.hgetall(TENANT_WEIGHTS_KEY).items()}

    def read(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._read_at > self._refresh_s:
            self._cached, self._read_at = self.all(), now
        return self._cached


def scopes_of(tenant: str | None, key_id: str | None = None) -> list[str]:
    """The scopes a request's spend counts against."""
    scopes = [f"tenant:{tenant}"] if tenant else []
    return scopes + ([f"key:{key_id}"] if key_id else [])
