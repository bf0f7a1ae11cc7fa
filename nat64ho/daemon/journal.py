"""The operational lines on stderr: how many (``-v``/``-q``), and, when stderr
is the systemd journal, each with its sd-daemon priority prefix (``<3>``
errors, ``<4>`` warnings, ``<6>`` info, ``<7>`` debug) so that
``journalctl -p err`` finds failures. On a terminal nothing is added."""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import TextIO

#: sd-daemon(3) priorities.
ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7

#: The logging level of the server's lines, set by ``-v``/``-q``.
_level = logging.INFO


def verbosity(verbose: bool, quiet: bool) -> None:
    """``-v``: debug lines too; ``-q``: warnings and errors only."""
    global _level
    _level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO


def level() -> int:
    return _level


def to_journal() -> bool:
    """Whether stderr is the journal's stream: systemd names it in
    ``JOURNAL_STREAM`` as ``device:inode`` (systemd.exec(5)); a stderr
    redirected elsewhere by the service keeps the variable, not the file."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def priority(levelno: int) -> int:
    if levelno >= logging.ERROR:
        return ERR
    if levelno >= logging.WARNING:
        return WARNING
    return INFO if levelno >= logging.INFO else DEBUG


class Formatter(logging.Formatter):
    """Log lines, each line of a record (a traceback too) prefixed with the
    record's priority when ``journal`` is true."""

    def __init__(self, fmt: str, journal: bool) -> None:
        super().__init__(fmt)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        tag = f"<{priority(record.levelno)}>"
        return tag + text.replace("\n", "\n" + tag)


def setup_logging(name: str = "nat64ho") -> None:
    """The server's log on stderr at the level of ``-v``/``-q``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Formatter(f"{name}: %(levelname)s: %(message)s", to_journal()))
    root = logging.getLogger()
    root.handlers = [handler]
    # Debug lines are the server's own, not those of every library it loads.
    root.setLevel(max(_level, logging.INFO))
    logging.getLogger("nat64ho").setLevel(_level)


def line_priority(line: str) -> int:
    """The priority of a line written to stderr outside logging (the CLI's
    ``Error: …`` lines and its notes)."""
    if line.startswith("Error:"):
        return ERR
    if line.startswith(("Warning:", "Interrupted:")):
        return WARNING
    return INFO


class PrefixedStream(io.TextIOBase):
    """stderr for the journal: each line gets its priority prefix unless it
    has one (a log line's, from :class:`Formatter`). Whole lines only, so
    that the prefix is chosen from the start of the line."""

    def __init__(self, raw: TextIO) -> None:
        self.raw = raw
        self.pending = ""
        self.midline = False  # a flush wrote the start of the current line

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.raw.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.raw.errors

    def fileno(self) -> int:
        return self.raw.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.pending += text
        if "\n" in self.pending:
            *lines, self.pending = self.pending.split("\n")
            out = [self._tagged(line) + "\n" for line in lines]
            if self.midline:
                out[0] = lines[0] + "\n"
                self.midline = False
            self.raw.write("".join(out))
        return len(text)

    def _tagged(self, line: str) -> str:
        if len(line) > 2 and line[0] == "<" and line[1].isdigit() and line[2] == ">":
            return line
        return f"<{line_priority(line)}>{line}"

    def flush(self) -> None:
        if self.pending:
            self.raw.write(self.pending if self.midline else self._tagged(self.pending))
            self.pending = ""
            self.midline = True
        self.raw.flush()


def install() -> None:
    """Under the journal, every line written to stderr carries a priority."""
    if to_journal() and not isinstance(sys.stderr, PrefixedStream):
        sys.stderr = PrefixedStream(sys.stderr)
