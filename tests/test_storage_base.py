"""The SQLite store provides everything the storage interface names, so
the server can rely on the interface alone."""

from __future__ import annotations

import inspect
import re

from nat64ho.storage.base import Storage
from nat64ho.storage.sqlite import Store


def test_sqlite_store_has_every_member_of_the_interface():
    members = {n for n in vars(Storage) if not n.startswith("_")}
    members |= set(Storage.__annotations__)
    assert {"add", "commits", "read_oldest", "prune", "damage_found"} <= members
    store_attrs = set(dir(Store))
    # Instance attributes are set in __init__: read them from its source.
    init = inspect.getsource(Store.__init__)
    missing = sorted(
        m for m in members if m not in store_attrs and not re.search(rf"self\.{m}\b\s*[:=]", init)
    )
    assert missing == []
    for name in members & store_attrs:
        want, have = getattr(Storage, name, None), getattr(Store, name)
        if inspect.isfunction(want):
            assert list(inspect.signature(want).parameters) == list(
                inspect.signature(have).parameters
            ), name
