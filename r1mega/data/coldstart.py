"""A cold-start SFT set in R1's format from reasoning-gym's seeded, verifiable math generators (offline).

Each record is a prompt with step-by-step ``reasoning`` (rendered inside ``<think>``) and a response ending
in ``\\boxed{answer}``. ``gsm_symbolic`` brings its own worked solution; for the other tasks a solver
registered here writes one from the question's metadata and recomputes the answer, and an item whose
recomputed answer differs from reasoning-gym's is left out (counted). Prompts are deduplicated over the
whole set, so the held-out eval prompts never appear in training.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1mega.utils.logging import get_logger

log = get_logger(__name__)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""DeepSeek-R1's recommended instruction for math prompts, appended to every question."""

Solution = tuple[str, str]
"""(worked reasoning, answer it arrives at)."""


class ColdStartError(ValueError):
    """The cold-start set cannot be built as asked; the message says why and what to change."""


@dataclass
class ColdStartTask:
    """One reasoning-gym generator and how to write its worked solution."""

    weight: float
    """Share of the set drawn from this task (normalised over the chosen tasks)."""
    solve: Callable[[dict[str, Any]], Solution]
    """Writes the reasoning for a reasoning-gym item and returns it with the answer it computes."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``reasoning_gym.create_dataset`` (difficulty), besides seed and size."""


TASKS: dict[str, ColdStartTask] = {}
"""Registered tasks by reasoning-gym name, in generation order."""


def register_task(name: str, weight: float, **config: Any) -> Callable:
    """Decorator: register ``solve`` as the worked-solution writer of reasoning-gym task ``name``."""

    def wrap(solve: Callable[[dict[str, Any]], Solution]) -> Callable[[dict[str, Any]], Solution]:
        TASKS[name] = ColdStartTask(weight=weight, solve=solve, config=config)
        return solve

    return wrap


@register_task("gsm_symbolic", 0.3)
def _solve_gsm(item: dict[str, Any]) -> Solution:
    cot = item["metadata"]["answer_cot"]
    lines = [line for line in cot.strip().splitlines() if not line.startswith("####")]
    final = [line for line in cot.splitlines() if line.startswith("####")]
    answer = final[-1][4:].strip().replace(",", "") if final else item["answer"]
    if float(answer) == float(item["answer"]):
        answer = item["answer"]
    return "\n".join(lines), answer


@register_task("chain_sum", 0.15, max_terms=5, max_digits=3)
def _solve_chain_sum(item: dict[str, Any]) -> Solution:
    parts = item["metadata"]["expression"].split()
    total = int(parts[0])
    lines = [f"Work from left to right, starting with {total}."]
    for op, term in zip(parts[1::2], parts[2::2], strict=True):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    lines.append(f"So the result is {total}.")
    return "\n".join(lines), str(total)


_OPS: dict[type, tuple[str, Callable[[int, int], int]]] = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.floordiv),  # reasoning-gym's basic_arithmetic divides with floor
}


def _number(node: ast.AST) -> int | None:
    """The integer a node stands for when it is a literal or a negated literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _number(node.operand)
        if value is not None:
            return -value if isinstance(node.op, ast.USub) else value
    return None


def _fold(node: ast.AST) -> ast.AST:
    """Turn signs applied to numbers into plain numbers: ``-(-84)`` becomes ``84``."""
    if isinstance(node, ast.BinOp):
        node.left, node.right = _fold(node.left), _fold(node.right)
    elif isinstance(node, ast.UnaryOp):
        node.operand = _fold(node.operand)
        value = _number(node)
        if value is not None:
            return ast.Constant(value)
    return node


def _reduce_once(node: ast.AST) -> tuple[ast.AST, str] | None:
    """Compute the leftmost innermost operation on two numbers: (new node, step text), or None when done."""
    if isinstance(node, ast.BinOp):
        a, b = _number(node.left), _number(node.right)
        if a is not None and b is not None:
            symbol, fn = _OPS[type(node.op)]
            value = fn(a, b)
            note = " (rounded down)" if symbol == "/" and a % b else ""
            return ast.Constant(value), f"{a} {symbol} {b} = {value}{note}"
        for side in ("left", "right"):
            done = _reduce_once(getattr(node, side))
            if done is not None:
                setattr(node, side, done[0])
                return node, done[1]
    elif isinstance(node, ast.UnaryOp):
        done = _reduce_once(node.operand)
        if done is not None:
            node.operand = done[0]
            return node, done[1]
    return None


@register_task("basic_arithmetic", 0.15, max_terms=4, max_digits=2)
def _solve_basic_arithmetic(item: dict[str, Any]) -> Solution:
    expression = item["metadata"]["expression"]
    tree = _fold(ast.parse(expression, mode="eval").body)
    lines = [f"Evaluate {expression}: brackets first, then * and / before + and -, left to right."]
    while (done := _reduce_once(tree)) is not None:
        tree, step = done
        tree = _fold(tree)
        rest = ast.unparse(tree)
        lines.append(step if step.endswith(f"= {rest}") else f"{step}, leaving {rest}")
    value = _number(tree)
    lines.append(f"So the value is {value}.")
    return "\n".join(lines), str(value)


def _multiply(a: int, b: int) -> tuple[list[str], int]:
    """Long multiplication of a by b split into place values of b."""
    if abs(b) < 10:
        return [f"{a} * {b} = {a * b}"], a * b
    digits = str(abs(b))
    sign = -1 if b < 0 else 1
    parts = [(sign * int(d) * 10 ** (len(digits) - i - 1)) for i, d in enumerate(digits) if d != "0"]
    products = [a * p for p in parts]
    lines = [f"Split {b} = {' + '.join(map(str, parts))}."]
    lines += [f"{a} * {p} = {q}" for p, q in zip(parts, products, strict=True)]
    if len(products) > 1:
        lines.append(f"Add the parts: {' + '.join(map(str, products))} = {a * b}")
    return lines, a * b


@register_task("products", 0.1, max_digits=3)
def _solve_products(item: dict[str, Any]) -> Solution:
    factors = [int(x) for x in item["metadata"]["expression"].split(" * ")]
    lines, total = [], factors[0]
    for factor in factors[1:]:
        steps, total_next = _multiply(total, factor)
        lines += steps
        total = total_next
    lines.append(f"So the product is {total}.")
    return "\n".join(lines), str(total)


def _euclid(a: int, b: int) -> tuple[list[str], int]:
    """Euclid's algorithm with one line per division."""
    a, b = max(a, b), min(a, b)
    lines = []
    while b:
        lines.append(f"{a} = {a // b} * {b} + {a % b}")
        a, b = b, a % b
    lines.append(f"The last non-zero remainder is {a}, so the GCD is {a}.")
    return lines, a


@register_task("gcd", 0.075)
def _solve_gcd(item: dict[str, Any]) -> Solution:
    numbers = item["metadata"]["numbers"]
    lines, g = [f"Use Euclid's algorithm on {', '.join(map(str, numbers))}."], numbers[0]
    for n in numbers[1:]:
        steps, g = _euclid(g, n)
        lines += steps
    return "\n".join(lines), str(g)


@register_task("lcm", 0.075)
def _solve_lcm(item: dict[str, Any]) -> Solution:
    numbers = item["metadata"]["numbers"]
    lines, m = ["lcm(a, b) = a * b / gcd(a, b)."], numbers[0]
    for n in numbers[1:]:
        steps, g = _euclid(m, n)
        lines += [f"Find gcd({m}, {n}):", *steps]
        lines.append(f"lcm({m}, {n}) = {m} * {n} / {g} = {m * n // g}")
        m = m * n // g
    return "\n".join(lines), str(m)


@register_task("leg_counting", 0.1, max_animals=6, max_instances=10)
def _solve_leg_counting(item: dict[str, Any]) -> Solution:
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    lines, totals = [], []
    for animal, count in item["metadata"]["animals"].items():
        legs = ANIMALS[animal]
        totals.append(count * legs)
        lines.append(f"Each {animal} has {legs} legs: {count} * {legs} = {count * legs}")
    total = sum(totals)
    lines.append(f"Total: {' + '.join(map(str, totals))} = {total}")
    return "\n".join(lines), str(total)


@register_task("prime_factorization", 0.05)
def _solve_prime_factorization(item: dict[str, Any]) -> Solution:
    n = item["metadata"]["number"]
    lines, factors, p = [f"Divide {n} by the smallest primes that go into it."], [], 2
    while p * p <= n:
        while n % p == 0:
            lines.append(f"{n} / {p} = {n // p}")
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        lines.append(f"{n} is prime.")
        factors.append(n)
    answer = " × ".join(map(str, factors))
    lines.append(f"So the factorization is {answer}.")
    return "\n".join(lines), answer


PRESETS: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {
    "easy": {
        "chain_sum": (1.0, {"min_terms": 2, "max_terms": 3, "max_digits": 1}),
        "leg_counting": (1.0, {"min_animals": 1, "max_animals": 2, "max_instances": 5}),
        "gcd": (1.0, {"max_value": 50}),
    },
    "smollm2": {
        "basic_arithmetic": (0.6, {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
        "chain_sum": (0.25, {"min_terms": 2, "max_terms": 2, "max_digits": 1}),
        "products": (0.15, {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),
    },
}
"""Named task mixes besides ``default`` (every registered task at its registered weight and difficulty):
task -> (weight, reasoning-gym difficulty). ``easy`` is the tiny CPU pipeline's: sums of two or three
one-digit numbers, legs of one or two kinds of animal, GCDs up to 50 -- short worked solutions a 64-wide
model learns in minutes, so GRPO starts from a policy that is sometimes right. ``smollm2`` is what the base
SmolLM2-135M-Instruct partly solves (measured with ``grpo=r1_chat``'s prompt, 16 prompts per task, T=0.6):
one-digit sums 25%, one-digit +-*/ 12%, one-digit products 12%; it solved none of 16 GCDs (up to 20) or leg
counts (one kind of animal, up to 3), so those are left out. The weights follow how many distinct prompts each
generator has at this size (two one-digit terms: 200 sums, about 100 products), so 600 fit."""


def task_plan(preset: str = "default", tasks: Sequence[str] | None = None) -> dict[str, tuple[float, dict[str, Any]]]:
    """task -> (weight, reasoning-gym difficulty) of ``preset``, restricted to ``tasks`` when given."""
    if preset == "default":
        plan = {name: (t.weight, t.config) for name, t in TASKS.items()}
    elif preset in PRESETS:
        plan = PRESETS[preset]
    else:
        raise ColdStartError(f"Unknown cold-start preset {preset!r}: choose from default, {', '.join(PRESETS)}.")
    names = list(tasks) if tasks else list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        raise ColdStartError(
            f"Unknown cold-start task(s) {unknown} for preset {preset}: choose from {', '.join(plan)}."
        )
    return {n: plan[n] for n in names}


def make_prompt(question: str) -> str:
    """The user prompt for a reasoning-gym question: the question, then R1's math instruction."""
    return f"{question.strip()}\n{INSTRUCTION}"


def make_response(answer: str) -> str:
    """The answer after the reasoning: the final result in ``\\boxed{}``."""
    return f"The answer is \\boxed{{{answer}}}."


def make_plain_response(answer: str) -> str:
    """The answer in words, without ``\\boxed{}``: right, but no verifier can find it."""
    return f"The answer is {answer}."


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` over tasks in proportion to weights (largest remainder, ties by task order)."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    by_remainder = sorted(weights, key=lambda k: -(exact[k] - counts[k]))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def generate_cold_start(
    num_train: int = 3000,
    num_eval: int = 200,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    preset: str = "default",
    unboxed_share: float = 0.0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Build (train, eval) SFT records; deterministic in the arguments, prompts distinct over both lists.

    A record is ``{"id", "prompt", "reasoning", "response", "meta": {"task", "answer", "source_index"}}``
    (the SFT JSONL schema of ``r1mega.data.sft``); ``id`` is ``<task>-s<seed>-<index>`` (``<task>-<preset>-...``
    for a preset other than ``default``) and does not depend on the sizes asked for. ``preset`` names a task
    mix and difficulty (:data:`PRESETS`); ``tasks`` restricts it. ``unboxed_share`` of the training records (chosen by
    the seed) state their answer in plain words (:func:`make_plain_response`, ``meta.unboxed = true``) instead
    of in ``\\boxed{}``: a cold start whose answer format is inconsistent, as collected traces are. The model
    imitates both; only a boxed answer can be verified, so GRPO's accuracy reward has to teach it the one that
    pays (R1's rule-based rewards check the box, and so does the evaluation). Held-out records are unchanged.
    """
    import reasoning_gym

    plan = task_plan(preset, tasks)
    if num_train <= 0 or num_eval < 0:
        raise ColdStartError(f"num_train={num_train}, num_eval={num_eval}: need num_train > 0 and num_eval >= 0.")
    if not 0.0 <= unboxed_share <= 1.0:
        raise ColdStartError(f"unboxed_share={unboxed_share}: need a share between 0 and 1.")
    weights = {n: w for n, (w, _) in plan.items()}
    tag = "" if preset == "default" else f"-{preset}"
    n_train, n_eval = _allocate(num_train, weights), _allocate(num_eval, weights)
    seen: set[str] = set()
    train, held_out = [], []
    for name, (_, difficulty) in plan.items():
        need, skipped = n_train[name] + n_eval[name], 0
        size = 4 * need + 100
        task_seed = zlib.crc32(f"{seed}:{name}".encode())
        dataset = reasoning_gym.create_dataset(name, seed=task_seed, size=size, **difficulty)
        records = []
        for index in range(size):
            if len(records) == need:
                break
            item = dataset[index]
            prompt = make_prompt(item["question"])
            if prompt in seen:
                continue
            try:
                reasoning, answer = TASKS[name].solve(item)
            except ArithmeticError:  # e.g. a division by zero the generator let through
                answer = None
            if answer != item["answer"]:
                skipped += 1
                continue
            seen.add(prompt)
            records.append(
                {
                    "id": f"{name}{tag}-s{seed}-{index:06d}",
                    "prompt": prompt,
                    "reasoning": reasoning,
                    "response": make_response(answer),
                    "meta": {"task": name, "answer": answer, "source_index": index},
                }
            )
        if len(records) < need:
            raise ColdStartError(
                f"Task {name} gave only {len(records)} distinct prompts of the {need} asked: ask for fewer examples."
            )
        if skipped:
            log.warning("%s: left out %d item(s) whose worked solution disagreed with the answer", name, skipped)
        held_out += records[: n_eval[name]]
        train += records[n_eval[name] :]
    rng = random.Random(f"r1mega-coldstart:{seed}")
    rng.shuffle(train)
    rng.shuffle(held_out)
    unboxed = random.Random(f"r1mega-coldstart-unboxed:{seed}").sample(
        range(len(train)), round(unboxed_share * len(train))
    )
    for i in unboxed:
        answer = train[i]["meta"]["answer"]
        train[i] = {**train[i], "response": make_plain_response(answer), "meta": {**train[i]["meta"], "unboxed": True}}
    return train, held_out


def eval_prompt(record: dict[str, Any]) -> dict[str, str]:
    """The prompt-only form a GRPO or evaluation stage reads: ``{"id", "task", "prompt", "answer"}``."""
    meta = record["meta"]
    return {"id": record["id"], "task": meta["task"], "prompt": record["prompt"], "answer": meta["answer"]}


def tokenizer_corpus(records: Sequence[dict[str, Any]]) -> list[str]:
    """The texts a tokenizer for this set is trained on: prompt, reasoning and response of each record."""
    return [f"{r['prompt']}\n{r['reasoning']}\n{r['response']}" for r in records]


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_cold_start(
    out_dir: str,
    num_train: int = 3000,
    num_eval: int = 200,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    tokenizer_out: str | None = None,
    vocab_size: int = 2048,
    preset: str = "default",
    unboxed_share: float = 0.0,
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``eval.jsonl`` (SFT records), ``eval_prompts.jsonl`` and ``manifest.json``.

    With ``tokenizer_out`` also trains R1's tiny byte-level BPE on the training records and saves it
    there. Returns the manifest (preset, sizes, per-task counts, seed, tokenizer size), which is deterministic too.
    """
    start = time.perf_counter()
    train, held_out = generate_cold_start(num_train, num_eval, seed, tasks, preset, unboxed_share)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", held_out)
    _write_jsonl(out / "eval_prompts.jsonl", [eval_prompt(r) for r in held_out])
    manifest: dict[str, Any] = {
        "preset": preset,
        "unboxed_share": unboxed_share,
        "seed": seed,
        "num_train": len(train),
        "num_eval": len(held_out),
        "tasks": {
            name: {
                "train": sum(r["meta"]["task"] == name for r in train),
                "eval": sum(r["meta"]["task"] == name for r in held_out),
            }
            for name in task_plan(preset, tasks)
        },
    }
    if tokenizer_out is not None:
        from r1mega.data.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(tokenizer_corpus(train), vocab_size, tokenizer_out)
        manifest["tokenizer"] = {"path": str(tokenizer_out), "vocab_size": len(tokenizer)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info(
        "Cold-start set in %s: %d train, %d eval examples (%.1f s)",
        out,
        len(train),
        len(held_out),
        time.perf_counter() - start,
    )
    return manifest
