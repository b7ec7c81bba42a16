"""Command-line plumbing shared by every script.

A learner who passes a bad file should see one line that names the file, the
problem and what to run next -- not a wall of traceback. Code raises
`UserError` for such problems and `run_main` prints it.
"""
import argparse
import sys

from common import paths


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 2."""


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every script shares: --quick, --device, --seed."""
    add_quick_arg(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto picks cuda, then mps, then cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are reproducible)")
    return parser


class _QuickAction(argparse.Action):
    """--quick: set args.quick, and send this process's outputs to out/quick/ (see common/paths.py)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        paths.use_quick_outputs()


def add_quick_arg(parser: argparse.ArgumentParser, help: str = "tiny sizes that finish in seconds "
                  "(used by the tests and CI); reads and writes out/quick/, never a full run's out/") -> None:
    parser.add_argument("--quick", action=_QuickAction, help=help)


def next_command(command: str) -> str:
    """The command a message tells the learner to run: with --quick in a --quick run, whose
    inputs are the quick runs' files in out/quick/."""
    return command + " --quick" if paths.quick_outputs() else command


def run_main(main) -> None:
    """Run a script's main(); turn UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
