"""A key's budget changed in place never touches what it spent: the key store holds the
budget, the limit store the ledger (by key id and period). Lowering the budget below the
spend refuses; a new period counts in its own ledger, and the old one is kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from authz.state.keys.keyring import KeyringStore
from authz.state.limits.memory import MemoryLimitStore
from authz.state.limits.redis_limits import RedisLimitStore
from policy.keyrecord import KeyRecord
from policy.keys import fingerprint, limits_of
from policy.limits import Ask, period_id, usd_to_nano
from tests.redis_server import RedisServer

NOW = datetime(2025, 6, 15, 12, tzinfo=UTC)
T0 = NOW.timestamp()


@pytest.fixture(params=["memory", "redis"])
async def ledgers(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """The limit store, where budgets' ledgers live: in memory, then in a real Redis."""
    server = RedisServer(tmp_path) if request.param == "redis" else None
    if server is not None:
        server.start()
    store = RedisLimitStore(server.url, timeout_s=1.0) if server else MemoryLimitStore()
    await store.start()
    try:
        yield store
    finally:
        await store.close()
        if server is not None:
            server.stop()


class Key:
    """A stored key and requests against its current record."""

    def __init__(self, store: KeyringStore, limit_store: Any) -> None:
        self.keys, self.limits, self.n = store, limit_store, 0

    async def record(self) -> KeyRecord:
        rec = await self.keys.get("k1")
        assert rec is not None
        return rec

    async def ask(self, usd: str) -> Ask:
        rec = await self.record()
        self.n += 1
        return Ask(f"r{self.n}", rec.id, rec.org, 0, usd_to_nano(Decimal(usd)),
                   period_id(rec.budget_period, NOW), 60.0)

    async def spend(self, usd: str) -> bool:
        """Admit a request costing `usd` and settle it at that cost; False if refused."""
        lim, ask = limits_of(await self.record()), await self.ask(usd)
        d = await self.limits.admit(lim, ask, T0 + self.n)
        if not d.allowed:
            assert d.reason == "budget"
            return False
        await self.limits.settle(lim, ask, 0, ask.cost_nano, T0 + self.n)
        return True

    async def spent(self, period: str) -> int:
        return int((await self.limits.budget("k1", "acme", period, T0 + self.n))[0])


async def test_budget_updates_keep_the_ledger(ledgers: Any, tmp_path: Path) -> None:
    keys = KeyringStore(tmp_path / "keys")
    await keys.start()
    try:
        await keys.create(KeyRecord(id="k1", org="acme", sha256=fingerprint("s"),
                                    budget_usd=Decimal("1"), budget_period="total"))
        key = Key(keys, ledgers)
        assert await key.spend("0.6")
        total = await key.spent("total")
        assert total == usd_to_nano(Decimal("0.6"))

        await keys.update("k1", {"budget_usd": Decimal("0.5")})  # below the spend
        assert not await key.spend("0.000000001")
        assert await key.spent("total") == total
        await keys.update("k1", {"budget_usd": Decimal("1")})  # the spend still counts
        assert not await key.spend("0.5")
        assert await key.spend("0.4")
        total = await key.spent("total")

        # Another period: its own ledger, from zero; the old one is kept as it was.
        day = period_id("day", NOW)
        await keys.update("k1", {"budget_period": "day", "budget_usd": Decimal("0.5")})
        assert await key.spend("0.5")
        assert await key.spent(day) == usd_to_nano(Decimal("0.5"))
        await keys.update("k1", {"budget_period": "total"})
        assert await key.spent("total") == total
        assert not await key.spend("0.000000001")
        # Removing the budget lifts the limit; the ledger stays for when it returns.
        await keys.update("k1", {"budget_usd": None})
        assert await key.spend("5")
        await keys.update("k1", {"budget_usd": Decimal("1")})
        assert not await key.spend("0.000000001")
    finally:
        await keys.close()
