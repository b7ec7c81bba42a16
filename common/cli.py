"""Command-line plumbing shared by every script.

A learner who passes a bad file should see one line that names the file, the
problem and what to run next -- not a wall of traceback. Code raises
`UserError` for such problems and `run_main` prints it.
"""
import argparse
import os
import sys

from common import paths


class UserError(Exception):
    """A problem with the user's input or files: printed as one line, exit code 2."""


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every script shares: --quick, --device, --threads, --seed."""
    add_quick_arg(parser)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run; auto picks cuda, then mps, then cpu")
    parser.add_argument("--threads", type=int, default=None, action=_ThreadsAction, metavar="N",
                        help="CPU threads for PyTorch (default: 1 with --quick, else one per core; "
                             "common/device.py says why)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (runs are reproducible)")
    return parser


class _ThreadsAction(argparse.Action):
    """--threads N: set args.threads, and make PyTorch use N threads (see common/device.py)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from common.device import ask_threads  # imports torch: only when the flag is given

        setattr(namespace, self.dest, values)
        ask_threads(values)


class _QuickAction(argparse.Action):
    """--quick: set args.quick, and send this process's outputs to out/quick/ (see common/paths.py)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        paths.use_quick_outputs()


# What a --quick model is, said where a learner meets one: the README's quick start, the quick report
# card's first line, chat.py's banner. The minutes are the README's Results table (steps 3 and 4 of the
# default profile); tests/test_foundation.py checks that the two agree.
QUICK_MODEL_NOTE = ("a seconds-long smoke-test model: it cannot answer yet (accuracies of 0 % and empty or "
                    "repeated replies are expected); a model that chats takes the default profile, about "
                    "11 minutes of training on a 2-core CPU (steps 3 and 4; README.md, Results)")


def add_quick_arg(parser: argparse.ArgumentParser, help: str = "tiny sizes that finish in seconds "
                  "(used by the tests and CI); reads and writes out/quick/, never a full run's out/") -> None:
    parser.add_argument("--quick", action=_QuickAction, help=help)


def next_command(command: str) -> str:
    """The command a message tells the learner to run, written as it works from the folder they
    are in: "python step4_sft/chat.py ..." (a script path from the repository root) becomes
    "python ../step4_sft/chat.py ..." inside step1_tokenizer/. With --quick in a --quick run,
    whose inputs are the quick runs' files in out/quick/."""
    program, _, rest = command.partition(" ")
    script, _, script_args = rest.partition(" ")
    if program == "python" and script.endswith(".py"):
        command = " ".join(part for part in (program, script_path(script), script_args) if part)
    return command + " --quick" if paths.quick_outputs() else command


def script_path(script: str) -> str:
    """A script's path, given from the repository root, as the current folder reaches it
    (the absolute path when the current folder is outside the repository)."""
    path = paths.REPO_ROOT / script
    cwd = os.path.abspath(os.getcwd())
    inside = cwd == str(paths.REPO_ROOT) or cwd.startswith(str(paths.REPO_ROOT) + os.sep)
    return os.path.relpath(path, cwd) if inside else str(path)


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


# ----------------------------------------------------------------------------- model flags

def add_model_args(parser, defaults=None):
    """--vocab_size, --block_size, --n_layer, ... one flag per ModelConfig field (defaults: a ModelConfig)."""
    from dataclasses import fields

    from common.model import ModelConfig

    defaults = defaults or ModelConfig()
    group = parser.add_argument_group("model size (ModelConfig)")
    for f in fields(ModelConfig):
        value = getattr(defaults, f.name)
        if f.type is bool:
            group.add_argument(f"--{f.name}", type=true_or_false, default=value, metavar="{true,false}",
                               help=f"default {str(value).lower()}")
        else:
            group.add_argument(f"--{f.name}", type=f.type, default=value, help=f"default {value}")
    return parser


def config_from_args(args):
    """The ModelConfig the add_model_args flags describe."""
    from dataclasses import fields

    from common.model import ModelConfig

    return ModelConfig(**{f.name: getattr(args, f.name) for f in fields(ModelConfig)})


def true_or_false(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)  # argparse turns this into "invalid true_or_false value"
