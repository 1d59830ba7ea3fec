"""``internlm``: one command line for the core (local) and for the running services (remote).

Each area registers its own sub-commands from a module here; heavy imports (MindSpore, gRPC
stubs) happen inside the commands so ``internlm --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "services.cli.stack_cmds",  # up, workers
    "services.cli.model_cmds",  # convert, generate
    "services.cli.jobs_cmds",  # jobs submit/get/watch/cancel/list/store
    "services.cli.export_cmds",  # export (MindIR)
    "services.cli.train_cmds",  # preprocess, finetune, merge-lora, demo-model
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="internlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"internlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
