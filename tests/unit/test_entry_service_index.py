"""The server's entry index (issuer/entries.py EntryService.index): after this server's own
write it is the previous snapshot with that change applied, not a reload of every entry;
when anyone else moved the revision counter, it is reloaded from the datastore."""

from __future__ import annotations

from issuer.authorization import EntryIndex
from issuer.datastore.sqlite import SqliteDataStore
from issuer.entries import ENTRIES_REVISION, EntryService
from meshid.entry import Entry
from meshid.selector import parse_selectors
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
SERVER = SpiffeId.parse("spiffe://example.org/meshid/server")
AGENT = SpiffeId.parse("spiffe://example.org/meshid/agent/x")


def shape(idx: EntryIndex) -> tuple[object, ...]:
    return (dict(idx.by_id), {p: sorted(e.id for e in es) for p, es in idx.by_parent.items() if es},
            sorted(e.id for e in idx.node_entries))


async def test_own_writes_are_applied_without_a_reload(ds: SqliteDataStore) -> None:
    svc = EntryService(ds, TD, SERVER)
    reloads = 0
    real_list = ds.list_entries

    async def counting_list() -> list[Entry]:
        nonlocal reloads
        reloads += 1
        return await real_list()

    ds.list_entries = counting_list  # type: ignore[method-assign]
    await svc.index()
    assert reloads == 1
    made = [await svc.create(Entry("", SpiffeId(TD, f"/w/{i}"), AGENT, parse_selectors([f"unix:uid:{i}"])))
            for i in range(5)]
    node = await svc.create(Entry("", SpiffeId(TD, "/node"), SERVER, parse_selectors(["x509pop:cn:a"])))
    await svc.update(made[0].replace(selectors=parse_selectors(["unix:uid:99"])))
    await svc.delete(made[1].id)
    idx = await svc.index()
    assert reloads == 1
    fresh = EntryIndex(await real_list(), SERVER, idx.revision)
    assert shape(idx) == shape(fresh)
    assert idx.revision == int(await ds.get_meta(ENTRIES_REVISION) or 0)
    assert node.id in {e.id for e in idx.node_entries}

    # Someone else (another replica) counted a write: the next use reloads.
    await ds.increment_meta(ENTRIES_REVISION)
    again = await svc.index()
    assert reloads == 2 and again.revision == idx.revision + 1
    assert shape(again) == shape(fresh)
