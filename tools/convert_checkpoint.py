#!/usr/bin/env python
"""Hugging Face <-> r1mega checkpoints: the ``r1mega-convert`` command as a script.

Examples::

    python tools/convert_checkpoint.py import --hf ~/models/Qwen2.5-1.5B --out ckpt/qwen --verify
    python tools/convert_checkpoint.py export --ckpt runs/sft/checkpoints --out hf/sft --dtype bf16
    r1mega-train $(cat ckpt/qwen/r1mega_overrides.txt) checkpoint.load=ckpt/qwen stage=sft ...

The logic lives in ``r1mega.convert`` (adapters per family, streaming readers/writers, the audit).
"""

from r1mega.cli.convert import main

if __name__ == "__main__":
    main()
