"""The pipeline report: a Markdown table of held-out accuracy per stage and PNG curves of each training step.

Curves come from the TensorBoard scalars every training run writes (``<step>/tb``): loss, reward, accuracy
and response length, whichever a step logged. The table comes from each step's evaluation (``eval.json``
written by ``r1mega-eval``: R1's protocol, pass@1 over k samples at T=0.6 / top-p 0.95, cons@k).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CURVES = {
    "loss": ("lm_loss", "loss"),
    "reward": ("reward_mean",),
    "accuracy": ("accuracy", "eval/pass@1"),
    "response length": ("response_length",),
}
"""Panel title -> scalar tags drawn in it (those a run logged), without the stage prefix runs write (``grpo/``)."""


def series(scalars: dict[str, list[tuple[int, float]]], tag: str) -> list[tuple[int, float]]:
    """The points of ``tag`` in a run's scalars: logged as ``tag`` or as ``<stage>/tag`` (``MetricsWriter``)."""
    if scalars.get(tag):
        return scalars[tag]
    for name, points in scalars.items():
        if points and name.split("/", 1)[-1] == tag:
            return points
    return []


def curve_count(runs: dict[str, dict[str, list[tuple[int, float]]]], panels: dict = CURVES) -> int:
    """How many (run, tag) lines ``plot_runs`` would draw."""
    return sum(bool(series(scalars, tag)) for scalars in runs.values() for tags in panels.values() for tag in tags)


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under a TensorBoard folder, as (step, value) lists sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_runs(runs: dict[str, dict[str, list[tuple[int, float]]]], out: str | Path, panels: dict = CURVES) -> Path:
    """One PNG: a panel per entry of ``panels`` that has data, a line per (run, tag) that has data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Only panels with data: an SFT run has no reward panel.
    panels = {title: tags for title, tags in panels.items() if curve_count(runs, {title: tags})} or panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, tags) in zip(axes[0], panels.items(), strict=True):
        for run, scalars in runs.items():
            for tag in tags:
                if points := series(scalars, tag):
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=f"{run}: {tag}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def accuracy_table(manifests: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per evaluated step (pass@1, cons@k, format rate, length, per-task pass@1)."""
    rows = [m for m in manifests if m.get("metrics")]
    if not rows:
        return "_No step was evaluated._\n"
    tasks = sorted({k for m in rows for k in m["metrics"] if k.startswith("accuracy/")})
    head = ["stage", "pass@1", "cons@k", "format", "length", *[t.split("/", 1)[1] for t in tasks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in rows:
        x = m["metrics"]
        cells = [
            m.get("label", m["name"]),
            x.get("pass@1"),
            x.get("cons@k"),
            x.get("format_rate"),
            x.get("response_length"),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in [*cells, *[x.get(t) for t in tasks]]) + " |")
    return "\n".join(lines) + "\n"


def hf_generations(manifests: Sequence[dict[str, Any]]) -> str:
    """A section per export step checked with ``transformers`` alone: greedy generations and their verdicts."""
    parts = []
    for m in manifests:
        path = Path(m.get("outputs", {}).get("generations", ""))
        if not m.get("outputs", {}).get("generations") or not path.is_file():
            continue
        data = json.loads(path.read_text())
        right = sum(g["correct"] for g in data["generations"])
        same = [g["matches_r1mega"] for g in data["generations"] if "matches_r1mega" in g]
        parity = f" Its tokens equal r1mega's greedy ones for {sum(same)}/{len(same)} prompts." if same else ""
        parts.append(
            f"\n### {m.get('label', m['name'])}: `{data['hf_dir']}`\n\n"
            f"`AutoModelForCausalLM` loaded it and generated (greedy); {right}/{len(data['generations'])} right."
            f"{parity}\n\n"
            "| prompt | completion | answer | right |\n|---|---|---|---|\n"
        )
        for g in data["generations"]:
            prompt, completion = (" ".join(g[k].replace("|", "\\|").split()) for k in ("prompt", "completion"))
            cells = [prompt[:100] + ("…" if len(prompt) > 100 else ""), completion[-200:], g["answer"]]
            parts.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | {'yes' if g['correct'] else 'no'} |\n")
    return "\n## Hugging Face exports, loaded by transformers\n" + "".join(parts) if parts else ""


def paired_comparison(manifests: Sequence[dict[str, Any]], compare: Sequence[str]) -> str:
    """The section comparing two evaluated steps (before, after) prompt by prompt, or "" without ``compare``."""
    from r1mega.eval.compare import CompareError, compare_evaluations

    if not compare:
        return ""
    by_name = {m["name"]: m for m in manifests}
    labels = [by_name.get(n, {}).get("label", n) for n in compare]
    try:
        dirs = [by_name[n]["outputs"]["eval"] for n in compare]
        c = compare_evaluations(*dirs)
    except (KeyError, CompareError) as e:
        return f"\n## {labels[0]} -> {labels[1]}\n\nNot compared: {e}\n"
    verdict = "excludes zero: a measured change" if c["significant"] else "includes zero: no measured change"
    return (
        f"\n## {labels[0]} -> {labels[1]}, paired over prompts\n\n"
        "| prompts | pass@1 before | pass@1 after | difference | 95% interval (bootstrap) | prompts better / worse |\n"
        "|---|---|---|---|---|---|\n"
        f"| {c['prompts']} | {c['before']:.3f} | {c['after']:.3f} | {c['diff']:+.3f} | "
        f"[{c['low']:+.3f}, {c['high']:+.3f}] | {c['improved']} / {c['worsened']} |\n\n"
        f"Per-prompt pass@1 (share of its samples right) after minus before; the interval resamples the prompts "
        f"({c['resamples']} times) and {verdict}.\n"
    )


def write_report(manifests: Sequence[dict[str, Any]], out_dir: str | Path, compare: Sequence[str] = ()) -> Path:
    """``<out_dir>/report.md`` with the accuracy table, the paired comparison of ``compare`` (two step names), step
    timings and one PNG of training curves per step."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# r1mega pipeline report\n", "## Held-out accuracy per stage (R1 protocol)\n", accuracy_table(manifests)]
    parts.append(paired_comparison(manifests, compare))
    parts.append("\n## Steps\n\n| step | kind | seconds | restarts | outputs |\n|---|---|---|---|---|\n")
    for m in manifests:
        outputs = ", ".join(f"{k}: `{v}`" for k, v in m.get("outputs", {}).items())
        parts.append(f"| {m['name']} | {m['kind']} | {_fmt(m.get('seconds'))} | {m.get('restarts', 0)} | {outputs} |\n")
    parts.append(hf_generations(manifests))
    parts.append("\n## Training curves\n")
    for m in manifests:
        tb = Path(m.get("outputs", {}).get("run_dir", "")) / "tb"
        if m["kind"] != "train" or not tb.is_dir():
            continue
        runs = {m["name"]: read_scalars(tb)}
        title = f"\n### {m.get('label', m['name'])}\n\n"
        if curve_count(runs):
            png = plot_runs(runs, out_dir / f"{m['name']}.png")
            parts.append(f"{title}![{m['name']}]({png.name})\n")
        else:  # an empty PNG would look like a run that learned nothing
            logged = ", ".join(sorted(runs[m["name"]])[:8]) or "none"
            parts.append(f"{title}No curve tags of the report in `{tb}` (logged: {logged}).\n")
    path = out_dir / "report.md"
    path.write_text("".join(parts))
    return path
