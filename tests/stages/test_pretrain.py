"""Pretraining on the chat JSONL corpus (the tiny pipeline's base model): loss on every token, prompts included."""

from __future__ import annotations

from r1mega.config.load import compose_config
from r1mega.data.coldstart import write_cold_start
from r1mega.parallel.bootstrap import single_process
from r1mega.stages.pretrain import PretrainStage
from r1mega.stages.sft import SFTStage


def test_jsonl_corpus_puts_loss_on_prompt_tokens_too(tmp_path):
    write_cold_start(str(tmp_path), num_train=24, num_eval=4, seed=1, tokenizer_out=str(tmp_path / "tok"))
    data = [f"data.train_path={tmp_path / 'train.jsonl'}", f"data.tokenizer={tmp_path / 'tok'}", "data.seq_length=256"]
    overrides = [
        "data=cold_start",
        *data,
        "data.eval_path=null",
        "optim.micro_batch_size=2",
        "optim.global_batch_size=2",
    ]
    cfg = compose_config(["stage=pretrain", *overrides])
    with single_process(cfg) as ctx:
        pre = next(PretrainStage(cfg, ctx).batches(0))
        sft = next(SFTStage(compose_config(["stage=sft", *overrides]), ctx).batches(0))
    assert (pre["tokens"] == sft["tokens"]).all()  # the same rows in the same order
    assert (pre["loss_mask"] >= sft["loss_mask"]).all()  # every SFT (assistant) token keeps its loss
    assert pre["loss_mask"].sum() > 1.5 * sft["loss_mask"].sum()  # prompts and template tokens carry loss too
