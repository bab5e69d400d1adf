from __future__ import annotations

from ichat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
