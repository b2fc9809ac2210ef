"""The ledger of messages pushed but not yet taken: what its sweep keeps, drops and requeues.

Real Redis, real producer (the SDK); the "worker" steps are done by hand with the same
commands kombu sends, so that each case is exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from producers import Client
from tasks.broker import MAX_REQUEUES, PURGE_REASON, adopt_old_priority_lists, sweep_ledger
from tasks.keys import (
    KOMBU_UNACKED,
    LEDGER_INDEX_KEY,
    LEDGER_KEY,
    LEDGER_STATS_KEY,
    LEDGER_SUSPECTS_KEY,
    lease_key,
    log_key,
    old_priority_lists,
    priority_list,
    queue_name,
    task_key,
)
from tasks.settings import load_settings
from tests.wire_support import announce_idle_worker, old_priority_connection

DB = 4
MODEL = "unserved-ledger"


@pytest.fixture
def isolated(redis_server) -> Iterator[tuple[Client, redis.Redis]]:
    url = f"redis://{redis_server.host}:{redis_server.port}/{DB}"
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    announce_idle_worker(raw, MODEL, slots=100)  # every task is released, and stays there
    with Client(settings=load_settings(redis_url=url)) as client:
        yield client, raw
    raw.flushdb()
    raw.close()


def only_tag(raw: redis.Redis) -> str:
    tags = raw.hkeys(LEDGER_KEY)
    assert len(tags) == 1
    return tags[0].decode()


def test_a_queued_message_is_in_the_ledger_and_stays_queued(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "wait your turn")
    tag = only_tag(raw)
    queue_key, message = json.loads(raw.hget(LEDGER_KEY, tag))
    assert queue_key == queue_name(MODEL)
    assert raw.lrange(queue_key, 0, -1) == [message.encode()]
    for _ in range(2):
        assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])
    assert raw.llen(queue_key) == 1 and not raw.hlen(LEDGER_SUSPECTS_KEY)


def test_a_recorded_message_leaves_the_ledger(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "taken")
    tag = only_tag(raw)
    raw.rpop(queue_name(MODEL))
    raw.hset(KOMBU_UNACKED, tag, "[]")  # a worker recorded it after all (late)
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])
    assert not raw.hlen(LEDGER_KEY) and not raw.zcard(LEDGER_INDEX_KEY)


def test_a_message_lost_between_pop_and_record_is_queued_again(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "lost")
    tag = only_tag(raw)
    message = raw.rpop(queue_name(MODEL))  # popped by a worker that then died
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])  # first sight
    assert raw.hexists(LEDGER_SUSPECTS_KEY, tag) and raw.llen(queue_name(MODEL)) == 0
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([tag], [])
    assert raw.lrange(queue_name(MODEL), 0, -1) == [message]
    assert not raw.hexists(LEDGER_SUSPECTS_KEY, tag)
    assert raw.hget(LEDGER_STATS_KEY, "requeued") == b"1"  # corral_messages_recovered_total


def test_missing_only_just_now_is_not_requeued(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "being recorded")
    raw.rpop(queue_name(MODEL))
    sweep_ledger(raw, older_than_s=0)
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=60) == ([], [])
    assert raw.llen(queue_name(MODEL)) == 0


def test_young_entries_are_not_examined(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "just sent")
    raw.rpop(queue_name(MODEL))
    for _ in range(2):
        assert sweep_ledger(raw, older_than_s=60, confirm_after_s=0) == ([], [])
    assert not raw.hlen(LEDGER_SUSPECTS_KEY)


def test_a_message_that_keeps_vanishing_is_given_up(isolated) -> None:
    client, raw = isolated
    client.generate(MODEL, "eaten by a foreign consumer")
    tag = only_tag(raw)
    for _ in range(MAX_REQUEUES):
        raw.rpop(queue_name(MODEL))
        sweep_ledger(raw, older_than_s=0, confirm_after_s=0)
        assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([tag], [])
    raw.rpop(queue_name(MODEL))
    sweep_ledger(raw, older_than_s=0, confirm_after_s=0)
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [tag])
    assert not raw.hlen(LEDGER_KEY) and raw.llen(queue_name(MODEL)) == 0


def test_a_purged_queue_stays_purged(isolated) -> None:
    client, raw = isolated
    for i in range(3):
        client.generate(MODEL, f"purge me {i}")
    with client.app.connection_for_write() as connection:
        assert connection.default_channel.queue_purge(queue_name(MODEL)) == 3
    assert not raw.hlen(LEDGER_KEY) and not raw.zcard(LEDGER_INDEX_KEY)
    for _ in range(2):
        assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])
    assert raw.llen(queue_name(MODEL)) == 0


def logged(raw: redis.Redis, task_id: str) -> list[dict]:
    return [json.loads(fields[b"e"]) for _id, fields in raw.xrange(log_key(task_id))]


def test_a_purge_ends_each_task_it_drops_exactly_once(isolated) -> None:
    client, raw = isolated
    queued, lost, leased, done, cancelled = (client.generate(MODEL, f"t{i}") for i in range(5))
    # `lost`: its worker died after two events and the message came back; `leased`: delivered
    # again while a live worker still runs it; `done`: redelivered after it finished.
    for job, state in ((lost, "running"), (leased, "running"), (done, "succeeded")):
        raw.hset(task_key(job.id), "state", state)
    for seq, kind in enumerate(["start", "token"]):
        event = {"task_id": lost.id, "seq": seq, "type": kind}
        raw.xadd(log_key(lost.id), {"e": json.dumps(event)})
    raw.set(lease_key(leased.id), "another worker")
    raw.xadd(log_key(done.id), {"e": json.dumps({"task_id": done.id, "seq": 0, "type": "done"})})
    assert cancelled.cancel() == "cancelled"  # its message stays queued; its stream has ended

    with client.app.connection_for_write() as connection:  # what `celery purge` calls
        assert connection.default_channel.queue_purge(queue_name(MODEL)) == 5
    purged = {"type": "cancelled", "reason": PURGE_REASON}
    assert logged(raw, queued.id) == [{"task_id": queued.id, "seq": 0, **purged}]
    assert logged(raw, lost.id)[2:] == [{"task_id": lost.id, "seq": 2, **purged}]
    assert 0 < raw.ttl(log_key(queued.id)) <= client.settings.stream_ttl_s
    assert [e["type"] for e in logged(raw, cancelled.id)] == ["cancelled"]
    assert [e["type"] for e in logged(raw, done.id)] == ["done"] and not logged(raw, leased.id)
    states = {
        job.id: raw.hget(task_key(job.id), "state").decode()
        for job in (queued, lost, leased, done, cancelled)
    }
    assert states == {
        queued.id: "cancelled",
        lost.id: "cancelled",
        leased.id: "running",
        done.id: "succeeded",
        cancelled.id: "cancelled",
    }
    assert [e["type"] for e in queued.stream(timeout=5)] == ["cancelled"]
    assert not raw.hlen(LEDGER_KEY) and raw.llen(queue_name(MODEL)) == 0


def test_the_channel_reuses_one_client_per_connection_pool(isolated) -> None:
    """kombu would build a client object per command (each ack, record and publish)."""
    client, raw = isolated
    with client.app.connection_for_write() as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second and first.connection_pool is channel.pool
        channel._disconnect_pools()  # after a fork, or a lost connection: a new pool
        with channel.conn_or_acquire() as third:
            assert third is not first and third.connection_pool is channel.pool
            assert third.ping()
        given = redis.Redis.from_url(client.settings.redis_url)
        with channel.conn_or_acquire(given) as passed:
            assert passed is given
        given.close()


def send_raw(
    client: Client, prompt: str, priority: int, connection: Connection | None = None
) -> str:
    """A task sent around the scheduler with a Celery priority, as another app would; its id."""
    payload = {"model": MODEL, "prompt": prompt}
    sent = client.app.send_task(
        "corral.generate",
        kwargs={"payload": payload},
        queue=queue_name(MODEL),
        priority=priority,
        connection=connection,
    )
    return str(sent.id)


def test_a_message_sent_with_a_celery_priority_goes_on_the_queue_itself(isolated) -> None:
    client, raw = isolated
    for priority in (0, 5, 9):
        send_raw(client, f"priority {priority}", priority)
    queue = queue_name(MODEL)
    assert raw.llen(queue) == 3 and not raw.exists(*old_priority_lists(queue))
    assert {json.loads(entry)[0] for entry in raw.hvals(LEDGER_KEY)} == {queue}


def test_messages_left_in_old_priority_sublists_move_onto_the_queue(isolated) -> None:
    client, raw = isolated
    queue, other = queue_name(MODEL), queue_name("another-model")
    with old_priority_connection(client.app) as connection:
        lost = send_raw(client, "popped, never recorded", 9, connection)
        raw.rpop(priority_list(queue, 9))  # by an old worker that then died (see above)
        old = [send_raw(client, f"old {p}", p, connection) for p in (3, 9, 3, 6)]
        client.app.send_task(
            "corral.generate",
            kwargs={"payload": {}},
            queue=other,
            priority=9,
            connection=connection,
        )
    new = send_raw(client, "new", 0)
    assert raw.llen(queue) == 1 and raw.llen(priority_list(queue, 3)) == 2

    assert adopt_old_priority_lists(raw, [queue]) == (4, 5)  # 4 waiting, 1 lost
    assert not raw.exists(*old_priority_lists(queue))
    order = [json.loads(m)["headers"]["id"] for m in reversed(raw.lrange(queue, 0, -1))]
    assert order == [new, old[0], old[2], old[3], old[1]]  # as kombu would have served them
    targets = {json.loads(e)[0] for e in raw.hvals(LEDGER_KEY)}
    assert targets == {queue, priority_list(other, 9)}  # another worker's queue is its own
    assert raw.llen(priority_list(other, 9)) == 1
    for _ in range(2):  # the lost one comes back on the queue itself, and only that one
        requeued, given_up = sweep_ledger(raw, older_than_s=0, confirm_after_s=0)
    assert len(requeued) == 1 and not given_up
    assert json.loads(raw.lindex(queue, -1))["headers"]["id"] == lost  # read next
    assert raw.llen(queue) == 6 and not raw.exists(*old_priority_lists(queue))
    assert adopt_old_priority_lists(raw, [queue]) == (0, 0)


def test_a_purge_also_empties_the_old_priority_sublists(isolated) -> None:
    client, raw = isolated
    with old_priority_connection(client.app) as connection:
        send_raw(client, "left by an earlier version", 9, connection)
    send_raw(client, "new", 9)
    with client.app.connection_for_write() as connection:
        assert connection.default_channel.queue_purge(queue_name(MODEL)) == 2
    assert not raw.hlen(LEDGER_KEY) and not raw.exists(*old_priority_lists(queue_name(MODEL)))
