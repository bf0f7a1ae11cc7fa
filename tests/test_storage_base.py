"""Each store provides everything the storage interface names, so the
server can rely on the interface alone."""

from __future__ import annotations

import inspect
import re

import pytest

from nat64ho.storage.base import Storage
from nat64ho.storage.postgres import PgStore
from nat64ho.storage.sqlite import Store


@pytest.mark.parametrize("store", [Store, PgStore])
def test_each_store_has_every_member_of_the_interface(store):
    members = {n for n in vars(Storage) if not n.startswith("_")}
    members |= set(Storage.__annotations__)
    assert {"add", "commits", "read_oldest", "prune", "damage_found"} <= members
    store_attrs = set(dir(store))
    # Instance attributes are set in __init__ (its own or the shared
    # engine's): read them from their source.
    init = "".join(
        inspect.getsource(c.__init__) for c in store.__mro__[:-1] if "__init__" in vars(c)
    )
    missing = sorted(
        m for m in members if m not in store_attrs and not re.search(rf"self\.{m}\b\s*[:=]", init)
    )
    assert missing == []
    assert not inspect.isabstract(store)
    for name in members & store_attrs:
        want, have = getattr(Storage, name, None), getattr(store, name)
        if inspect.isfunction(want):
            assert list(inspect.signature(want).parameters) == list(
                inspect.signature(have).parameters
            ), name
