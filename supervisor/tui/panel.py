"""What a dashboard panel is: the parts of the model it watches and how it redraws from them.

A panel is one file: its widget subclasses `Panel` next to the Textual widget it is, names in
`WATCHES` which changes of the model it shows (the model's topics below), and redraws in
`update_from()`. The app composes it and loops over every panel on the screen; nothing else
needs to know it exists.

Sanctioned departure from per-widget reactives: the model is a plain object fed by the socket
at up to 10 Hz of samples, and the app redraws the panels that watch what changed on a 4 Hz
timer. Over SSH, coalescing on a timer measured better than a redraw per message.
"""

from __future__ import annotations

from typing import ClassVar

# What changed in the model (RunModel.take_changed()).
SAMPLES = "samples"  # a telemetry sample
STEPS = "steps"  # a training step
EVENTS = "events"  # an event arrived or was acknowledged
LOG = "log"  # trainer log lines
STATE = "state"  # the run's state
ENDED = "ended"  # the stream ended (bye, or the connection broke)
CLOCK = "clock"  # a wall-clock second passed (uptime, ETA)
TOPICS = frozenset({SAMPLES, STEPS, EVENTS, LOG, STATE, ENDED, CLOCK})


class Panel:
    """A mixin for a dashboard widget: WATCHES the model's topics, redrawn by update_from()."""

    WATCHES: ClassVar[frozenset[str]] = frozenset()

    def update_from(self) -> None:
        """Redraw from the model (called by the app when a watched topic changed)."""
        raise NotImplementedError
