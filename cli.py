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

import os
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
