"""The root of the errors nat64ho names for an operator, and how a store
tells the daemon what an exception means for serving (:meth:`Storage.classify`)."""

from __future__ import annotations

import enum


class DatabaseError(Exception):
    """Base of the named errors; the message is meant for an operator."""


class DatabaseDamaged(DatabaseError):
    """The store was given up on while serving (a damaged file, a lost
    session): it commits nothing more."""


class Fault(enum.Enum):
    """What a failed read or commit means, as the store that saw it tells."""

    DAMAGED = "damaged"  #: the database itself: stop, writing on may spread it
    LOST = "lost"  #: the session, and the table's ownership with it
