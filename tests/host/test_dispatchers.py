"""The dispatcher heartbeat (mpfleet.fleet.dispatchers): who is running, and who died."""

from mpfleet.db.store import Store
from mpfleet.fleet import dispatchers

T0 = 1_800_000_000.0


def test_no_dispatcher_has_run_so_none_is_running(tmp_path):
    with Store(tmp_path / "m.db") as store:
        assert dispatchers.running(store, T0) == []


def test_a_beating_dispatcher_is_running_with_its_start_time(tmp_path):
    with Store(tmp_path / "m.db") as store:
        dispatchers.beat(store, "a", T0)
        dispatchers.beat(store, "a", T0 + dispatchers.BEAT_EVERY_S)
        [d] = dispatchers.running(store, T0 + dispatchers.BEAT_EVERY_S + 1)
        assert (d.name, d.started, d.beat) == ("a", T0, T0 + dispatchers.BEAT_EVERY_S)


def test_a_dispatcher_that_stopped_beating_is_not_running(tmp_path):
    with Store(tmp_path / "m.db") as store:
        dispatchers.beat(store, "a", T0)
        assert dispatchers.running(store, T0 + dispatchers.STALE_AFTER_S + 0.1) == []


def test_a_cleanly_stopped_dispatcher_is_gone(tmp_path):
    with Store(tmp_path / "m.db") as store:
        dispatchers.beat(store, "a", T0)
        dispatchers.stopped(store, "a")
        assert dispatchers.running(store, T0) == []


def test_a_dispatcher_restarted_under_a_dead_ones_name_starts_afresh(tmp_path):
    with Store(tmp_path / "m.db") as store:
        dispatchers.beat(store, "a", T0)
        later = T0 + 10 * dispatchers.STALE_AFTER_S
        dispatchers.beat(store, "a", later)
        [d] = dispatchers.running(store, later)
        assert d.started == later
