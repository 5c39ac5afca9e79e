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


async def test_entry_ttls_below_the_svid_minimum_are_refused(ds: SqliteDataStore) -> None:
    """`--x509-svid-ttl 5` (meant: 5m) made 5-second SVIDs the agent renewed every 3 s,
    forever; an entry's TTL is 0 (the server's default) or at least MIN_SVID_TTL, like the
    server's own [ca] TTLs."""
    import pytest

    from meshid.entry import MIN_SVID_TTL

    svc = EntryService(ds, TD, SERVER)
    base = Entry("", SpiffeId(TD, "/w"), AGENT, parse_selectors(["unix:uid:1"]))
    for name in ("x509_svid_ttl", "jwt_svid_ttl"):
        with pytest.raises(ValueError, match=f"{name} must be 0 .* or at least {MIN_SVID_TTL}s"):
            await svc.create(base.replace(**{name: MIN_SVID_TTL - 1}))
    made = await svc.create(base.replace(x509_svid_ttl=MIN_SVID_TTL))
    with pytest.raises(ValueError, match="jwt_svid_ttl"):
        await svc.update(made.replace(jwt_svid_ttl=1))
    assert (await svc.update(made.replace(x509_svid_ttl=0))).x509_svid_ttl == 0
