"""Time from starting ``nat64ho serve`` to its first WELCOME, and to the
first answered LOOKUP (which loads that NAT64's table), on a given database.

The server must answer before it reads any table (DESIGN.md: start-up must
not read the whole table), so the time should not grow with the rows.
Each run copies nothing and changes nothing but the nat row of 127.1.0.1.

    python benchmarks/make_tables.py /tmp/big.db
    python benchmarks/startup.py /tmp/big.db --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nat64ho.core import wire  # noqa: E402
from nat64ho.peer import Client, Peer  # noqa: E402
from nat64ho.testing import serve_command  # noqa: E402

#: HELLO is resent this often until the server answers (it may not be
#: listening yet).
RETRY = 0.005
BOOT_ID = bytes(8)  # as make_tables.py records it


async def first_answers(port_file: Path, proc: subprocess.Popen, t0: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        await asyncio.sleep(RETRY)
    # The server logs its port after binding; a fixed port would race with
    # other tests, so we wait for the line, which costs microseconds.
    port = int(port_file.read_text().split()[0])
    client = await Client.connect("127.0.0.1", port, local="127.1.0.1", peer=Peer(BOOT_ID))
    try:
        while True:
            try:
                await client.hello(timeout=RETRY * 4)
                break
            except TimeoutError:
                continue
        welcome = loop.time() - t0
        [answer] = await client.exchange([wire.Lookup(1028)], timeout=30)
        assert isinstance(answer, (wire.Mapping, wire.Unmapped)), answer
        lookup = loop.time() - t0
    finally:
        client.close()
    return welcome, lookup


def one_run(db: Path, tmp: Path) -> tuple[float, float]:
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    cmd = serve_command(db, tmp / "events.log")
    loop = asyncio.new_event_loop()
    t0 = loop.time()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def pump():
        for line in proc.stderr:
            if "listening on" in line:
                port_file.write_text(line.rsplit("listening on", 1)[1].split(",")[0].split(":")[1])

    import threading

    threading.Thread(target=pump, daemon=True).start()
    try:
        return loop.run_until_complete(first_answers(port_file, proc, t0))
    finally:
        loop.close()
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [one_run(args.db, Path(tmp)) for _ in range(args.runs)]
    welcome = [w for w, _ in results]
    lookup = [x for _, x in results]
    print(
        f"{args.db}: start to first WELCOME median {statistics.median(welcome):.3f} s "
        f"(runs: {', '.join(f'{w:.3f}' for w in welcome)}); "
        f"to first LOOKUP answer median {statistics.median(lookup):.3f} s"
    )


if __name__ == "__main__":
    main()
