"""Seconds per phase of GPU work from CUDA events: no waits while the work runs (the exact engine,
GPU NN-descent)."""
from __future__ import annotations

__all__ = ["PhaseClock"]


class PhaseClock:
    """Events recorded on the current stream at the start and end of each phase; ``seconds`` reads
    them (waiting for the last) into seconds per phase.

    ``out`` (a dict, or None: nothing is recorded) receives the totals at ``read``, every name of
    ``phases`` included (0.0 where a phase never ran).
    """

    def __init__(self, cp, out, phases):
        self.cp, self.out, self.phases, self.marks = cp, out, tuple(phases), []

    def start(self, phase):
        if self.out is not None:
            self.marks.append([phase, self._event()])

    def stop(self):
        if self.out is not None:
            self.marks[-1].append(self._event())

    def _event(self):
        event = self.cp.cuda.Event()
        event.record()
        return event

    def seconds(self, since=0):
        """{phase: seconds} of the phases marked from the ``since``-th on."""
        totals = {}
        for phase, first, last in self.marks[since:]:
            last.synchronize()
            totals[phase] = totals.get(phase, 0.0) + self.cp.cuda.get_elapsed_time(first, last) / 1e3
        return totals

    def read(self):
        """Add the seconds of every phase to ``out``."""
        if self.out is None:
            return
        for phase in self.phases:
            self.out.setdefault(phase, 0.0)
        for phase, seconds in self.seconds().items():
            self.out[phase] += seconds
