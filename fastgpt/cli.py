"""How command-line entry points report mistakes: one line, a non-zero exit, no traceback."""

import argparse
import sys

from fastgpt.errors import FastGPTError
from fastgpt.ops import BackendUnavailable


def run_cli(command):
    """Run command(); turn user mistakes and Ctrl-C into a one-line message and an exit status."""
    try:
        command()
    except (FastGPTError, BackendUnavailable) as error:
        print(f"fastgpt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastgpt: interrupted", file=sys.stderr)
        return 130
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises FastGPTError (one error line) instead of printing usage and exiting."""

    def error(self, message):
        raise FastGPTError(f"{message} (see --help)")
