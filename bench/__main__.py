"""python -m bench [--smoke] [--no-write] [--only NAME ...] [--output FILE]"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from bench._harness import ROOT, Context, Section, Skip, discover, host_description, render_markdown, render_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="tiny counts, to check the benchmarks still run")
    ap.add_argument("--no-write", action="store_true", help="print the figures, leave BENCHMARKS.md alone")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmark modules")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure (median is kept)")
    args = ap.parse_args(argv)

    workdir = ROOT / "bench" / "out"
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(smoke=args.smoke, workdir=workdir,
                  repeats=args.repeats or (1 if args.smoke else 3))
    modules = discover()
    if args.only:
        names = {m.__name__.rsplit(".", 1)[1]: m for m in modules}
        unknown = [n for n in args.only if n not in names]
        if unknown:
            ap.error(f"no benchmark named {', '.join(unknown)} (have: {', '.join(sorted(names))})")
        modules = [names[n] for n in args.only]

    sections: list[Section] = []
    failed = False
    for mod in modules:
        name = mod.__name__.rsplit(".", 1)[1]
        title = getattr(mod, "TITLE", name)
        t = time.monotonic()
        try:
            section = mod.run(ctx)
        except Skip as exc:
            section = Section(title, getattr(mod, "SUMMARY", ""), error=f"skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - report it, run the others
            traceback.print_exc()
            section = Section(title, getattr(mod, "SUMMARY", ""), error=f"failed: {type(exc).__name__}: {exc}")
            failed = True
        sections.append(section)
        print(render_text(section))
        print(f"   ({name}: {time.monotonic() - t:.1f} s)", flush=True)

    if not args.no_write:
        args.output.write_text(render_markdown(sections, host_description(), args.smoke))
        print(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
