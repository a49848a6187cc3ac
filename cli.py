"""The command-line boundary every entry point shares: expected errors as one line, and the exit status.

    if __name__ == "__main__":
        cli.run(main)

`run(main)` calls main(). A UsageError (a bad flag or bad input the user named) prints
`error: <message>` on stderr and exits 2, as argparse does; an expected failure while running (an OS
error such as a full disk or a missing file, a ValueError naming a bad file) prints the same one line
and exits 1. The message says what is wrong, naming the file or flag, and what to do. The traceback
is shown only with ASTRAI_DEBUG=1. Anything else is a bug: its traceback is always shown.

Left out: colours, localisation, log files.
"""

import glob
import json
import os
import re
import shutil
import sys


class UsageError(ValueError):
    """Bad input or flags: the user can fix it (exit status 2)."""


EXPECTED = (OSError, ValueError, KeyError, UnicodeError)  # failures a user can act on (exit status 1)


def say(message: str) -> str:
    """The one line a CLI prints: "error: ..." (the prefix once, whoever wrote it)."""
    message = str(message).strip() or "failed"
    return message if message.startswith("error: ") else f"error: {message}"


def run(main, *args):
    """main(*args) with the project's error policy; returns what main returns."""
    try:
        return main(*args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except EXPECTED as e:
        if os.environ.get("ASTRAI_DEBUG"):
            raise
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        print(say(text), file=sys.stderr)
        sys.exit(2 if isinstance(e, UsageError) else 1)


# -----------------------------------------------------------------------------
# Files: input read with line numbers, output checked first and replaced whole

LEFTOVER = re.compile(r"\.(partial|replaced|tmp)(\d+)")  # OUT.partial<PID> and such: a run's files beside OUT


def read_lines(path):
    """Yield (line number, line) of a UTF-8 text file, lines as open() splits them.

    A byte that is not UTF-8 is an error naming its line ("line N: ..."; the caller names the file).
    A strict decoder would give an offset into its read buffer instead, so we decode with
    surrogateescape, which turns each bad byte into one of U+DC80..U+DCFF, and look for those."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"line {lineno}: byte 0x{ord(line[e.start]) - 0xDC00:02x} at column {e.start + 1} "
                                 "is not UTF-8: re-encode the file as UTF-8") from None
            yield lineno, line


def check_writable(path, flag="--out"):
    """Fail before any work if `path` cannot be created: the nearest existing directory above it must
    be one we may write to (the missing ones between are created). Root may write to any directory,
    so for root only a file in the way or a read-only file system fails here."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is a file, not a directory: choose another {flag}")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable: choose another {flag}")


def write_file(path, chunks):
    """Write the strings of `chunks` to path as UTF-8, whole or not at all: into path.tmp<PID>, renamed
    over path once complete, so a failed or interrupted run never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(chunks)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_jsonl(path, records):
    """One JSON object per line (non-ASCII kept as written), whole or not at all (write_file)."""
    write_file(path, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except OSError as e:
        return not isinstance(e, ProcessLookupError)  # PermissionError: it exists, as another user
    return True


def clean_leftovers(out):
    """Delete what killed runs writing `out` left beside it (out.partial<PID>, ...) once their PID is no
    live process. out.replaced<PID> is the previous output, moved aside for the instant of
    replace_dir's swap: if `out` is missing, the run died in that instant, so it is put back instead.
    subtle: a PID says nothing on another machine; two machines writing one shared path are not handled."""
    out = os.path.realpath(out)  # as replace_dir names them
    for path in glob.glob(glob.escape(out) + ".*"):
        m = LEFTOVER.fullmatch(path[len(out):])
        if not m or _alive(int(m[2])):
            continue
        if m[1] == "replaced" and not os.path.exists(out):
            os.rename(path, out)
        else:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def replace_dir(tmp, out):
    """Rename the finished directory tmp to out, replacing the directory there as a whole.

    POSIX cannot rename onto a non-empty directory, so the old one is renamed aside to
    out.replaced<PID> first and deleted after: a reader finds the old output or the new one, never a
    mix (for an instant, none); a crash in that instant leaves the old one aside, and clean_leftovers
    puts it back. A symlinked out is followed: its target is replaced, the link kept."""
    out = os.path.realpath(out)
    aside = f"{out}.replaced{os.getpid()}"
    if os.path.isdir(out):
        os.rename(out, aside)
    os.rename(tmp, out)
    shutil.rmtree(aside, ignore_errors=True)
