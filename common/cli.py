"""Command-line plumbing shared by every script.

A learner who passes a bad file should see one line that names the file, the
problem and what to run next -- not a wall of traceback. Code raises
`UserError` for such problems and `run_main` prints it.
"""
import argparse
import sys


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 2."""


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every script shares: --quick, --device, --seed."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes that finish in seconds (used by the tests and CI)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto picks cuda, then mps, then cpu")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are reproducible)")
    return parser


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
