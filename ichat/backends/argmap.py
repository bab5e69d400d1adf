"""iChat's unified flag names, renamed to an engine's own before its parser runs.

Only the flag name changes; its value and every other argument pass through
untouched and in order. ``--flag value``, ``--flag=value`` and the underscore
spelling (``--model_path``) are all understood.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ichat.errors import ConfigError


def _flag_name(token: str) -> str | None:
    if not token.startswith("--") or token == "--":
        return None
    return "--" + token[2:].split("=", 1)[0].replace("_", "-")


def rename_flags(argv: Sequence[str], mapping: Mapping[str, str]) -> list[str]:
    """Return ``argv`` with each iChat flag of ``mapping`` renamed to the engine's.

    Giving both the iChat name and the engine's own name for one setting is an
    error: which one wins would be a guess.
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)  # after "--": positionals only
    options, rest = argv[:end], argv[end:]
    given = {name for token in options if (name := _flag_name(token)) is not None}
    for ours, theirs in mapping.items():
        if ours != theirs and ours in given and theirs in given:
            raise ConfigError(f"{ours} and {theirs} name the same setting; give only one")
    out: list[str] = []
    for token in options:
        name = _flag_name(token)
        if name is not None and name in mapping:
            value = token.split("=", 1)[1:] if "=" in token else []
            token = "=".join([mapping[name], *value])
        out.append(token)
    return out + rest


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (the last one given), or None."""
    value = None
    end = argv.index("--") if "--" in argv else len(argv)
    for i, token in enumerate(argv[:end]):
        name = _flag_name(token)
        if name != flag:
            continue
        if "=" in token:
            value = token.split("=", 1)[1]
        elif i + 1 < end:
            value = argv[i + 1]
    return value
