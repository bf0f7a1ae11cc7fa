"""The root of the errors nat64ho names for an operator, and how a store
tells the daemon what an exception means for serving (:meth:`Storage.classify`)."""

from __future__ import annotations

import enum


class DatabaseError(Exception):
    """Base of the named errors; the message is meant for an operator."""


class BadRow(DatabaseError):
    """A row does not decode; the message names the table and the row."""


class DatabaseDamaged(DatabaseError):
    """The store was given up on while serving (a damaged file, a lost
    session): it commits nothing more."""


class Fault(enum.Enum):
    """What a failed read or commit means, as the store that saw it tells."""

    RETRY = "retry"  #: passing (a full or busy disk, a lock): the same commit again
    DAMAGED = "damaged"  #: the database itself: stop, writing on may spread it
    REFUSED = "refused"  #: a change the database calls inconsistent: a bug, stop
    LOST = "lost"  #: the session (or writer), and the table's ownership with it
