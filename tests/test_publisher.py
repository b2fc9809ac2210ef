"""The worker's side of a task stream: text that comes during a round trip joins one event,
and the events of every stream that come during it share the next one; a first delivery's start
event goes out with its lease, and its first token and its end from the task's own thread."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import pytest
import redis

from tasks.keys import cancel_key, lease_key, log_key, stream_channel, task_key
from tasks.lifecycle import Lease, StartNotTaken
from tasks.publisher import StreamPublisher
from tests.redis_proxy import RedisProxy
from workers.embedded_redis import EmbeddedRedis
from workers.stream import Flusher, StreamWriter

WAIT_S = 10.0


def unopened(
    client: redis.Redis, task_id: str, flusher: Flusher | None = None, *, cancel: bool = True
) -> StreamPublisher:
    return StreamPublisher(
        client,
        task_id=task_id,
        channel=stream_channel(task_id),
        log_key=log_key(task_id),
        maxlen=1000,
        ttl_s=60,
        cancel_key=cancel_key(task_id) if cancel else None,
        flusher=flusher,
    )


def publisher_for(
    client: redis.Redis, task_id: str, flusher: Flusher | None = None
) -> StreamPublisher:
    publisher = unopened(client, task_id, flusher, cancel=False)
    publisher.open()
    return publisher


def held(admin: redis.Redis) -> None:
    """Wait until the flusher's first write is held in Redis (paused by ``CLIENT PAUSE``)."""
    deadline = time.monotonic() + WAIT_S
    while not any(
        "b" in c["flags"] and c["cmd"] in ("eval", "evalsha") for c in admin.client_list()
    ):
        assert time.monotonic() < deadline, "the stream's first write never reached Redis"
        time.sleep(0.005)


def published(pubsub: redis.client.PubSub) -> list[dict[str, Any]]:
    """What went out live, up to the terminal event."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_S
    while not events or events[-1]["type"] != "done":
        assert time.monotonic() < deadline, f"no terminal event; got {events}"
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            events.append(json.loads(message["data"]))
    return events


def test_text_sent_during_a_round_trip_joins_one_event_live_and_in_the_log(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    pubsub = client.pubsub()
    pubsub.subscribe(stream_channel(task_id))
    publisher = publisher_for(client, task_id)
    admin.client_pause(int(WAIT_S * 1000), all=False)  # writes wait: the round trip is held
    try:
        publisher.emit("start", model="m")
        held(admin)  # what comes now waits for that round trip
        for i in range(50):
            publisher.emit("token", text=f"t{i} ")
        publisher.emit("thinking", text="hm")
        publisher.emit("token", text="end")
    finally:
        admin.client_unpause()
    publisher.finish("done", result={"text": "whole"})
    log = [json.loads(fields[b"e"]) for _id, fields in client.xrange(log_key(task_id))]
    assert published(pubsub) == log  # live and replay are the same events
    assert [e["seq"] for e in log] == list(range(len(log)))
    assert [(e["type"], e.get("text")) for e in log] == [
        ("start", None),
        ("token", "".join(f"t{i} " for i in range(50))),
        ("thinking", "hm"),
        ("token", "end"),
        ("done", None),
    ]
    assert [e["seq"] for e in log] == list(range(5)) and publisher.next_seq == 5
    pubsub.close()
    client.close()
    admin.close()


def test_text_joins_only_its_own_type_and_never_crosses_another_event(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    publisher = publisher_for(client, task_id)
    admin.client_pause(int(WAIT_S * 1000), all=False)
    try:
        publisher.emit("start", model="m")
        held(admin)
        publisher.emit("token", text="a")
        publisher.emit("restart", attempt=2, reason="retrying")
        publisher.emit("token", text="b")
        publisher.emit("token", text="c")
        publisher.emit("thinking", text="x")
        publisher.emit("token", text="d")
    finally:
        admin.client_unpause()
    publisher.finish("done", result={})
    log = [json.loads(fields[b"e"]) for _id, fields in client.xrange(log_key(task_id))]
    assert [(e["type"], e.get("text")) for e in log] == [
        ("start", None),
        ("token", "a"),
        ("restart", None),
        ("token", "bc"),
        ("thinking", "x"),
        ("token", "d"),
        ("done", None),
    ]
    assert [e["seq"] for e in log] == list(range(7))
    client.close()
    admin.close()


def test_events_of_many_streams_sent_during_a_round_trip_share_the_next_one(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    flusher = Flusher(client)  # this test's own, to count its round trips
    task_ids = [str(uuid.uuid4()) for _ in range(5)]
    pubsub = client.pubsub()
    pubsub.subscribe(*(stream_channel(t) for t in task_ids))
    publishers = [publisher_for(client, t, flusher) for t in task_ids]
    first, others = publishers[0], publishers[1:]
    admin.client_pause(int(WAIT_S * 1000), all=False)
    try:
        first.emit("start", model="m")
        held(admin)  # the first round trip is under way: every stream's events wait for it
        for n, publisher in enumerate(others):
            publisher.emit("start", model="m")
            for i in range(3):
                publisher.emit("token", text=f"{n}.{i} ")
            publisher.emit("restart", attempt=2, reason="retrying")
            publisher.emit("token", text="again")
        first.emit("token", text="first")
    finally:
        admin.client_unpause()
    deadline = time.monotonic() + WAIT_S
    while flusher.round_trips < 2:
        assert time.monotonic() < deadline, "the events that waited were never written"
        time.sleep(0.005)
    assert flusher.round_trips == 2  # the held one, then one for everything that waited
    assert [client.xlen(log_key(t)) for t in task_ids] == [2, 4, 4, 4, 4]
    for publisher in publishers:
        publisher.finish("done", result={})
    live: dict[str, list[dict[str, Any]]] = {t: [] for t in task_ids}
    while any(not e or e[-1]["type"] != "done" for e in live.values()):
        assert time.monotonic() < deadline, f"not every stream ended: {live}"
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            event = json.loads(message["data"])
            live[event["task_id"]].append(event)
    for n, task_id in enumerate(task_ids):
        log = [json.loads(fields[b"e"]) for _id, fields in client.xrange(log_key(task_id))]
        assert live[task_id] == log  # replay is what went out live, stream by stream
        assert [e["seq"] for e in log] == list(range(len(log)))
        expected = (
            [("start", None), ("token", "first")]
            if n == 0
            else [
                ("start", None),
                ("token", "".join(f"{n - 1}.{i} " for i in range(3))),
                ("restart", None),
                ("token", "again"),
            ]
        )
        assert [(e["type"], e.get("text")) for e in log] == [*expected, ("done", None)]
    pubsub.close()
    client.close()
    admin.close()


def test_a_flusher_that_gives_up_on_redis_fails_its_streams_then_writes_new_ones(
    redis_server: EmbeddedRedis, redis_url: str
) -> None:
    proxy = RedisProxy(redis_server.host, redis_server.port)
    client = redis.Redis.from_url(proxy.url)
    direct = redis.Redis.from_url(redis_url)
    flusher = Flusher(client, retry_budget_s=0.3)
    lost, also_lost = (publisher_for(client, str(uuid.uuid4()), flusher) for _ in range(2))
    try:
        marker = f"cut-{uuid.uuid4()}"
        client.lpush(marker, "x")
        proxy.cut_after(rb"\*2\r\n\$\d+\r\n" + marker.encode())
        client.brpop([marker], timeout=1)  # answered, then Redis "dies" for every connection
        assert proxy.cut.wait(WAIT_S)
        lost.emit("start", model="m")
        also_lost.emit("start", model="m")
        for publisher in (lost, also_lost):
            with pytest.raises(redis.ConnectionError):
                publisher.close(WAIT_S)  # the flusher gave up on the round that held it
            with pytest.raises(redis.ConnectionError):
                publisher.emit("token", text="x")
        proxy.restore()
        later = publisher_for(client, str(uuid.uuid4()), flusher)
        later.emit("start", model="m")
        later.finish("done", result={})  # the same flusher writes the next streams
        lost.emergency_finish("error", error={"type": "BrokerUnavailable"})
        logs = {
            p.task_id: [json.loads(f[b"e"]) for _id, f in direct.xrange(log_key(p.task_id))]
            for p in (lost, also_lost, later)
        }
        assert [(e["seq"], e["type"]) for e in logs[later.task_id]] == [(0, "start"), (1, "done")]
        assert [(e["seq"], e["type"]) for e in logs[lost.task_id]] == [(1, "error")]
        assert logs[also_lost.task_id] == []
    finally:
        client.close()
        direct.close()
        proxy.close()


def test_an_idle_flusher_hands_its_thread_back_and_the_next_entry_takes_one(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    flusher = Flusher(client, idle_s=0.05)
    for _ in range(2):
        publisher = publisher_for(client, str(uuid.uuid4()), flusher)
        publisher.emit("start", model="m")
        publisher.finish("done", result={})
        assert client.xlen(log_key(publisher.task_id)) == 2
        deadline = time.monotonic() + WAIT_S
        while flusher.running:
            assert time.monotonic() < deadline, "the idle flusher kept its thread"
            time.sleep(0.005)
    assert flusher.round_trips >= 2
    client.close()


def logged(client: redis.Redis, task_id: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"e"]) for _id, fields in client.xrange(log_key(task_id))]


def test_a_first_delivery_writes_its_start_event_in_the_step_that_takes_its_lease(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    client.hset(task_key(task_id), mapping={"state": "queued", "callback_url": "http://x/"})
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(stream_channel(task_id))
    publisher = unopened(client, task_id)
    first = publisher.first_event("start", model="m")
    lease = Lease(client, task_id, 10, None)
    begun = lease.begin_first("w", 1.0, 60, host="h", first=first)
    assert (begun.state, begun.has_callback, begun.cancel_requested) == ("ok", True, False)
    publisher.opened(begun)
    assert [(e["seq"], e["type"]) for e in logged(client, task_id)] == [(0, "start")]
    deadline = time.monotonic() + WAIT_S
    while (message := pubsub.get_message(timeout=0.5)) is None:
        assert time.monotonic() < deadline, "event 0 never went out live"
    assert json.loads(message["data"]) == logged(client, task_id)[0]
    assert client.hget(task_key(task_id), "state") == b"running"
    publisher.finish("done", result={})
    lease.release("succeeded")
    assert [(e["seq"], e["type"]) for e in logged(client, task_id)] == [(0, "start"), (1, "done")]
    # Delivered again: its log has events, so the step does nothing and the run reads the log.
    again = Lease(client, task_id, 10, None)
    replay = unopened(client, task_id)
    answer = again.begin_first("w2", 2.0, 60, host="h", first=replay.first_event("start"))
    assert answer.state == "logged" and not client.exists(lease_key(task_id))
    assert len(logged(client, task_id)) == 2
    # Another worker holds the lease of a task with an empty log: nothing is written either.
    held_id = str(uuid.uuid4())
    assert Lease(client, held_id, 10, None).begin("w", 1.0, 60) == "ok"
    other = unopened(client, held_id)
    answer = Lease(client, held_id, 10, None).begin_first(
        "w2", 2.0, 60, host="h", first=other.first_event("start")
    )
    assert answer.state == "leased" and logged(client, held_id) == []
    pubsub.close()
    client.close()


def test_a_first_token_and_the_end_go_out_from_the_tasks_thread_without_the_flusher(
    redis_url: str,
) -> None:
    """The flusher's thread is held (in another stream's cancel callback): a stream whose
    start went out with its lease still gets its first token into the log before ``emit``
    returns, and its end before ``finish`` returns. Later text waits for the flusher."""
    client = redis.Redis.from_url(redis_url)
    flusher = Flusher(client)
    holding, release = threading.Event(), threading.Event()
    other_id = str(uuid.uuid4())
    other = unopened(client, other_id, flusher)
    other.open()
    client.set(cancel_key(other_id), 1)
    other.on_cancel = lambda: (holding.set(), release.wait(WAIT_S))
    other.emit("start", model="m")  # its round trip sees the cancel flag: the callback holds
    try:
        assert holding.wait(WAIT_S), "the flusher never ran the callback"
        task_id = str(uuid.uuid4())
        publisher = unopened(client, task_id, flusher)
        first = publisher.first_event("start", model="m")
        begun = Lease(client, task_id, 10, None).begin_first("w", 1.0, 60, host="h", first=first)
        publisher.opened(begun)
        publisher.emit("token", text="first")
        assert [e["type"] for e in logged(client, task_id)] == ["start", "token"]
        publisher.finish("done", result={}, timeout_s=WAIT_S)
        assert [(e["seq"], e["type"]) for e in logged(client, task_id)] == [
            (0, "start"),
            (1, "token"),
            (2, "done"),
        ]
        later = unopened(client, str(uuid.uuid4()), flusher)
        later_first = later.first_event("start", model="m")
        later.opened(
            Lease(client, later.task_id, 10, None).begin_first(
                "w", 1.0, 60, host="h", first=later_first
            )
        )
        later.emit("token", text="a")
        later.emit("token", text="b")  # handed to the flusher, which is held
        assert [e.get("text") for e in logged(client, later.task_id)] == [None, "a"]
    finally:
        release.set()
    later.finish("done", result={})
    assert [e.get("text") for e in logged(client, later.task_id)] == [None, "a", "b", None]
    other.finish("cancelled", reason="cancelled")
    client.close()


def test_the_round_trip_that_writes_the_events_reads_each_streams_cancel_flag(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    admin = redis.Redis.from_url(redis_url)
    flusher = Flusher(client)
    task_ids = [str(uuid.uuid4()) for _ in range(1200)]  # more flags than one MGET in the script
    publishers = [unopened(client, task_id, flusher) for task_id in task_ids]
    seen: list[str] = []
    for publisher in publishers:
        publisher.on_cancel = lambda task_id=publisher.task_id: seen.append(task_id)
    cancelled = {task_ids[0], task_ids[999], task_ids[1000], task_ids[-1]}
    client.mset({cancel_key(task_id): "1" for task_id in cancelled})
    admin.client_pause(int(WAIT_S * 1000), all=False)
    try:
        publishers[0].emit("start", model="m")
        held(admin)  # every other stream's first event waits for the next round trip
        for publisher in publishers[1:]:
            publisher.emit("start", model="m")
    finally:
        admin.client_unpause()
    deadline = time.monotonic() + WAIT_S
    while len(seen) < len(cancelled):  # told after the round trip that saw the flags
        assert time.monotonic() < deadline, f"only {len(seen)} cancels were seen"
        time.sleep(0.005)
    assert flusher.round_trips == 2  # the held one, then one for every other stream
    assert sorted(seen) == sorted(cancelled)  # each once
    assert {p.task_id for p in publishers if p.cancel_requested} == cancelled
    for publisher in publishers:
        publisher.finish("done", result={})
    assert sorted(seen) == sorted(cancelled)
    assert all(client.xlen(log_key(task_id)) == 2 for task_id in task_ids)
    client.close()
    admin.close()


@pytest.mark.parametrize("scripts_lost", [False, True], ids=["cached", "scripts-lost"])
def test_a_start_step_sent_ahead_is_read_before_the_streams_first_write(
    redis_url: str, scripts_lost: bool
) -> None:
    """The start step can go out before the call to Ollama, its answer read later: the first
    write reads it (a lost script is run again then). A step that did not start the task lets
    nothing be written, that write or any later one; a step whose answer is lost says so."""
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    client.hset(task_key(task_id), "state", "queued")
    publisher = unopened(client, task_id)
    lease = Lease(client, task_id, 10, None)
    if scripts_lost:
        client.script_flush()
    first = publisher.first_event("start", model="m")
    publisher.opening_sent(lease.send_begin_first("w", 1.0, 60, host="h", first=first))
    publisher.emit("token", text="hi")
    publisher.finish("done", result={})
    lease.release("succeeded")
    events = [(e["seq"], e["type"]) for e in logged(client, task_id)]
    assert events == [(0, "start"), (1, "token"), (2, "done")]
    assert client.hget(task_key(task_id), "state") == b"succeeded"

    held_id = str(uuid.uuid4())
    assert Lease(client, held_id, 10, None).begin("w", 1.0, 60) == "ok"
    other = unopened(client, held_id)
    step = Lease(client, held_id, 10, None).send_begin_first(
        "w2", 2.0, 60, host="h", first=other.first_event("start")
    )
    other.opening_sent(step)
    with pytest.raises(StartNotTaken) as not_taken:
        other.emit("token", text="never")
    assert not_taken.value.begun is not None and not_taken.value.begun.state == "leased"
    with pytest.raises(StartNotTaken):
        other.finish("error", error={})
    assert logged(client, held_id) == []

    lost_id = str(uuid.uuid4())
    lost = unopened(client, lost_id)
    step = Lease(client, lost_id, 10, None).send_begin_first(
        "w", 1.0, 60, host="h", first=lost.first_event("start")
    )
    lost.opening_sent(step)
    client.connection_pool.disconnect()  # the step's connection too: its answer is lost
    with pytest.raises(StartNotTaken) as unread:
        lost.settle()
    assert isinstance(unread.value.cause, redis.ConnectionError)
    assert client.ping()  # every connection went back to the pool, usable again
    client.close()


@pytest.mark.parametrize("scripts_lost", [False, True], ids=["one-transaction", "scripts-lost"])
def test_commands_go_with_the_lease_end_and_survive_a_lost_script(
    redis_url: str, scripts_lost: bool
) -> None:
    """A lease's end takes other commands along in its transaction (a result to store). If
    Redis lost the script meanwhile (a restart), the lease still ends, and they still run."""
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    client.hset(task_key(task_id), "state", "queued")
    lease = Lease(client, task_id, 10, None)
    assert lease.begin("w", 1.0, 60) == "ok"
    lease.start_heartbeat()
    if scripts_lost:
        client.script_flush()
    replies: list[Any] = []

    def also(pipe: Any) -> Any:
        pipe.set(f"test:{task_id}", "stored")
        return replies.extend

    lease.release("succeeded", then=[also])
    assert not client.exists(lease_key(task_id))
    assert client.hget(task_key(task_id), "state") == b"succeeded"
    assert client.get(f"test:{task_id}") == b"stored" and replies == [True]
    client.delete(f"test:{task_id}")
    client.close()


def test_an_error_in_commands_that_ride_with_an_event_does_not_write_it_again(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    client.set(f"test:{task_id}", "not a number")
    writer = StreamWriter(
        client, channel=stream_channel(task_id), log_key=log_key(task_id), maxlen=100, ttl_s=60
    )
    writer.append({"seq": 0, "type": "done"}, then=lambda pipe: pipe.incr(f"test:{task_id}"))
    writer.close(WAIT_S)
    assert [e["type"] for e in logged(client, task_id)] == ["done"]
    client.delete(f"test:{task_id}")
    client.close()


def test_text_held_by_its_reader_waits_for_the_end_or_for_send_held(redis_url: str) -> None:
    """Text emitted with ``hold`` is not handed to the flusher: it goes out with the next event
    written at once (the end: one round trip for both), or when the reader sends it."""
    client = redis.Redis.from_url(redis_url)
    flusher = Flusher(client)
    publisher = publisher_for(client, str(uuid.uuid4()), flusher)
    publisher.emit("token", text="a")  # the first text: written at once
    trips = flusher.round_trips
    publisher.emit("token", text="b", hold=True)
    publisher.emit("token", text="c", hold=True)
    assert flusher.round_trips == trips and not flusher.running  # nobody was told
    publisher.finish("done", result={})
    assert flusher.round_trips == trips + 1
    log = logged(client, publisher.task_id)
    assert [(e["type"], e.get("text")) for e in log] == [
        ("token", "a"),
        ("token", "bc"),
        ("done", None),
    ]
    assert [e["seq"] for e in log] == [0, 1, 2] and publisher.next_seq == 3

    held = publisher_for(client, str(uuid.uuid4()), flusher)
    held.emit("token", text="a")
    held.emit("token", text="b", hold=True)
    held.send_held()  # the reader is about to wait: the flusher writes it
    deadline = time.monotonic() + WAIT_S
    while [e.get("text") for e in logged(client, held.task_id)][-1] != "b":
        assert time.monotonic() < deadline, "held text was never written"
        time.sleep(0.005)
    held.finish("done", result={})
    client.close()
