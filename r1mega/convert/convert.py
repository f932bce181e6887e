"""Import (Hugging Face folder -> r1mega distributed checkpoint) and export (r1mega checkpoint -> Hugging Face folder).

Both stream: import builds the target model on the ``meta`` device and fills each checkpoint shard from the
safetensors tensors it needs when the writer reaches it; export reads one tensor (one expert) at a time and
writes it at its planned place in the output shards. Peak memory is about the largest tensor (plus its
Hugging Face parts), not the model (``bench/convert_memory.py`` measures it).

An imported checkpoint folder is a weights-only megatron-core checkpoint that ``checkpoint.load=<folder>``
starts training from, plus:

* ``r1mega_overrides.txt`` - the model as Hydra overrides: ``r1mega-train $(cat <folder>/r1mega_overrides.txt)
  checkpoint.load=<folder> ...`` trains it;
* ``r1mega_convert.json`` - the model config, the source's ``config.json`` (to export it back as it was) and
  provenance;
* ``tokenizer/`` - the source's tokenizer files (``data.tokenizer=<folder>/tokenizer``).

Import runs in one process (the checkpoint reshards into any TP/PP/EP layout when loaded; the layout given
in the overrides is validated and recorded) or under ``torchrun`` in the target layout, each rank writing its
own shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from r1mega.config.load import compose_config
from r1mega.config.schema import ModelConfig, ParallelConfig, R1Config
from r1mega.convert.adapter import ConvertError, HFAdapter, adapter_class, model_fields
from r1mega.convert.hf_io import (
    SafetensorsSource,
    SafetensorsWriter,
    copy_tokenizer,
    parse_size,
    read_hf_config,
    write_generation_config,
    write_hf_config,
)
from r1mega.convert.verify import VerifyReport
from r1mega.models.registry import family_for_hf_model_type, get_family
from r1mega.utils.logging import get_logger

log = get_logger(__name__)

CONVERT_META = "r1mega_convert.json"
OVERRIDES_FILE = "r1mega_overrides.txt"
TOKENIZER_DIR = "tokenizer"
FORMAT = "r1mega-hf-import/1"
_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_NOT_CARRIED = (
    "architectures",
    "model_type",
    "transformers_version",
    "quantization_config",
    "torch_dtype",
    "dtype",
    "auto_map",
    "_name_or_path",
    "rope_scaling",
    "rope_theta",
    "layer_types",
    "num_mtp_layers",
)
"""Keys of a source ``config.json`` that an export does not carry over (the adapter or transformers set them)."""


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    model: ModelConfig
    overrides: list[str]
    """Hydra overrides that rebuild the model (import)."""
    report: VerifyReport | None = None
    unused: tuple[str, ...] = ()
    """Source tensors the conversion did not use (import; should be empty)."""


def hydra_value(value: object) -> str:
    """``value`` as Hydra writes it on a command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return text if text.replace("_", "").replace("-", "").replace(".", "").isalnum() else f"'{text}'"


def model_overrides(model: ModelConfig) -> list[str]:
    """Hydra overrides that give exactly ``model`` (every field, on top of any preset)."""
    return [f"model.{key}={hydra_value(value)}" for key, value in model_fields(model).items()]


def make_adapter(model: ModelConfig, hf_config: Mapping[str, Any] | None = None) -> HFAdapter:
    """The family's adapter for ``model``, with the layout conventions of ``hf_config`` (if converting back)."""
    cls = adapter_class(get_family(model.family))
    return cls(model, **cls.conventions(hf_config or {}))


def _default_dtype(source: SafetensorsSource) -> str:
    """bf16 if the source stores any weight in bf16/fp16/fp8, else fp32 (both hold every weight exactly)."""
    floats = {source.dtype(name) for name in source}
    return "bf16" if torch.bfloat16 in floats or torch.float16 in floats else "fp32"


def _validate_layout(cfg: R1Config) -> None:
    """Check the requested parallel layout against the model offline (a one-process import still records it)."""
    from r1mega.config.validate import validate

    if cfg.parallel.world_size is not None:
        validate(cfg)


def _write_sidecars(
    out: Path, cfg: R1Config, hf: Mapping[str, Any], source_dir: str | None, overrides: list[str]
) -> None:
    meta = {
        "format": FORMAT,
        "source": source_dir,
        "model": model_fields(cfg.model),
        "precision": cfg.precision.dtype,
        "hf_config": dict(hf),
        "overrides": overrides,
    }
    (out / CONVERT_META).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    (out / OVERRIDES_FILE).write_text("\n".join(overrides) + "\n")


def import_hf(
    hf_dir: str | None,
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    source: Mapping[str, torch.Tensor] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    name: str | None = None,
    verify: bool = False,
    hf_model: torch.nn.Module | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ConvertResult:
    """Convert a Hugging Face model folder (or an in-memory ``source`` + ``hf_config``) to an r1mega checkpoint.

    ``overrides`` are Hydra overrides for everything but the model (``precision.dtype``, ``parallel.*``).
    With ``verify``, the written checkpoint is loaded and compared with the Hugging Face model (``hf_model``,
    else loaded from ``hf_dir``); a difference above tolerance raises ``VerificationError``.
    """
    from r1mega.parallel import bootstrap

    hf = dict(hf_config or read_hf_config(hf_dir))
    if source is None:
        block = (hf.get("quantization_config") or {}).get("weight_block_size", (128, 128))
        source = SafetensorsSource(hf_dir, block)
    name = name or Path(hf_dir or "hf").name.replace("-", "_").replace(".", "_").lower()
    cfg, model_ovr = _import_config(hf, source, name, overrides)
    adapter = make_adapter(cfg.model, hf)
    launch = bootstrap.read_launch_env()
    if launch.world_size == 1:
        _validate_layout(cfg)
        run_cfg = replace(cfg, parallel=ParallelConfig(world_size=1))
        ctx = bootstrap.initialize(run_cfg, bootstrap.LaunchEnv("single", 0, 1, 0, "127.0.0.1", launch.master_port))
    else:
        if verify:
            raise ConvertError("--verify runs in one process; verify afterwards with `r1mega-convert verify`")
        run_cfg = cfg
        ctx = bootstrap.initialize(cfg, launch)
    out = Path(out)
    try:
        from r1mega.convert.megatron_io import build_meta_model, write_checkpoint

        log.info("importing %s (%s) into %s", hf_dir or "a loaded model", adapter.hf_architecture, out)
        write_checkpoint(build_meta_model(run_cfg), out, lambda key: adapter.from_hf(key, source))
        unused: tuple[str, ...] = ()
        if isinstance(source, SafetensorsSource) and launch.world_size == 1:
            unused = tuple(sorted(set(source) - source.used))
            if unused:
                log.warning("%d source tensors were not used, e.g. %s", len(unused), ", ".join(unused[:5]))
        all_overrides = [*model_ovr, *overrides]
        if ctx.is_main:
            _write_sidecars(out, cfg, hf, hf_dir, all_overrides)
            if hf_dir:
                copy_tokenizer(hf_dir, out / TOKENIZER_DIR)
        report = None
        if verify:
            from r1mega.convert.verify import load_hf
            from r1mega.convert.verify import verify as run_verify

            report = run_verify(cfg, str(out), hf_model or load_hf(hf_dir), atol=atol, rtol=rtol)
            log.info("verify: %s", report)
        torch.distributed.barrier()
    finally:
        bootstrap.destroy()
    return ConvertResult(out, cfg.model, all_overrides, report, unused)


def _import_config(
    hf: Mapping[str, Any], source: Mapping[str, torch.Tensor], name: str, overrides: Sequence[str]
) -> tuple[R1Config, list[str]]:
    """The run config of an import and the overrides that give its model (and precision)."""
    try:
        cls = adapter_class(family_for_hf_model_type(hf.get("model_type", "")))
    except KeyError as e:
        raise ConvertError(e.args[0]) from None
    model = cls.model_config(hf, name)
    mtp = [
        h for rule in cls(model, **cls.conventions(hf)).rules.values() if rule.name.startswith("mtp.") for h in rule.hf
    ]
    if mtp and not any(h in source for h in mtp):
        log.warning(
            "config.json declares %d MTP layer(s) but the checkpoint has none: importing without MTP",
            model.mtp_num_layers,
        )
        model = replace(model, mtp_num_layers=0)
    model_ovr = model_overrides(model)
    if not any(o.lstrip("+~").startswith("precision") for o in overrides):  # keep the source's precision
        dtype = _default_dtype(source) if isinstance(source, SafetensorsSource) else _dtype_of(source)
        model_ovr.append(f"precision.dtype={dtype}")
    return compose_config([*model_ovr, *overrides]), model_ovr


def _dtype_of(source: Mapping[str, torch.Tensor]) -> str:
    floats = {t.dtype for t in source.values() if t.is_floating_point()}
    return "bf16" if torch.bfloat16 in floats or torch.float16 in floats else "fp32"


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The checkpoint folder (a run's ``latest`` followed) and what it says about itself:
    ``model`` (ModelConfig fields), ``hf_config`` and ``tokenizer`` where known."""
    p = Path(path)
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if (p / CONVERT_META).is_file():
        meta = json.loads((p / CONVERT_META).read_text())
        tokenizer = p / TOKENIZER_DIR
        return p, {
            "model": meta["model"],
            "hf_config": meta.get("hf_config"),
            "tokenizer": str(tokenizer) if tokenizer.is_dir() else None,
        }
    if (p / "meta.json").is_file():
        config = json.loads((p / "meta.json").read_text())["config"]
        return p, {"model": config["model"], "tokenizer": config.get("data", {}).get("tokenizer")}
    return p, {}


def export_hf(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    dtype: str | None = None,
    tokenizer: str | None = None,
    max_shard_size: str = "5GB",
    verify: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ConvertResult:
    """Convert an r1mega checkpoint (saved under any layout) to a Hugging Face folder.

    The model comes from the checkpoint (an import's ``r1mega_convert.json`` or a training checkpoint's
    ``meta.json``), else from ``overrides`` (``model=<preset> model.x=...``). ``dtype`` (fp32/bf16) casts
    the weights (default: as stored; DeepSeek's router stays fp32 as Hugging Face keeps it).
    """
    from tqdm import tqdm

    from r1mega.convert.megatron_io import CheckpointReader

    path, info = resolve_checkpoint(ckpt)
    model_ovr = model_overrides(ModelConfig(**info["model"])) if info.get("model") else []
    if not model_ovr and not any(o.split("=")[0].lstrip("+") in ("model", "model.family") for o in overrides):
        raise ConvertError(f"{path} does not say which model it holds; pass model=<preset> (and model.* overrides)")
    cfg = compose_config([*model_ovr, *overrides])
    hf_base = info.get("hf_config") or {}
    adapter = make_adapter(cfg.model, hf_base)
    reader = CheckpointReader(path)
    missing = [n for n in adapter.names() if n not in reader]
    if missing:
        raise ConvertError(
            f"{path} lacks {len(missing)} tensors of model {cfg.model.name!r}, e.g. {missing[:3]}; is it the right model config?"
        )
    cast = _DTYPE_NAMES[dtype] if dtype else None
    plan, target = [], {}
    for name in adapter.names():
        shape, stored = reader.spec(name)
        for hf_name, t in adapter.to_hf(name, torch.empty(shape, dtype=stored, device="meta")).items():
            target[hf_name] = t.dtype if cast is None or adapter.keeps_fp32(hf_name) else cast
            plan.append((hf_name, tuple(t.shape), target[hf_name]))
    out = Path(out)
    writer = SafetensorsWriter(out, plan, parse_size(max_shard_size))
    for group in tqdm(adapter.groups, desc="export", unit="layer", disable=None):
        for name in group:
            for hf_name, t in adapter.to_hf(name, reader.read(name)).items():
                writer.write(hf_name, t.to(target[hf_name]))
    writer.close()
    _write_hf_metadata(
        out, adapter, hf_base, cast or reader.spec(adapter.names()[0])[1], tokenizer or info.get("tokenizer")
    )
    log.info("exported %s to %s (%d tensors)", path, out, len(plan))
    report = _verify_export(cfg, path, out, atol, rtol) if verify else None
    return ConvertResult(out, cfg.model, model_ovr, report)


def _write_hf_metadata(
    out: Path, adapter: HFAdapter, hf_base: Mapping[str, Any], dtype: torch.dtype, tokenizer: str | None
) -> None:
    fields = {k: v for k, v in hf_base.items() if k not in _NOT_CARRIED}
    fields.update(adapter.hf_config())
    fields["dtype"] = str(dtype).removeprefix("torch.")
    bos, eos = fields.get("bos_token_id"), fields.get("eos_token_id")
    if tokenizer and copy_tokenizer(tokenizer, out):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        bos = tok.bos_token_id if tok.bos_token_id is not None else bos
        eos = tok.eos_token_id if tok.eos_token_id is not None else eos
        fields.update(bos_token_id=bos, eos_token_id=eos)
    elif not tokenizer:
        log.warning("no tokenizer given (--tokenizer): %s has no tokenizer files", out)
    write_hf_config(out, adapter.hf_model_type, adapter.hf_architecture, fields)
    write_generation_config(out, bos, eos)


def _verify_export(cfg: R1Config, ckpt: Path, out: Path, atol: float, rtol: float) -> VerifyReport:
    from r1mega.convert.verify import fp32_single_process, load_hf, verify
    from r1mega.parallel import bootstrap

    with bootstrap.single_process(fp32_single_process(cfg)):
        report = verify(cfg, str(ckpt), load_hf(str(out)), atol=atol, rtol=rtol)
    log.info("verify: %s", report)
    return report


def verify_checkpoint(
    ckpt: str | os.PathLike, hf_dir: str, overrides: Sequence[str] = (), atol: float = 1e-4, rtol: float = 1e-4
) -> VerifyReport:
    """Compare an r1mega checkpoint with a Hugging Face folder (``r1mega-convert verify``)."""
    path, info = resolve_checkpoint(ckpt)
    model_ovr = model_overrides(ModelConfig(**info["model"])) if info.get("model") else []
    return _verify_export(compose_config([*model_ovr, *overrides]), path, Path(hf_dir), atol, rtol)
