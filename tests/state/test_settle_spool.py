"""Durable settlement: a settlement the limit store cannot take waits in an on-disk spool
and is applied exactly once when the store answers, also by a restarted Admission.
Redis here persists (AOF), so a restart keeps the ledger, as production's does. Every
scenario checks: spend within the budget, ledger = sum of the records' costs, one record
per admitted request."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from authz.state.limits.admission import Admission
from authz.state.limits.redis_limits import RedisLimitStore
from authz.state.limits.settle_spool import OFFSET_FILE, SPOOL_FILE, SettleSpool, Spooled
from policy.limits import Ask, Limits
from tests.redis_server import RedisServer
from tests.state.money import Clock, P, ask, ledger_is_the_records, real_record

LIM = Limits(budget_nano=10_000, tpm=10_000)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path, persist=True)
    server.start()
    yield server
    server.stop()


async def until_answers(store: RedisLimitStore, clock: Clock) -> None:
    for _ in range(100):
        try:
            await store.budget("k1", "acme", P, clock())
            return
        except Exception:
            await asyncio.sleep(0.02)
    raise AssertionError("redis never came back")


async def test_a_replica_restarted_across_a_redis_data_loss_still_charges(
        tmp_path: Path) -> None:
    """Redis restarts without its data (no persistence) while a replica's settlements
    wait in its spool, and the replica restarts too before they are applied: each is
    still charged once, to the new ledger. The spool keeps the data mark each hold was
    admitted under; a replay finding no hold under a changed mark charges the cost (it
    charged nothing: the restarted replica had forgotten the mark)."""
    redis = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    spool_dir, clock, records = tmp_path / "settle-spool", Clock(), []
    try:
        store = RedisLimitStore(redis.url, timeout_s=0.2)
        first = Admission(store, spool_dir=spool_dir, clock=clock)
        await store.check_epoch()  # the first sweep's, at start
        asks = [ask(i, cost=3_000, lease=150.0) for i in range(2)]
        for a in asks:
            assert (await first.admit(LIM, a, clock.at())).allowed
        redis.stop()  # its data is gone
        for a, c in zip(asks, (1_000, 1_500), strict=True):
            records.append(real_record(a, c))
            assert not (await first.settle(LIM, a, 25, c, clock.at(1))).applied
        await first.close()
        await store.close()  # the replica restarts before Redis is back
        redis.start()
        store = RedisLimitStore(redis.url, timeout_s=0.2)
        await until_answers(store, clock)
        second = Admission(store, spool_dir=spool_dir, clock=clock)
        assert await second.replay() == 2
        assert await second.replay() == 0  # nothing left, nothing charged twice
        await second.close()
        assert await store.budget("k1", "acme", P, clock()) == (2_500, 0)
        ledger_is_the_records(2_500, records, 2)
        await store.close()
    finally:
        redis.stop()


async def test_settle_in_an_outage_is_spooled_then_applied_once(
    tmp_path: Path, durable_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    store, clock = RedisLimitStore(durable_redis.url, timeout_s=0.2), Clock()
    adm = Admission(store, spool_dir=tmp_path / "settle-spool", clock=clock)
    asks, records = [ask(i, cost=1_000, lease=150.0) for i in range(6)], []
    for a in asks:
        assert (await adm.admit(LIM, a, clock.at())).allowed
    costs = [500, 500, 700, 200, 1_000, 1_300]  # the last one overran its hold
    for a, c in zip(asks[:2], costs, strict=False):
        records.append(real_record(a, c))
        assert (await adm.settle(LIM, a, 25, c, clock.at(1))).applied
    durable_redis.stop()  # streams in flight finish: recorded, settlement spooled
    caplog.set_level(logging.WARNING, logger="tokenbooth.limits")
    for a, c in zip(asks[2:], costs[2:], strict=True):
        records.append(real_record(a, c))
        assert not (await adm.settle(LIM, a, 25, c, clock.at(2))).applied
    assert sum(r.getMessage().startswith("settlement spooled") for r in caplog.records) == 4
    assert adm.spooled_bytes > 0
    assert await adm.replay() == 0 and adm.spooled_bytes > 0  # still away: kept
    durable_redis.start()
    await until_answers(store, clock)
    assert await adm.replay() == 4
    assert adm.spooled_bytes == 0 and await adm.replay() == 0
    spent, reserved = await store.budget("k1", "acme", P, clock())
    assert (spent, reserved) == (sum(costs), 0)
    assert spent - 300 <= 10_000  # within the budget but for the reported overrun
    ledger_is_the_records(spent, records, 6)
    for a, c in zip(asks, costs, strict=True):  # a settlement applied twice: a no-op
        assert not (await adm.settle(LIM, a, 25, c, clock.at(3))).applied
    assert await store.budget("k1", "acme", P, clock()) == (sum(costs), 0)
    await adm.close()
    await store.close()
    assert not (tmp_path / "settle-spool" / OFFSET_FILE).exists()
    assert (tmp_path / "settle-spool" / SPOOL_FILE).stat().st_size == 0


async def test_a_spooled_settlement_survives_a_restart_and_corrects_a_lost_hold(
    tmp_path: Path, durable_redis: RedisServer,
) -> None:
    """The spool outlives its Admission; the new one replays it at start. Meanwhile one
    hold's lease ended and a sweep charged it in full: the replay corrects it."""
    spool_dir, clock, records = tmp_path / "settle-spool", Clock(), []
    store = RedisLimitStore(durable_redis.url, timeout_s=0.2)
    first = Admission(store, spool_dir=spool_dir, clock=clock)
    short, long_ = ask(1, cost=4_000, lease=5.0), ask(2, cost=4_000, lease=150.0)
    for a in (short, long_):
        assert (await first.admit(LIM, a, clock.at())).allowed
    durable_redis.stop()
    for a, c in ((short, 1_000), (long_, 2_500)):
        records.append(real_record(a, c))
        await first.settle(LIM, a, 25, c, clock.at(1))
    await first.close()  # the replica restarts before Redis is back
    durable_redis.start()
    await until_answers(store, clock)
    clock.t += 5.0  # the short lease ended before the spool could drain
    swept: list[dict[str, Any]] = []
    other = RedisLimitStore(durable_redis.url)
    sweeper = Admission(other, clock=clock, on_lost=lambda r: swept.append(r.to_dict()))
    assert await sweeper.sweep() == 1
    await other.close()
    assert await store.budget("k1", "acme", P, clock()) == (4_000, 4_000)
    second = Admission(store, spool_dir=spool_dir, clock=clock, sweep_s=0.01)
    await second.start()  # replays at start
    for _ in range(300):
        if second.spooled_bytes == 0:
            break
        await asyncio.sleep(0.01)
    await second.close()
    spent, reserved = await store.budget("k1", "acme", P, clock())
    assert (spent, reserved) == (1_000 + 2_500, 0) and spent <= 10_000
    ledger_is_the_records(spent, records + swept, 2)  # the real record wins over the lost
    await store.close()


def settlement(i: int) -> Spooled:
    return Spooled(LIM, Ask(f"r{i}", "k1", "acme", 30, 1_000, P, 150.0), 25, 10 * i)


def test_the_spool_keeps_order_offsets_and_damage(tmp_path: Path) -> None:
    spool = SettleSpool(tmp_path)
    assert spool.pending_bytes == 0 and spool.read() == []
    for i in range(3):
        assert spool.append(settlement(i))
    with pytest.raises(RuntimeError, match="each replica needs a data_dir of its own"):
        SettleSpool(tmp_path)  # one live spool per directory
    [(end0, s0), (_, s1), _] = spool.read()
    assert (s0, s1) == (settlement(0), settlement(1))
    spool.commit(end0)
    spool.close()
    with (tmp_path / SPOOL_FILE).open("ab") as f:
        f.write(b'{"torn": ')  # a crash mid-write
    spool = SettleSpool(tmp_path)  # reopened: from the saved offset
    got = spool.read()
    assert [s for _, s in got] == [settlement(1), settlement(2), None]  # damage skipped
    assert spool.append(settlement(3))  # after the torn line, on a line of its own
    spool.commit(got[-1][0])
    assert [s for _, s in spool.read()] == [settlement(3)]
    spool.commit(spool.read()[-1][0])
    assert spool.pending_bytes == 0 and (tmp_path / SPOOL_FILE).stat().st_size == 0
    spool.close()


def test_a_full_spool_refuses_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = SettleSpool(tmp_path, max_bytes=300)
    assert spool.append(settlement(1))
    assert not spool.append(settlement(2))
    assert "settle spool full" in caplog.text and '"request_id":"r2"' in caplog.text
    spool.close()
