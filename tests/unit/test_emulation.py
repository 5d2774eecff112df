"""The faithful 24 GB rehearsal in-process: card totals, ballast sizing, the recipe, what the
supervisor tells its sampler. (The real helper process: tests/e2e/test_emulation.py.)"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from supervisor.preflight.emulation import (
    MIB,
    EmulationError,
    ballast_bytes,
    card_total_bytes,
    card_total_mib,
    fraction_for,
)
from supervisor.recipe import RecipeError, load_recipe

GIB = 1 << 30


def test_card_total_is_what_nvidia_smi_shows() -> None:
    assert card_total_mib(24) == 24_564  # an RTX 4090, not 24 x 1024
    assert card_total_bytes(24.0) == 24_564 * MIB
    assert card_total_mib(48) == 49_140
    assert card_total_mib(23.5) == 23.5 * 1024  # anything else: literally GiB


def test_ballast_leaves_exactly_the_card_free() -> None:
    card = card_total_bytes(24)
    free = 142_000 * MIB + 12_345  # what cudaMemGetInfo says after the helper's own context
    n = ballast_bytes(free, card)
    assert n % (2 * MIB) == 0  # the allocator's granule: no rounding up past the card
    assert card <= free - n < card + 2 * MIB
    assert ballast_bytes(card, card) == 0
    with pytest.raises(EmulationError, match="only 20,000 MiB of this GPU are free"):
        ballast_bytes(20_000 * MIB, card)


def test_the_trainer_notice_says_what_the_ballast_left() -> None:
    from supervisor.runner.ballast import describe

    info = {"pid": 1029, "ballast_bytes": 118_000 * MIB, "free_after": 24_565 * MIB,
            "driver_reserve": 616 * MIB}  # the H200's, 2026-12-02
    assert describe(info, card_total_bytes(24)) == (
        "ballast pid 1029 holds 115.2 GiB; 24,565 MiB free (card 24,564 MiB); "
        "this GPU's driver reserve 616 MiB is outside it")


def test_ballast_tops_up_what_others_give_back() -> None:
    from supervisor.runner.ballast import top_up_bytes

    card = card_total_bytes(24)
    assert top_up_bytes(card - 9_000 * MIB, 9_000 * MIB, card) == 0  # trainer + free == card
    # another process released 48 MiB after the start: the ballast takes it, not the trainer
    assert top_up_bytes(card - 9_000 * MIB + 48 * MIB + 5, 9_000 * MIB, card) == 48 * MIB
    assert top_up_bytes(1 * MIB, 9_000 * MIB, card) == 0  # never gives back


def test_fraction_mode_takes_the_measured_context_out_of_the_card() -> None:
    card, ctx, device = card_total_bytes(24), 520 * MIB, 143_771 * MIB
    assert fraction_for(card, ctx, device) * device == pytest.approx(card - ctx)
    with pytest.raises(EmulationError, match="smaller than the CUDA context"):
        fraction_for(100 * MIB, ctx, device)


def _recipe(tmp_path: Path, hardware: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(f"""
        [model]
        name = "x"
        shape = "llama-3.1-8b"
        [data]
        path = "d.jsonl"
        [train]
        output_dir = "{tmp_path / 'out'}"
        [hardware]
        {hardware}
    """))
    return p


def test_recipe_mode_defaults_to_ballast_and_rejects_others(tmp_path: Path) -> None:
    r = load_recipe(_recipe(tmp_path, "emulate_vram_gib = 24"))
    assert r.hardware.emulate_mode == "ballast"
    assert load_recipe(_recipe(tmp_path, 'emulate_mode = "fraction"')).hardware.emulate_mode == "fraction"
    with pytest.raises(RecipeError, match="emulate_mode"):
        load_recipe(_recipe(tmp_path, 'emulate_vram_gib = 24\nemulate_mode = "balast"'))


def test_the_supervisor_tells_its_sampler_the_rehearsed_card(qlw_home: Path, tmp_path: Path) -> None:
    """A run whose recipe rehearses 24 GB: the supervisor's sampler reports that card."""
    from supervisor.control import runs
    from supervisor.daemon.core import Supervisor
    from supervisor.preflight.check import estimate
    from supervisor.telemetry.sampler import make_sampler
    from tests.fakes.nvml import FakeNVML
    from tests.support import fake_recipe

    path = fake_recipe(tmp_path, ["--steps", "1"], extra="[hardware]\nemulate_vram_gib = 24\n")
    recipe = load_recipe(path)
    store = runs.create(str(path), recipe, estimate(recipe, gpu_mem_gib=141))
    sampler = make_sampler(nvml=FakeNVML(1))
    try:
        Supervisor(store, sampler=sampler)
        assert sampler.sampler.emulated_total_mib == 24_564
        assert sampler.sample(None, None).gpus[0].mem_total_mib == 24_564
    finally:
        sampler.close()
