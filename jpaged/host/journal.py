"""One undo log for every host mutation of a step: a failed step is replayed backwards.

A step changes the block manager (ref counts, the prefix cache, the swap pool), the
scheduler (sequences' tokens, pages, statuses, the live-sequence maps) and the engine's
requests. Each change goes through this journal *before* it is made (write-ahead): the
journal records the old value, then the caller changes it. ``undo`` restores the old
values newest first. Every record restores a value rather than inverting an operation,
so a record whose change never happened (the step was interrupted between the two) is
undone harmlessly: an exception or ``KeyboardInterrupt`` at any instruction of a step
leaves a state the journal returns exactly to the one before the step.

State derived from the journaled values is not journaled but rebuilt after an undo
(``BlockManager.rebuild_free_queue``, the scheduler's queues and block-table mirror):
recording nothing for it keeps the step's cost down, and an undo is rare.

Outside a transaction (``begin`` ... ``commit``) the journal records nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_MISSING = object()


def _set_item(container, key, old) -> None:
    if old is _MISSING:
        container.pop(key, None)
    else:
        container[key] = old


def truncate(values: list, length: int) -> None:   # also used inline by the scheduler
    del values[length:]


def _set_vars(obj, old: dict) -> None:
    obj.__dict__.clear()
    obj.__dict__.update(old)


class Journal:
    """Write-ahead undo records of one transaction (one step, or one request added or
    aborted). ``device``: whether the device may have written the step's pages (set just
    before the page moves and the device step start): then an undo must also repair what
    the step's device writes overwrote (see ``Scheduler.roll_back``)."""

    __slots__ = ("log", "active", "device")

    def __init__(self):
        self.log: list[tuple] = []
        self.active = False
        self.device = False

    def begin(self) -> None:
        self.log.clear()
        self.device = False
        self.active = True

    def commit(self) -> None:
        self.active = False   # first: an interrupt before the clear still undoes all
        self.log.clear()

    def undo(self) -> None:
        """Restore every recorded value, newest first; the transaction ends (first, so
        the undo itself records nothing). Interrupted, it can run again: each record is
        dropped only once restored, and restoring twice is harmless."""
        self.active = False
        log = self.log
        while log:
            fn, *args = log[-1]
            fn(*args)
            log.pop()

    # -- records: call each BEFORE the change it announces ------------------------------

    def attr(self, obj, name: str) -> None:
        if self.active:
            self.log.append((setattr, obj, name, getattr(obj, name)))

    def item(self, container, key) -> None:
        """``container[key]`` is about to change or be deleted (a list index, or a dict key,
        present or not)."""
        if self.active:
            old = container.get(key, _MISSING) if isinstance(container, dict) else container[key]
            self.log.append((_set_item, container, key, old))

    def length(self, values: list) -> None:
        """``values`` is about to grow at its end only (append, extend)."""
        if self.active:
            self.log.append((truncate, values, len(values)))

    def call(self, restore, *args) -> None:
        """Run ``restore(*args)`` on undo; ``args`` hold the values to restore (a class
        that knows its own state saves it this way, e.g. ``Request.state``)."""
        if self.active:
            self.log.append((restore, *args))

    def vars(self, obj) -> None:
        """Any attribute of ``obj`` (a small record) is about to be reassigned; its list
        attributes may also grow (they are truncated back). Values are not copied: an
        attribute changed in place other than by appending needs its own record."""
        if self.active:
            old = dict(obj.__dict__)
            self.log.append((_set_vars, obj, old))
            for value in old.values():
                if type(value) is list:
                    self.log.append((truncate, value, len(value)))


@contextlib.contextmanager
def deferred_interrupts():
    """Hold back SIGINT (Ctrl-C) while the body runs, then raise the KeyboardInterrupt it
    would have raised: a recovery (undo) must not itself be cut in half. Only the main
    thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    except ValueError:   # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])
