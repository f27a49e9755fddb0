"""xend-lite benchmarks: ``python -m bench`` runs every module here and rewrites BENCHMARKS.md.

Each benchmark module defines ``TITLE`` and ``run(ctx) -> Section``; every figure is
reported as a ratio to a baseline measured in the same run.
"""
