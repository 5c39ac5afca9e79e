import pytest, os
@pytest.fixture(autouse=True)
def _mutate(monkeypatch):
    m = os.environ.get("MUT")
    if m == "nonotify":
        monkeypatch.setattr("issuer.server.Server._events_written", lambda self: None)
    if m == "noflush":
        from issuer.server import Server
        async def tick(self):
            await self.ca.tick()
        monkeypatch.setattr(Server, "tick", tick)
