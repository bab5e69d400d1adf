"""The ``ichat`` command: a thin dispatcher to the subcommands.

Importing this module imports no engine, so ``ichat --help`` is fast everywhere.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ichat import __version__

USAGE = f"""usage: ichat COMMAND [ARGS...]

iChat {__version__}: run vLLM in-process behind one small interface.

commands:
  up                start a gateway and N workers, wait until the model is routable,
                    stop everything on Ctrl-C (`ichat up --help`)
  serve             run a worker: an engine in this process serving the OpenAI API
                    (`ichat serve --help`; `ichat serve --backend vllm --help` adds the
                    engine's own flags)
  reload            replace a running worker's engine by one with new flags, without
                    a moment out of service (`ichat reload --help`)
  gateway           run the Shepherd Model Gateway (SMG) with iChat's defaults
  make-test-model   write a tiny random-weight Llama and a trained BPE tokenizer to a
                    folder (no download needed)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        print(__version__)
        return 0
    command, rest = args[0], args[1:]
    if command == "serve":
        from ichat.commands import serve

        return serve.main(rest)
    if command == "up":
        from ichat.commands import up

        return up.main(rest)
    if command == "reload":
        from ichat.commands import reload

        return reload.main(rest)
    if command == "gateway":
        from ichat.commands import gateway

        return gateway.main(rest)
    if command == "make-test-model":
        from ichat.commands import make_test_model

        return make_test_model.main(rest)
    print(f"ichat: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2
