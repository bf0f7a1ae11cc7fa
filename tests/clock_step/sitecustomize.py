"""Test-only: steps the wall clock of a real ``nat64ho serve`` process as NTP
would, leaving the monotonic clock alone (what faketime does, without a C library).

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; this one acts
only when ``$NAT64HO_TEST_WALL_OFFSET`` names a file holding an offset in
seconds, which the test rewrites to step the clock while the server runs.
"""

import os
import time

_path = os.environ.get("NAT64HO_TEST_WALL_OFFSET")

if _path:
    _real_time_ns = time.time_ns
    _state = {"mtime": None, "offset": 0}

    def _offset_ns() -> int:
        # A stat per call: cheap enough for a test, and the step is seen by
        # the very next reading, as a real step would be.
        mtime = os.stat(_path).st_mtime_ns
        if mtime != _state["mtime"]:
            with open(_path) as f:
                _state["offset"] = int(float(f.read()) * 1e9)
            _state["mtime"] = mtime
        return _state["offset"]

    def time_ns() -> int:
        return _real_time_ns() + _offset_ns()

    def time_() -> float:
        return time_ns() / 1e9

    time.time_ns = time_ns
    time.time = time_
