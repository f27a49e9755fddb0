"""Rebuild the packaged default guest from its source: python -m xend_lite.guests.build_default"""

from __future__ import annotations

from pathlib import Path

from xend_lite.guests import DEFAULT_GUEST, DEFAULT_SOURCE
from xend_lite.guests.build import build

HERE = Path(__file__).resolve().parent


def main() -> None:
    out = build(HERE / DEFAULT_SOURCE, HERE / DEFAULT_GUEST, bits=64)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
