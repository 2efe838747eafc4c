"""Long runs of the agent: a full day of device time, power cuts at random flash
operations, and a device reflashed under an id the host already knows."""

import json
import random

import pytest
from agent_harness import Host, flushed_seqs, last_state, make_device
from conftest import stress_count


@pytest.fixture
def host(mosquitto, tmp_path):
    h = Host(mosquitto, tmp_path / "host.db").start()
    yield h
    h.close()


def test_a_day_at_60_s_reaches_sqlite_sample_for_sample(mosquitto, tmp_path, host):
    """A full day under `make stress`; a quarter of one in `make test`."""
    hours = stress_count(quick=6, full=24)
    vb = make_device(tmp_path / "dev", mosquitto.port, sample_interval_s=60, upload_every_wakes=30)
    start = vb.clock_s
    records = vb.run(until_clock_s=start + hours * 3600)
    assert all(r.exit_reason == "deepsleep" for r in records)
    assert len(records) == hours * 60
    # One more wake with an upload request flushes the tail of the day.
    cfg = json.loads(vb.fs_get("/config.json"))
    cfg["upload_every_wakes"] = 1
    vb.fs_put({"/config.json": json.dumps(cfg).encode()})
    vb.run(boots=1)
    host.wait_idle()
    seqs = [r[1] for r in host.rows(vb.device_id)]
    assert seqs == list(range(1, hours * 60 + 2))
    times = [r[2] for r in host.rows(vb.device_id)]
    assert times[-1] - times[0] >= hours * 3600 - 60
    assert host.store.ack_point(vb.device_id) == hours * 60 + 1
    assert vb.counters()["vfs"]["erases"] < 60, "a day of successful uploads barely touches flash"


def test_reflashed_device_with_a_known_id_renumbers_after_the_host(mosquitto, tmp_path, host):
    first = make_device(tmp_path / "first", mosquitto.port, device_id="reused-id", upload_every_wakes=2)
    first.run(boots=10)
    host.wait_idle()
    assert host.store.ack_point("reused-id") == 10
    again = make_device(tmp_path / "again", mosquitto.port, device_id="reused-id", upload_every_wakes=2)
    records = again.run(boots=6)
    assert any("renumbering" in r.output for r in records)
    host.wait_idle()
    assert [r[1] for r in host.rows("reused-id")] == list(range(1, 17))


def test_power_cuts_anywhere_lose_no_sample_committed_to_flash(mosquitto, tmp_path, host):
    """Cuts land while sampling, flushing, uploading and trimming. Afterwards every
    sample whose flush completed is in SQLite exactly once, none is corrupt,
    and the device keeps running."""
    cuts = stress_count(quick=100, full=2000)
    rng = random.Random(4242)
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=4,
                     limits={"stage_max_samples": 6, "log_max_bytes": 16384})
    committed: set[int] = set()
    done_cuts = 0
    boots = 0
    network_up = True
    while done_cuts < cuts:
        if rng.random() < 0.1:
            network_up = not network_up  # outages push the backlog into flash
            vb.set_wifi(down=not network_up)
        vb.schedule_power_cut(after_ops=rng.randint(1, 12), seed=done_cuts)
        for _ in range(40):
            rec = vb.boot()
            boots += 1
            committed |= flushed_seqs(rec.output)
            assert "Traceback" not in rec.output, rec.output
            if rec.exit_reason == "power_cut":
                done_cuts += 1
                vb.power_on(clock_s=vb.clock_s)
                break
            assert rec.exit_reason == "deepsleep", (rec.exit_reason, rec.detail, rec.output)
        else:
            vb.state["cut_after_ops"] = None
            vb.save()
    # The network returns and the device drains its backlog.
    vb.set_wifi(down=False)
    cfg = json.loads(vb.fs_get("/config.json"))
    cfg["upload_every_wakes"] = 1
    vb.fs_put({"/config.json": json.dumps(cfg).encode()})
    vb.run(boots=30)
    host.wait_idle(0.5)
    rows = host.rows(vb.device_id)
    seqs = [r[1] for r in rows]
    assert len(seqs) == len(set(seqs))
    missing = committed - set(seqs)
    assert not missing, f"{len(missing)} samples committed to flash never reached SQLite: {sorted(missing)[:10]}"
    for _, seq, _t, values in rows:
        if all(v is None for v in values):
            assert seq not in committed, f"seq {seq} was flushed but arrived as lost"
            continue
        adc, temp = values
        assert 0.79 <= adc <= 1.61 and 41.5 <= temp <= 48.5, f"corrupt sample {seq}: {values}"
    state = last_state(vb, host.store)
    assert state["backlog"] <= 1
    assert done_cuts == cuts and boots > cuts
