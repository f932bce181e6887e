#!/usr/bin/env python
"""Plot a run's TensorBoard scalars against the step, one panel per scalar, into a PNG.

Examples::

    python tools/plot_metrics.py runs/grpo_tiny --out runs/grpo_tiny/metrics.png
    python tools/plot_metrics.py runs/grpo_tiny --scalars reward_mean eval/pass@1 --csv runs/grpo_tiny/metrics.csv

A scalar is named with or without its stage prefix (``reward_mean`` matches ``grpo/reward_mean``); names
that match nothing are listed and skipped. ``--csv`` also writes every plotted value (tag, step, value).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

DEFAULT_SCALARS = ("reward_mean", "accuracy", "eval/pass@1", "response_length", "loss")
"""What a GRPO run is judged by: rollout reward and accuracy, held-out pass@1, response length, loss."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (its tb/ is read), or a folder of TensorBoard event files")
    parser.add_argument("--out", default=None, help="PNG to write (default: <run>/metrics.png)")
    parser.add_argument(
        "--scalars",
        nargs="+",
        default=list(DEFAULT_SCALARS),
        help=f"scalars to plot (default: {' '.join(DEFAULT_SCALARS)})",
    )
    parser.add_argument("--csv", default=None, help="also write the plotted values to this CSV (tag, step, value)")
    parser.add_argument("--title", default=None, help="figure title (default: the run folder)")
    return parser.parse_args(argv)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``folder`` (recursively) -> [(step, value)] sorted by step (the last write of a step wins)."""
    from r1mega.pipeline.report import read_scalars as read

    if not any(folder.rglob("events.out.tfevents.*")):
        raise SystemExit(f"No TensorBoard event files under {folder}: pass a run folder or its tb/ folder.")
    return read(folder)


def resolve(name: str, tags: list[str]) -> str | None:
    """The tag ``name`` stands for: itself, else the one tag ending in ``/<name>`` (None when absent or ambiguous)."""
    if name in tags:
        return name
    matches = [t for t in tags if t.endswith(f"/{name}") and t.count("/") == name.count("/") + 1]
    return matches[0] if len(matches) == 1 else None


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    """One panel per tag in a grid, markers when a series has few points; saves ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (tag, points) in zip(axes.flat, series.items(), strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Read the scalars, plot the chosen ones, optionally dump them to CSV."""
    args = parse_args(argv)
    run = Path(args.run)
    folder = run / "tb" if (run / "tb").is_dir() else run
    scalars = read_scalars(folder)
    tags = sorted(scalars)
    chosen: dict[str, list[tuple[int, float]]] = {}
    for name in args.scalars:
        tag = resolve(name, tags)
        if tag is None:
            print(f"skipping {name}: no such scalar (have: {', '.join(tags)})", file=sys.stderr)
        else:
            chosen[tag] = scalars[tag]
    if not chosen:
        raise SystemExit(f"None of {args.scalars} is among the scalars of {folder}: {', '.join(tags)}")
    out = Path(args.out) if args.out else run / "metrics.png"
    plot(chosen, out, args.title or str(run))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["tag", "step", "value"])
            writer.writerows((tag, step, value) for tag, points in chosen.items() for step, value in points)
    print(f"wrote {out} ({', '.join(chosen)})")


if __name__ == "__main__":
    main()
