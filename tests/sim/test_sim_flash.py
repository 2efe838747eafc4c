"""The emulated NOR flash: bit rules, counters, torn operations on power cuts."""

import pytest

from mpfleet.sim.mpy._simflash import SECTOR, NorFlash, PowerCut

SIZE = 16 * SECTOR


@pytest.fixture
def flash(tmp_path):
    path = tmp_path / "flash.bin"
    path.write_bytes(b"\xff" * SIZE)

    def make(**kwargs):
        return NorFlash(str(path), SIZE, [("a", 0, 8 * SECTOR), ("b", 8 * SECTOR, 8 * SECTOR)],
                        counters_path=str(tmp_path / "counters.bin"), **kwargs)

    return make


def test_program_only_clears_bits(flash):
    f = flash()
    f.program(0, b"\xf0\x0f\xaa")
    f.program(0, b"\x3c\xff\x0f")
    assert f.read_bytes(0, 3) == bytes([0xF0 & 0x3C, 0x0F, 0xAA & 0x0F])


def test_erase_sets_whole_sector_to_ff(flash):
    f = flash()
    f.program(SECTOR + 10, b"\x00" * 100)
    f.erase(SECTOR)
    assert f.read_bytes(SECTOR, SECTOR) == b"\xff" * SECTOR


def test_erase_must_be_sector_aligned(flash):
    with pytest.raises(ValueError, match="not sector aligned"):
        flash().erase(100)


def test_access_beyond_the_chip_is_refused(flash):
    with pytest.raises(ValueError, match="beyond"):
        flash().program(SIZE - 2, b"abcd")


def test_counters_per_region_and_persisted(flash):
    f = flash()
    f.erase(0)
    f.program(0, b"x" * 100)
    f.erase(9 * SECTOR)
    f.close()
    again = flash()
    c = again.counters()
    assert c["a"] == {"erases": 1, "programs": 1, "bytes_programmed": 100}
    assert c["b"]["erases"] == 1
    assert c["ops"] == 3


def test_power_cut_tears_a_program(flash):
    f = flash(cut_after_ops=1, seed=7)
    with pytest.raises(PowerCut):
        f.program(0, b"\x00" * 512)
    data = flash().read_bytes(0, 512)
    landed = data.count(0)
    assert 0 <= landed < 512, "a torn program must not complete"
    assert data[: max(landed - 1, 0)] == b"\x00" * max(landed - 1, 0), "a prefix lands first"


def test_power_cut_tears_an_erase(flash):
    f = flash()
    f.program(0, b"\x00" * SECTOR)
    f.close()
    f = flash(cut_after_ops=f.ops + 1, seed=3)
    with pytest.raises(PowerCut):
        f.erase(0)
    data = flash().read_bytes(0, SECTOR)
    assert data != b"\xff" * SECTOR and data != b"\x00" * SECTOR


def test_after_a_cut_the_chip_is_dead(flash):
    f = flash(cut_after_ops=1)
    with pytest.raises(PowerCut):
        f.erase(0)
    with pytest.raises(PowerCut):
        f.program(SECTOR, b"\x00")
    assert flash().read_bytes(SECTOR, 1) == b"\xff"


def test_on_power_cut_callback_gets_the_detail(flash):
    seen = []
    f = flash(cut_after_ops=2, on_power_cut=seen.append)
    f.erase(0)
    with pytest.raises(PowerCut):
        f.program(0, b"abc")
    assert seen and "program" in seen[0] and "operation 2" in seen[0]
