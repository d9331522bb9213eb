"""The ``sepnet`` command.

Each subcommand lives in its own module under ``sepnet.jobs`` and exposes two functions:

- ``add_arguments(parser: argparse.ArgumentParser) -> None``
- ``run(args: argparse.Namespace) -> int`` (the exit code)

Modules are imported only when their subcommand runs, so ``sepnet --help`` is fast and a
broken optional dependency of one command does not break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sepnet import __version__
from sepnet.core.errors import SepnetError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("sepnet.jobs.phantom", "write a synthetic head-and-neck CT dataset (any supported format)"),
    "preprocess": ("sepnet.jobs.preprocess", "convert a dataset into a chunked Zarr store of SLF copies"),
    "fingerprint": ("sepnet.jobs.fingerprint", "print the dataset fingerprint of a store"),
    "train": ("sepnet.jobs.train", "train one model (network x transform x loss x fold) from a config"),
    "evaluate": ("sepnet.jobs.evaluate", "evaluate predictions or trained models against references"),
    "predict": ("sepnet.jobs.predict", "segment new CT scans with the ensemble, with uncertainty"),
    "cv": ("sepnet.jobs.cv", "run a whole cross-validated study: preprocess, train, evaluate, report"),
    "status": ("sepnet.jobs.status", "show where each job of a study is"),
    "export": ("sepnet.jobs.export", "write a study's trained ensemble as a self-contained, checksummed bundle"),
    "relocate": ("sepnet.jobs.relocate", "point a moved or copied study's MLflow store at its new folder"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sepnet",
        description="3D-SepNet ensembles for head-and-neck OAR segmentation: data, training on "
        "SLURM/local executors, evaluation, uncertainty and reports.",
    )
    parser.add_argument("--version", action="version", version=f"sepnet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # The command is the first word that names one; global options (-v) may precede it.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command not in COMMANDS:
        # no (known) command: let the top-level parser print help, version or the error
        known = parser.parse_args(argv)
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[command][0])
    known = argparse.Namespace(command=command)
    # Second pass: a parser that knows the chosen command's arguments.
    full = argparse.ArgumentParser(prog="sepnet")
    full.add_argument("-v", "--verbose", action="store_true")
    sub = full.add_subparsers(dest="command")
    sp = sub.add_parser(known.command, description=COMMANDS[known.command][1])
    module.add_arguments(sp)
    args = full.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except SepnetError as exc:
        if args.verbose:
            raise
        print(f"sepnet {known.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"sepnet {known.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
