"""Devices that are not in the fleet (fleet/ingest.py, "Members only"), as a peer on a
shared broker can make them: generated ids, states and sample frames, each checked
against the invariants. Nothing of a stranger is stored, answered or registered; the
strangers table stays bounded whatever arrives."""

from __future__ import annotations

import json
import random

import pytest

from mpfleet.db.store import Store
from mpfleet.fleet.ingest import IngestStats, handle_samples, handle_state
from mpfleet.fleet.registry import Registry


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "fleet.db") as s:
        Registry(s).add("member-1")
        yield s


def hostile_payloads(rng: random.Random):
    """What a peer can publish on <root>/<id>/state or .../samples."""
    yield b""
    yield b"\x00\xff" * 50
    yield b"[1, 2, 3]"
    yield b'"text"'
    yield b"{" * 5000
    yield json.dumps({"board": "x" * 10_000, "fw": "v9"}).encode()
    yield json.dumps({"time": 10**30, "board": 7, "device": "member-1"}).encode()
    yield json.dumps({"nested": [[[[[[{"a": 1}]]]]]], "blob": "y" * 100_000}).encode()
    for _ in range(20):
        yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))


def test_nothing_of_a_stranger_is_stored_answered_or_registered(store):
    rng = random.Random(15)
    published = []
    stats = IngestStats()
    before = store.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    for i, payload in enumerate(hostile_payloads(rng)):
        device = f"peer-{i % 7}"
        handle_state(store, device, payload, lambda *a, **k: published.append(a))
        handle_samples(store, device, payload, lambda *a, **k: published.append(a), stats)
        assert not store.is_member(device)
        assert published == []
        assert store.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0] == before
        assert [d["id"] for d in Registry(store).list()] == ["member-1"]
    assert stats.strangers == i + 1 and stats.frames == 0
    kept = {s["id"]: s for s in store.strangers()}
    assert set(kept) == {f"peer-{n}" for n in range(7)}
    for s in kept.values():
        assert len(json.dumps(s["state"])) <= Store.STRANGER_STATE_MAX


def test_the_strangers_table_is_bounded_however_many_ids_arrive(store, monkeypatch):
    monkeypatch.setattr(Store, "STRANGERS_MAX", 50)
    for n in range(400):
        handle_state(store, f"flood-{n}", json.dumps({"fw": "v1"}).encode(), lambda *a, **k: None)
    assert len(store.strangers()) == 50
    assert store.strangers_dropped() == 350
    rows = store.db.execute("SELECT COUNT(*) FROM strangers").fetchone()[0]
    assert rows == 51  # the kept ones and the one overflow counter
    # a kept stranger is still counted, and accepting one frees its row
    handle_state(store, "flood-0", b"{}", lambda *a, **k: None)
    assert store.stranger("flood-0")["times"] == 2
    Registry(store).accept(["flood-0"])
    assert len(store.strangers()) == 49 and store.is_member("flood-0")


def test_a_stranger_cannot_reach_a_member_by_naming_it_inside_its_messages(store):
    state = {"device": "member-1", "fw": "v6.6.6", "board": "virtual"}
    handle_state(store, "peer-x", json.dumps(state).encode(), lambda *a, **k: None)
    assert Registry(store).get("member-1")["state"] is None
    assert store.stranger("peer-x")["state"] == state
