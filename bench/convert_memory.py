"""Streaming conversion memory: peak RSS of ``r1mega-convert import`` and ``export`` on a synthetic multi-GB model.

Writes a random Llama-architecture Hugging Face checkpoint (default: hidden 2048, 24 layers, MHA, vocab 32000,
bf16: 1.36 B parameters, 2.7 GB in 2 GB shards) one tensor at a time, then runs the import and the export each in
a fresh process that reports its peak resident set size (``VmHWM``, the high-water mark of its own address space;
``ru_maxrss`` would also count what the parent held when it started the child). A further fresh process per phase
imports the same libraries and builds the converter (for import also the meta-device model) without converting
anything: its peak is the fixed cost (Python, torch, megatron-core, transformers) that any conversion pays.

Reported per phase: peak RSS, peak RSS / checkpoint size, and the memory the conversion itself adds (peak minus
the fixed cost) against the checkpoint and against its largest layer (the embedding or output matrix here).
Streaming means that last ratio stays a small number while the checkpoint / model grows.

Measured (2 shared CPU cores, bf16): 2.73 GB checkpoint - import peak 0.99 GB (0.36 x checkpoint; 0.55 GB above
the 0.44 GB fixed cost = 4.2 x the 131 MB largest layer), export peak 0.64 GB (0.24 x; 0.35 GB above 0.29 GB =
2.7 x). 5.20 GB checkpoint (--layers 48) - import 0.95 GB (0.18 x), export 0.61 GB (0.12 x): flat as the model
doubles. An import holds about one 256 MiB checkpoint file being written (``megatron_io.FILE_BYTES``) plus the
tensors in hand; an export one tensor and its Hugging Face parts.

Example::

    python bench/convert_memory.py                              # 2.7 GB bf16 model, in a temporary folder
    python bench/convert_memory.py --layers 48 --dir /scratch   # 5.2 GB
    python bench/convert_memory.py --hidden 256 --layers 2 --vocab 1024 --ffn 512   # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("write", "baseline-import", "baseline-export", "import", "export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (default 2048)")
    parser.add_argument("--ffn", type=int, default=5632, help="MLP intermediate size (default 5632)")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (default 24)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads = key/value heads (default 16)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weight dtype (default bf16)")
    parser.add_argument("--shard-size", default="2GB", help="safetensors shard size of the synthetic model")
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--cli", nargs=argparse.REMAINDER, default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def hf_config(args: argparse.Namespace) -> dict:
    """The synthetic model's ``config.json`` fields."""
    return dict(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def write_synthetic(folder: Path, args: argparse.Namespace) -> tuple[int, int]:
    """A random Hugging Face Llama checkpoint, written a tensor at a time; returns (total bytes, largest layer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from r1mega.convert.hf_io import SafetensorsWriter, parse_size, write_hf_config

    fields, dtype = hf_config(args), {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with torch.device("meta"):  # names and shapes only
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(LlamaConfig(**fields)).state_dict().items()}
    writer = SafetensorsWriter(folder, [(k, s, dtype) for k, s in shapes.items()], parse_size(args.shard_size))
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        writer.write(name, (0.02 * torch.randn(shape, generator=generator)).to(dtype))
    writer.close()
    write_hf_config(folder, "llama", "LlamaForCausalLM", dict(fields, dtype=str(dtype).removeprefix("torch.")))
    layers: dict[str, int] = {}
    for name, shape in shapes.items():
        layer = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        layers[layer] = layers.get(layer, 0) + math.prod(shape) * dtype.itemsize
    return sum(layers.values()), max(layers.values())


def high_water_mark() -> int:
    """This process's peak resident set size in bytes (``VmHWM`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_phase(phase: str, args: argparse.Namespace, folder: Path, cli: list[str] = ()) -> tuple[dict, float]:
    """Run one phase in a fresh process; what it printed as JSON on its last line, and its wall time."""
    sizes = [
        "--hidden",
        args.hidden,
        "--ffn",
        args.ffn,
        "--layers",
        args.layers,
        "--heads",
        args.heads,
        "--vocab",
        args.vocab,
    ]
    sizes += ["--dtype", args.dtype, "--shard-size", args.shard_size]
    command = [sys.executable, __file__, *map(str, sizes), "--phase", phase, "--dir", str(folder), "--cli", *cli]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def baseline(phase: str, folder: str) -> None:
    """What a conversion pays before converting anything: its libraries and, for an import, the meta model."""
    from r1mega.config.load import compose_config
    from r1mega.convert.convert import make_adapter, model_overrides, resolve_checkpoint
    from r1mega.convert.hf_io import read_hf_config
    from r1mega.convert.llama import LlamaAdapter
    from r1mega.convert.megatron_io import CheckpointReader, build_meta_model

    if phase == "export":
        path, info = resolve_checkpoint(folder)
        from r1mega.config.schema import ModelConfig

        make_adapter(compose_config(model_overrides(ModelConfig(**info["model"]))).model)
        CheckpointReader(path)
        return
    from r1mega.parallel.bootstrap import single_process

    model = LlamaAdapter.model_config(read_hf_config(folder), "synthetic")
    cfg = compose_config(model_overrides(model))
    make_adapter(model)
    with single_process(cfg):
        build_meta_model(cfg)


def child(args: argparse.Namespace) -> None:
    """One phase, in its own process; prints its result as JSON."""
    folder = Path(args.dir)
    result: dict = {}
    if args.phase == "write":
        result["checkpoint_bytes"], result["largest_layer_bytes"] = write_synthetic(folder, args)
    elif args.phase.startswith("baseline-"):
        baseline(args.phase.removeprefix("baseline-"), str(folder))
    else:
        from r1mega.cli.convert import main as convert

        convert(args.cli)
    result["peak_rss_bytes"] = high_water_mark()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    """Write the synthetic model, measure import and export, print and optionally save the figures."""
    args = parse_args(argv)
    if args.phase:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        written, seconds = run_phase("write", args, root / "hf")
        size, layer = written["checkpoint_bytes"], written["largest_layer_bytes"]
        print(
            f"synthetic model: {size / 1e9:.2f} GB ({args.dtype}), largest layer {layer / 1e6:.0f} MB, written in {seconds:.0f} s"
        )
        results: dict = {"checkpoint_bytes": size, "largest_layer_bytes": layer}
        for phase, source, cli in (
            ("import", root / "hf", ["import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]),
            ("export", root / "ckpt", ["export", "--ckpt", str(root / "ckpt"), "--out", str(root / "out")]),
        ):
            fixed = run_phase(f"baseline-{phase}", args, source)[0]["peak_rss_bytes"]
            measured, seconds = run_phase(phase, args, source, cli)
            peak = measured["peak_rss_bytes"]
            added = peak - fixed
            results[phase] = {
                "peak_rss_bytes": peak,
                "fixed_rss_bytes": fixed,
                "seconds": seconds,
                "peak_over_checkpoint": peak / size,
                "added_over_checkpoint": added / size,
                "added_over_largest_layer": added / layer,
            }
            print(
                f"RESULT {phase}: peak RSS {peak / 1e9:.2f} GB = {peak / size:.3f} x checkpoint; fixed cost {fixed / 1e9:.2f} GB; "
                f"added by converting {added / 1e9:.3f} GB = {added / size:.3f} x checkpoint = {added / layer:.2f} x largest layer ({seconds:.0f} s)"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
