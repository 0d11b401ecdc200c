"""The ``prelu`` command that ``pip install`` puts on the PATH: the Rust
binary's command line (``prelu::cli``), run inside the extension."""

import signal
import sys

from ._prelu import cli_main


def main() -> None:
    """Runs ``prelu`` with this process's arguments and exits with its status."""
    # A closed stdout (`prelu ... | head`) ends the command quietly, as the
    # binary does; Python ignores SIGPIPE by default.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.stdout.flush()
    sys.exit(cli_main(["prelu", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
