"""The `rece` command line: one module per group of commands, each adding its parsers; `main` runs one command.

Errors a user can fix are one line (`ReceError`, exit status 2); warnings from rece and its libraries are shown one
line each (`rece.console`).
"""

from __future__ import annotations

import argparse
import gc
import sys

from .. import elapsed  # first: where /proc is missing, its clock starts when it is imported
from ..console import quiet_libraries, shown_warnings
from ..errors import ReceError
from . import edit_commands, run_commands


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `rece` command."""
    parser = argparse.ArgumentParser(
        prog="rece", description="Closed-form concept erasure for text-to-image diffusion models (RECE)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    edit_commands.add_parsers(sub)
    run_commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `rece` command; its exit status. With `argv` None the command is this process's own, which exits next."""
    elapsed.begin_command(own_process=argv is None)
    args = build_parser().parse_args(argv)
    status = run(args)
    if argv is None:
        # Python's exit walks every object once more for reference cycles (0.3 s and more once torch is imported);
        # the objects alive now live until the exit anyway, so the collector leaves them out
        gc.freeze()
    return status


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: errors a user can fix as one line, library warnings one line each."""
    # erase and info read safetensors and transformers only, unless MODEL is a single-file checkpoint (diffusers)
    light = args.command in ("erase", "info") and not str(getattr(args, "model", "")).endswith((".safetensors", ".ckpt"))
    quiet_libraries(diffusers=not light)
    with shown_warnings():
        try:
            code = args.func(args)
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
            return code
        except BrokenPipeError:  # `rece info E | head`: the reader has gone, stop quietly as CLI tools do
            _drop_stdout()
            return 141
        except ReceError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # disk full, permissions, a file vanished: one line, never a traceback
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            reason = exc.strerror or " ".join(str(exc).split())[:200]
            print(f"error: {reason}{where}; check free space and permissions, then run again", file=sys.stderr)
            return 2
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":  # safetensors' own I/O errors (e.g. disk full while writing)
                raise
            print(f"error: cannot write or read a safetensors file ({exc}); check free space and permissions", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; nothing partial was written", file=sys.stderr)
            return 130


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured)
        pass


if __name__ == "__main__":
    sys.exit(main())
