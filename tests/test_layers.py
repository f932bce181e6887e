"""r1mega's layer order: no import cycles, and every import points down the table below.

The graph is read with ``ast`` (tests/import_graph.py; nothing is imported) and counts every import: at module
level, inside functions, and under ``if TYPE_CHECKING:`` (a type-only import is still a dependency a reader
follows, and it is how the old cycle hid: ``checkpoint.manager`` -> ``train.step`` for a type hint). A lower
layer that must name something above it does so as a ``"module:attr"`` string resolved at run time
(``ModelFamily.adapter``, resolved by ``r1mega.convert.adapter.adapter_class``), which is no import.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
from import_graph import ROOT, Edge, import_edges, module_names, strongly_connected

LAYERS: list[tuple[str, ...]] = [
    ("r1mega.cli",),  # entry points: one Hydra app or argparse command each
    ("r1mega.pipeline", "r1mega.loop"),  # the multi-stage pipeline runner; the one training loop
    ("r1mega.stages",),  # SFT, GRPO, reward model, pretrain; rejection sampling and distillation jobs
    ("r1mega.eval",),  # R1's evaluation protocol
    ("r1mega.rewards",),  # rule rewards, verifier pool, the reward model's scorer
    ("r1mega.rollout",),  # generation engine and the offline generation job
    ("r1mega.convert", "r1mega.data", "r1mega.rl"),  # HF state-dict adapters; datasets; RL maths
    ("r1mega.checkpoint",),  # saving and loading weights, optimizer and trainer state
    ("r1mega.train",),  # the engine: wrapping, optimizer, forward-backward step, metrics, signals
    ("r1mega.models",),  # model families, layer specs, builder
    ("r1mega.parallel",),  # process groups and layouts
    ("r1mega.config", "r1mega.conf"),  # typed config schemas and their YAML
    ("r1mega.utils",),  # logging, devices, fault injection
]
"""Top to bottom. A module may import from its own entry or any lower layer; entries that share a layer are
independent (neither imports the other). A module belongs to the longest entry that prefixes its name, so
``r1mega.loop`` (the one training loop) sits above the stages it runs while ``r1mega.train`` (the engine) sits below them."""


def _entry(module: str, layers: list[tuple[str, ...]]) -> tuple[int, str] | None:
    """(layer index, entry) of ``module``: the longest entry that is the module or one of its packages."""
    best: tuple[int, str] | None = None
    for index, entries in enumerate(layers):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return best


def layer_violations(edges: list[Edge], layers: list[tuple[str, ...]]) -> list[str]:
    """Every import that points up the table or across a layer, as ``path:line: src -> dst (why)``.

    The package ``__init__`` files an import runs on the way are left out: they sit in the layer of the
    module named or below it, so the import statement itself is the one to report.
    """
    found = []
    for e in edges:
        if e.implicit:
            continue
        src, dst = _entry(e.src, layers), _entry(e.dst, layers)
        if src is None or dst is None or src[1] == dst[1]:
            continue
        if dst[0] < src[0]:
            why = f"{dst[1]} is above {src[1]}"
        elif dst[0] == src[0]:
            why = f"{src[1]} and {dst[1]} share a layer and are independent"
        else:
            continue
        found.append(f"{e.path}:{e.line}: {e.src} -> {e.dst} ({why})")
    return found


def unplaced(modules: set[str], layers: list[tuple[str, ...]]) -> list[str]:
    """Modules that no entry of the table covers (the package root aside)."""
    return sorted(m for m in modules if "." in m and _entry(m, layers) is None)


def check(package_dir: Path, layers: list[tuple[str, ...]]) -> tuple[list[list[str]], list[str], list[str]]:
    """(cycles, layer violations, unplaced modules) of the package at ``package_dir``."""
    edges = import_edges(package_dir)
    modules = set(module_names(package_dir))
    return strongly_connected(modules, edges), layer_violations(edges, layers), unplaced(modules, layers)


@functools.cache
def _r1mega() -> tuple[list[list[str]], list[str], list[str]]:
    return check(ROOT / "r1mega", LAYERS)


def test_r1mega_has_no_import_cycles() -> None:
    cycles, _, _ = _r1mega()
    assert cycles == [], "import cycles (break them by moving the shared piece down a layer):\n" + "\n".join(
        ", ".join(c) for c in cycles
    )


def test_r1mega_imports_follow_the_layer_order() -> None:
    _, violations, missing = _r1mega()
    assert missing == [], f"modules no layer covers (add their package to LAYERS): {missing}"
    assert violations == [], "imports against the layer order:\n" + "\n".join(violations)


def _plant(tmp_path: Path, module: str, code: str) -> Path:
    """A copy of r1mega's sources with ``code`` appended to ``module``'s file."""
    copy = tmp_path / "r1mega"
    shutil.copytree(ROOT / "r1mega", copy, ignore=shutil.ignore_patterns("*.yaml", "__pycache__"))
    path = copy / (module.replace(".", "/").removeprefix("r1mega/") + ".py")
    path.write_text(path.read_text() + "\n" + code)
    return copy


@pytest.mark.parametrize(
    "code",
    [
        "from r1mega.stages import get_stage\n",
        "def f():\n    from r1mega.stages.grpo import GRPOStage\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import r1mega.stages.sft\n",
    ],
    ids=["module-level", "in-a-function", "type-checking"],
)
def test_a_planted_wrong_import_fails(tmp_path: Path, code: str) -> None:
    """config importing a stage, however written, is reported with its file and line, and closes a cycle."""
    cycles, violations, _ = check(_plant(tmp_path, "r1mega.config.schema_rl", code), LAYERS)
    assert len(violations) == 1 and violations[0].startswith("r1mega/config/schema_rl.py:")
    assert "(r1mega.stages is above r1mega.config)" in violations[0]
    assert any("r1mega.config.schema_rl" in c and any(m.startswith("r1mega.stages") for m in c) for c in cycles)


def test_an_import_between_independent_entries_fails(tmp_path: Path) -> None:
    _, violations, _ = check(_plant(tmp_path, "r1mega.rl.kl", "from r1mega.data.sft import SFTDataError\n"), LAYERS)
    assert len(violations) == 1 and violations[0].startswith("r1mega/rl/kl.py:")
    assert violations[0].endswith(
        ": r1mega.rl.kl -> r1mega.data.sft (r1mega.rl and r1mega.data share a layer and are independent)"
    )


def test_a_module_outside_the_table_is_reported(tmp_path: Path) -> None:
    copy = _plant(tmp_path, "r1mega.utils.logging", "")
    (copy / "extra").mkdir()
    (copy / "extra" / "__init__.py").write_text("")
    assert check(copy, LAYERS)[2] == ["r1mega.extra"]
