"""Job records in Redis: state, progress, idempotency keys, cancel flags and the one-runner lock.

Celery moves the messages; these records are what the Jobs API reads and what makes a job safe to
deliver more than once:

- ``<p>:job:<id>`` (hash): kind, state, request (JSON), progress fields, executions, error, ...
- ``<p>:jobs`` (sorted set, by creation time) for listing; ``<p>:jobs:running`` (set) for recovery.
- ``<p>:key:<idempotency key>`` -> job id.
- ``<p>:job:<id>:lock`` -> the token of the one execution allowed to run the job, with a TTL that a
  heartbeat renews. A dead worker's lock expires, and only then may the job run again.
- ``<p>:job:<id>:events`` (pub/sub channel): a ping after every change, for watchers.
- ``<p>:claims`` (hash: delivery tag -> job id) and ``<p>:claim:<tag>`` (with a TTL): a message a
  worker received and has not started yet, so a worker that dies in between is noticed too.

State changes that must not race are Lua scripts (atomic in Redis).
"""
from __future__ import annotations

import functools
import json
import time
import uuid

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from internlm_core.errors import AlreadyExists
from internlm_core.store import check_job_id

from .settings import LIMITS

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)  # a record's states; a test holds the proto's JobState to them
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATE_PREFIX = "JOB_STATE_"


def state_enum_name(state: str) -> str:
    """The proto ``JobState`` value's name for a record's state (either case): ``JOB_STATE_QUEUED``."""
    return STATE_PREFIX + state.upper()


KEY_TTL_S = 30 * 24 * 3600  # idempotency keys are remembered this long

# KEYS: job hash, index, idempotency key (or ""); ARGV: id, created, key ttl, then field/value pairs.
_CREATE = """
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {existing, 0} end
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return {ARGV[1], 1}
"""
# KEYS: job hash, running set; ARGV: id, now. Queued -> cancelled at once; running -> flag only.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'QUEUED' then
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'cancel', '1', 'finished', ARGV[2], 'message', 'cancelled while queued')
elseif state == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'message', 'cancel requested')
end
return redis.call('HGET', KEYS[1], 'state')
"""
# The heartbeat's renewal. KEYS: lock, job hash; ARGV: token, ttl ms, the execution's "alive" field,
# now, stall seconds (0 = no watchdog). 1: renewed; 0: not ours any more; -1: the job's own thread
# has shown no sign of life for the stall time, so the lock is let go (the sweep re-queues the job).
HOLD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local stall = tonumber(ARGV[5])
if stall > 0 then
  local alive = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or ARGV[4])
  if tonumber(ARGV[4]) - alive > stall then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'stalled', 'no progress for ' .. ARGV[5] .. ' s (worker hung)')
    return -1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: job hash, lock, running set; ARGV: id, token, field/value pairs. Only the lock holder may
# end a job, so a worker that lost its lock (presumed dead, job re-run) cannot overwrite the result.
_FINISH = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
# KEYS: job hash, lock, running set; ARGV: id, now, most losses (0 = no limit). A running job whose
# lock expired lost its worker (or hung: then the heartbeat left the reason in 'stalled'). It is
# re-queued (1), unless its executions have now lost their worker the most times allowed: a job
# that gets its worker killed (the kernel's OOM killer) would go round the workers forever, so it
# ends FAILED (2) with the reason.
_REQUEUE_IF_DEAD = """
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 0
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local why = redis.call('HGET', KEYS[1], 'stalled') or 'worker lost'
redis.call('HDEL', KEYS[1], 'stalled')
redis.call('SREM', KEYS[3], ARGV[1])
local lost = redis.call('HINCRBY', KEYS[1], 'requeues', 1)
local most = tonumber(ARGV[3])
if most > 0 and lost >= most then
  redis.call('HSET', KEYS[1], 'state', 'FAILED', 'message', 'failed', 'finished', ARGV[2], 'error',
             'its worker was lost ' .. lost .. ' times (killed, e.g. out of memory, or hung; last: ' .. why ..
             '); not re-queued again (at most ' .. most .. ' deliveries)')
  return 2
end
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'message', why .. '; re-queued', 'requeued', ARGV[2])
return 1
"""
REQUEUED, GAVE_UP = 1, 2  # what _REQUEUE_IF_DEAD did


class KeyReused(AlreadyExists):
    """An idempotency key already used for a different request."""


def canonical(request: dict) -> str:
    return json.dumps(request, sort_keys=True, separators=(",", ":"))


def connect(url: str, aio: bool = False) -> redis.Redis | redis.asyncio.Redis:
    """A client that rides out a Redis restart of a few seconds (retries with backoff); ``aio``: a
    ``redis.asyncio`` one, for the event loop that first uses it."""
    client, retry = (redis.asyncio.Redis, AsyncRetry) if aio else (redis.Redis, Retry)
    return client.from_url(url, decode_responses=True, socket_connect_timeout=2,
                           retry=retry(ExponentialBackoff(cap=1.0, base=0.05), 20),
                           retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])


class JobRecords:
    def __init__(self, redis_url: str, prefix: str = "internlm", client: redis.Redis | None = None):
        self.r = client or connect(redis_url)
        self.url, self.p = redis_url, prefix
        self._create = self.r.register_script(_CREATE)
        self._cancel = self.r.register_script(_CANCEL)
        self._release = self.r.register_script(_RELEASE)
        self._finish = self.r.register_script(_FINISH)
        self._requeue = self.r.register_script(_REQUEUE_IF_DEAD)

    # ---- keys --------------------------------------------------------------------------------
    # A job id is the suffix of several keys (its hash, lock, curve, channel): only plain ids
    # (store.check_job_id) pass, so that an id such as "<id>:lock" never names another key.
    def key(self, job_id: str) -> str:
        return f"{self.p}:job:{check_job_id(job_id)}"

    def lock_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:lock"

    def idempotency_key(self, key: str) -> str:
        return f"{self.p}:key:{check_idempotency_key(key)}"

    def curve_key(self, job_id: str) -> str:
        return f"{self.key(job_id)}:curve"

    def channel(self, job_id: str) -> str:
        return f"{self.key(job_id)}:events"

    @property
    def index(self) -> str:
        return f"{self.p}:jobs"

    @property
    def running(self) -> str:
        return f"{self.p}:jobs:running"

    # ---- create / read -----------------------------------------------------------------------
    def create(self, kind: str, request: dict, output: str, idempotency_key: str = "") -> tuple[dict, bool]:
        """A new QUEUED record, or the existing one for the same idempotency key: (record, created)."""
        job_id, now = uuid.uuid4().hex, time.time()
        fields = {"id": job_id, "kind": kind, "state": QUEUED, "request": canonical(request), "output": output,
                  "key": idempotency_key, "created": repr(now), "executions": "0", "message": "queued"}
        flat = [x for kv in fields.items() for x in kv]
        idem = self.idempotency_key(idempotency_key) if idempotency_key else ""
        got_id, created = self._create(keys=[self.key(job_id), self.index, idem],
                                       args=[job_id, repr(now), KEY_TTL_S, *flat])
        rec = self.get(got_id)
        if not created and rec is not None and rec["request"] != fields["request"]:
            raise KeyReused(f"idempotency key {idempotency_key!r} was already used for a different request "
                            f"(job {got_id})")
        if rec is None:  # the key outlived its job record (deleted by hand): refuse rather than guess
            raise KeyReused(f"idempotency key {idempotency_key!r} names job {got_id}, which no longer exists")
        return rec, bool(created)

    def get(self, job_id: str) -> dict | None:
        rec = self.r.hgetall(self.key(job_id))
        return rec or None

    def for_key(self, idempotency_key: str) -> dict | None:
        """The record of the job that an idempotency key names, if any."""
        job_id = self.r.get(self.idempotency_key(idempotency_key))
        return self.get(job_id) if job_id else None

    def subscribe(self, job_id: str):
        """A pub/sub subscription to the job's change pings (``get_message`` wakes on each)."""
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.channel(job_id))
        return pubsub

    # ---- the same reads on an event loop (the endpoint's watchers: a task each, no thread) ------
    @functools.cached_property
    def aio(self) -> redis.asyncio.Redis:
        """A ``redis.asyncio`` client on the same Redis, made at first use: for that one event loop."""
        return connect(self.url, aio=True)

    async def get_async(self, job_id: str) -> dict | None:
        rec = await self.aio.hgetall(self.key(job_id))
        return rec or None

    async def subscribe_async(self, job_id: str):
        """``subscribe`` on the event loop (``await get_message`` wakes on each ping)."""
        pubsub = self.aio.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.channel(job_id))
        return pubsub

    def list(self, state: str | None = None, kind: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first."""
        out, start, page = [], 0, 200
        while len(out) < limit:
            ids = self.r.zrevrange(self.index, start, start + page - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self.key(i))
            for rec in pipe.execute():
                if rec and (not state or rec.get("state") == state) and (not kind or rec.get("kind") == kind):
                    out.append(rec)
            start += page
        return out[:limit]

    # ---- changes -----------------------------------------------------------------------------
    def update(self, job_id: str, notify: bool = True, **fields) -> None:
        pipe = self.r.pipeline(transaction=False)  # one round trip
        pipe.hset(self.key(job_id), mapping={k: _str(v) for k, v in fields.items()})
        if notify:
            pipe.publish(self.channel(job_id), "1")
        pipe.execute()

    def record_loss(self, job_id: str, step: int, loss: float) -> None:
        """One training step's loss (a step replayed after a resume overwrites its own point)."""
        self.r.hset(self.curve_key(job_id), str(int(step)), repr(float(loss)))

    def loss_curve(self, job_id: str) -> list[tuple[int, float]]:
        return sorted((int(s), float(v)) for s, v in self.r.hgetall(self.curve_key(job_id)).items())

    def notify(self, job_id: str) -> None:
        self.r.publish(self.channel(job_id), "1")

    def put_back(self, job_id: str, message: str) -> None:
        """RUNNING -> QUEUED by its own execution (a worker stopping), to be resumed by the next."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key(job_id), mapping={"state": QUEUED, "message": message})
        pipe.srem(self.running, job_id)
        pipe.publish(self.channel(job_id), "1")
        pipe.execute()

    def request_cancel(self, job_id: str) -> str | None:
        """The job's state after asking it to stop (None: no such job)."""
        state = self._cancel(keys=[self.key(job_id), self.running], args=[job_id, repr(time.time())])
        if state:
            self.notify(job_id)
        return state

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel") == "1"

    def check(self, job_id: str, token: str, alive: str | None = None) -> tuple[bool, bool]:
        """(cancel requested, ``token`` still holds the lock), in one round trip; stamps the time in
        the field ``alive`` (the execution's sign of life, which the heartbeat's watchdog reads)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(self.key(job_id), "cancel")
        pipe.get(self.lock_key(job_id))
        if alive:
            pipe.hset(self.key(job_id), alive, repr(time.time()))
        cancel, holder = pipe.execute()[:2]
        return cancel == "1", holder == token

    # ---- the one-runner lock -----------------------------------------------------------------
    def acquire(self, job_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.r.set(self.lock_key(job_id), token, nx=True, px=int(ttl_s * 1000)))

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[self.lock_key(job_id)], args=[token])

    # ---- received, not yet started ------------------------------------------------------------
    def claim(self, delivery_tag: str, job_id: str, ttl_s: float) -> None:
        """A worker received the job's message and has not started it: if it dies before it does
        (no lock, no RUNNING state yet), the claim expires and a sweep puts the message back."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self.claim_key(delivery_tag), job_id, px=int(ttl_s * 1000))
        pipe.hset(self.claims, delivery_tag, job_id)
        pipe.execute()

    def unclaim(self, delivery_tag: str) -> bool:
        """Drop a claim; True for the one caller that removed it."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(self.claims, delivery_tag)
        pipe.delete(self.claim_key(delivery_tag))
        return bool(pipe.execute()[0])

    def expired_claims(self) -> dict[str, str]:
        """{delivery tag: job id} of the claims whose worker died before starting the job."""
        claims = self.r.hgetall(self.claims)
        pipe = self.r.pipeline(transaction=False)
        for tag in claims:
            pipe.exists(self.claim_key(tag))
        return {tag: job for (tag, job), alive in zip(claims.items(), pipe.execute()) if not alive}

    def claim_key(self, delivery_tag: str) -> str:
        return f"{self.p}:claim:{delivery_tag}"

    @property
    def claims(self) -> str:
        return f"{self.p}:claims"

    # ---- executions --------------------------------------------------------------------------
    def start_execution(self, job_id: str, worker: str, delivery_tag: str = "") -> int:
        """Mark RUNNING and count this execution; returns its number (1 for the first). The delivery
        tag names the broker message to put back if this execution's worker dies."""
        now = repr(time.time())
        pipe = self.r.pipeline()
        pipe.hincrby(self.key(job_id), "executions", 1)
        pipe.hsetnx(self.key(job_id), "started", now)
        pipe.hset(self.key(job_id), mapping={"state": RUNNING, "worker": worker, "delivery_tag": delivery_tag})
        pipe.sadd(self.running, job_id)
        n = pipe.execute()[0]
        self.update(job_id, message="started" if n == 1 else f"resumed (execution {n})",
                    **{f"exec:{n}:start": now, f"exec:{n}:beat": now, alive_field(n): now,
                       f"exec:{n}:worker": worker})
        return n

    def end_execution(self, job_id: str, execution: int, token: str) -> None:
        """Stamp the execution's end and let go of the lock (if still ours), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(self.key(job_id), f"exec:{execution}:end", repr(time.time()))
        self._release(keys=[self.lock_key(job_id)], args=[token], client=pipe)
        pipe.execute()

    def finish(self, job_id: str, token: str, state: str, **fields) -> bool:
        """End the job (only the lock holder can); False if this execution no longer holds the lock."""
        fields = {"state": state, "finished": time.time(), **fields}
        flat = [x for k, v in fields.items() for x in (k, _str(v))]
        pipe = self.r.pipeline(transaction=False)
        self._finish(keys=[self.key(job_id), self.lock_key(job_id), self.running], args=[job_id, token, *flat],
                     client=pipe)
        pipe.publish(self.channel(job_id), "1")  # a spurious ping if refused: watchers just re-read
        return bool(pipe.execute()[0])

    def requeue_if_dead(self, job_id: str, max_deliveries: int = 0) -> int:
        """RUNNING with an expired lock -> QUEUED (REQUEUED: this caller must re-deliver it), or
        FAILED once its worker was lost ``max_deliveries`` times (GAVE_UP); 0 when it was not dead."""
        done = int(self._requeue(keys=[self.key(job_id), self.lock_key(job_id), self.running],
                                 args=[job_id, repr(time.time()), int(max_deliveries)]) or 0)
        if done:
            self.notify(job_id)
        return done

    def prune(self, older_than_s: float, batch: int = 500) -> int:
        """Delete the records of jobs that ended more than ``older_than_s`` ago; how many went.
        Oldest first by creation time; a job still queued or running is never touched."""
        cutoff, gone, start = time.time() - older_than_s, 0, 0
        while True:
            ids = self.r.zrangebyscore(self.index, "-inf", repr(cutoff), start=start, num=batch)
            if not ids:
                return gone
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.key(i), "state", "finished", "key")
            found = dict(zip(ids, pipe.execute()))
            old = [i for i, (state, finished, _) in found.items()
                   if state is None or (state in FINAL and float(finished or 0) < cutoff)]
            if old:
                pipe = self.r.pipeline(transaction=False)
                pipe.delete(*(self.key(i) for i in old), *(self.curve_key(i) for i in old))
                pipe.zrem(self.index, *old)
                for i in old:  # its idempotency key would name a job that no longer exists
                    if found[i][2]:  # as stored (not checked again: it may predate the limit)
                        pipe.delete(f"{self.p}:key:{found[i][2]}")
                pipe.execute()
                gone += len(old)
            start += batch - len(old)

    def running_ids(self) -> list[str]:
        return sorted(self.r.smembers(self.running))

    def executions(self, job_id: str) -> list[dict]:
        """Each execution's start, last heartbeat and worker (for checks that none overlapped)."""
        rec = self.get(job_id) or {}
        return [{"start": float(rec[f"exec:{n}:start"]), "beat": float(rec.get(f"exec:{n}:beat", 0)),
                 "end": float(rec.get(f"exec:{n}:end", 0)), "worker": rec.get(f"exec:{n}:worker", "")}
                for n in range(1, int(rec.get("executions", 0)) + 1) if f"exec:{n}:start" in rec]


def check_idempotency_key(key: str) -> str:
    """An idempotency key is printable text of at most LIMITS["idempotency_key"] characters."""
    most = LIMITS["idempotency_key"]
    if not isinstance(key, str) or not key or len(key) > most or not key.isprintable():
        shown = key if not isinstance(key, str) or len(key) <= 40 else key[:40] + "..."
        raise ValueError(f"idempotency_key {shown!r} must be 1 to {most} printable characters")
    return key


def alive_field(execution: int) -> str:
    """The job hash field where execution ``execution`` stamps its sign of life."""
    return f"exec:{execution}:alive"


def _str(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)
