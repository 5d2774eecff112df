"""The card a rehearsal emulates: its total as nvidia-smi shows it, and the ballast that leaves it.

`hardware.emulate_vram_gib` names the card, not an allocator budget: on the real card the CUDA
context and the allocator share that total, so a faithful rehearsal ("ballast" mode) holds
everything else in a helper process and lets the trainer find exactly the card's capacity free.
No torch here: preflight, telemetry and the runner all read it.
"""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30
BALLAST_GRANULE = 2 * MIB  # the caching allocator rounds large blocks to 2 MiB
# Whole-GB sizes of common cards -> the total nvidia-smi shows for them (MiB). 24: RTX 4090 (the
# article's card, 24,564 MiB); 48: RTX 6000 Ada / A6000 (49,140 MiB). Any other value is taken
# literally, in GiB.
CARD_TOTAL_MIB = {24: 24_564, 48: 49_140}
MODES = ("ballast", "fraction")


class EmulationError(Exception):
    """The device cannot emulate the card (it has less free memory than the card holds)."""


def card_total_mib(gib: float) -> float:
    """MiB the emulated card's nvidia-smi shows: a known card's total, else `gib` x 1024."""
    return float(CARD_TOTAL_MIB.get(gib, gib * 1024))  # type: ignore[call-overload]  # 24.0 == 24


def card_total_bytes(gib: float) -> int:
    """The emulated card's total in bytes."""
    return int(card_total_mib(gib) * MIB)


def ballast_bytes(free: int, card: int, granule: int = BALLAST_GRANULE) -> int:
    """Bytes to hold so that `card` bytes stay free (rounded down: never less than the card)."""
    if free < card:
        raise EmulationError(f"cannot emulate a {card / MIB:,.0f} MiB card: only {free / MIB:,.0f} "
                             "MiB of this GPU are free")
    return (free - card) // granule * granule


def fraction_for(card: int, context: int, device_total: int) -> float:
    """Allocator cap (per_process_memory_fraction) that leaves the card minus the context."""
    if card <= context:
        raise EmulationError(f"the {card / MIB:,.0f} MiB card is smaller than the CUDA context "
                             f"({context / MIB:,.0f} MiB)")
    return min(1.0, (card - context) / device_total)
