"""The GRPO stage end to end on real megatron-core: on-policy consistency of the recorded log-probabilities,
metrics and evaluation, the reference model only when the KL term needs it, dynamic sampling, bit-identical
resume after SIGKILL (sampler RNG included), and TP=2 over gloo matching one process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from ckpt_utils import assert_identical, checkpoint_tensors, run_trainer, run_trainer_ranks

from r1mega.config.errors import ConfigError
from r1mega.config.load import compose_config
from r1mega.config.validate import Accelerator, validate
from r1mega.data.coldstart import write_cold_start
from r1mega.data.preferences import write_preferences


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_data")
    write_cold_start(str(out), num_train=60, num_eval=8, seed=5, tokenizer_out=str(out / "tokenizer"))
    return out


@pytest.fixture(scope="module")
def reward_checkpoint(prompts, tmp_path_factory) -> Path:
    """A reward model (2 Bradley-Terry steps on pairs made from the cold-start set) with the policy's tokenizer."""
    out = tmp_path_factory.mktemp("reward_model")
    write_preferences(str(prompts), str(out), num_train=0, num_eval=0, seed=0)
    args = ["stage=reward_model", "model=qwen2_tiny", "data=preferences", f"data.train_path={out / 'train.jsonl'}",
            f"data.eval_path={out / 'eval.jsonl'}", "stage.eval_interval=0",
            f"data.tokenizer={prompts / 'tokenizer'}", "data.seq_length=384", "optim.micro_batch_size=4",
            "optim.global_batch_size=8", "optim.lr_warmup_steps=0", "optim.train_steps=2", "logging.progress_bar=false"]  # fmt: skip
    run = run_trainer(args, out / "run")
    assert run.returncode == 0, run.stdout[-3000:]
    return out / "run" / "checkpoints"


def grpo_args(data: Path, *extra: str) -> list[str]:
    return [
        "stage=grpo",
        "model=qwen2_tiny",
        "data=cold_start",
        f"data.train_path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval_prompts.jsonl'}",
        f"data.tokenizer={data / 'tokenizer'}",
        "grpo.prompts_per_step=2",
        "grpo.group_size=4",
        "grpo.max_new_tokens=12",
        "grpo.eval_samples=2",
        "grpo.eval_prompts=4",
        "grpo.loss.kl_coef=0",
        "reward.num_workers=2",
        "reward.weights={accuracy: 1.0, format: 0.5, language: 0.0}",
        "optim.micro_batch_size=4",
        "optim.train_steps=2",
        "optim.lr_warmup_steps=0",
        "optim.lr=1e-3",
        "stage.eval_interval=2",
        "logging.progress_bar=false",
        *extra,
    ]


def step_metrics(log: str, step: int) -> dict[str, float]:
    line = re.search(rf"step {step} (.*)", log).group(1)
    return {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", line)}


def test_grpo_step_is_on_policy_and_reports_everything(prompts, tmp_path):
    out = run_trainer(grpo_args(prompts), tmp_path / "run")
    assert out.returncode == 0, out.stdout[-3000:]
    first = step_metrics(out.stdout, 1)
    # One update on a fresh rollout: the training forward reproduces the sampling-time log-probabilities.
    assert abs(first["ppo_kl"]) < 1e-5 and first["pg_clipfrac_low"] == 0 and first["pg_clipfrac_high"] == 0
    for key in ("reward_mean", "reward_std", "accuracy", "format_rate", "zero_variance_groups", "response_length",
                "entropy", "rollout_tokens_per_s", "train_tokens_per_s", "rollout_s", "reward_s", "train_s"):  # fmt: skip
        assert key in first, key
    assert 1 <= first["response_length"] <= 12
    last = step_metrics(out.stdout, 2)
    assert {"eval/pass@1", "eval/cons@k", "eval/format_rate", "eval/prompts"} <= last.keys()
    assert last["eval/prompts"] == 4
    assert "reference model" not in out.stdout  # kl_coef=0: no reference model is built
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "meta.json").is_file()


def test_dynamic_sampling_refills_and_reports_zero_variance(prompts, tmp_path):
    """An untrained model scores 0 everywhere: every group has equal rewards, so dynamic sampling keeps
    sampling new prompts for all its rounds, then fills the batch with what it has."""
    args = grpo_args(prompts, "grpo.dynamic_sampling=true", "grpo.max_sampling_rounds=3", "optim.train_steps=1")
    out = run_trainer(args, tmp_path / "run")
    assert out.returncode == 0, out.stdout[-3000:]
    m = step_metrics(out.stdout, 1)
    assert m["zero_variance_groups"] == 1.0
    assert m["rollout_s"] > 0


def test_continuous_speculative_rollout_with_truncated_importance_sampling(prompts, tmp_path):
    """grpo.rollout_batch (continuous batching), grpo.speculative (MTP drafts, MoE+MLA policy) and
    grpo.loss.rollout_correction=tis: the trainer recomputes the old policy, and in fp32 its log-probabilities
    equal the engine's, so every importance weight is 1."""
    args = grpo_args(prompts, "model=dsv3_tiny", "grpo.rollout_batch=3", "grpo.speculative=true",
                     "grpo.loss.rollout_correction=tis", "optim.train_steps=1", "stage.eval_interval=0")  # fmt: skip
    out = run_trainer(args, tmp_path / "run")
    assert out.returncode == 0, out.stdout[-3000:]
    m = step_metrics(out.stdout, 1)
    assert abs(m["rollout_is_mean"] - 1) < 1e-4 and m["rollout_is_clipfrac"] == 0 and m["rollout_logp_gap"] < 1e-4
    assert abs(m["ppo_kl"]) < 1e-5 and 1 <= m["response_length"] <= 12


def test_grpo_resumes_bit_identically_with_the_kl_reference(prompts, tmp_path):
    """MoE+MLA policy, KL term on (reference model built): SIGKILL after step 2, resume, same final state."""
    args = grpo_args(prompts, "model=dsv3_tiny", "grpo.loss.kl_coef=0.01", "optim.train_steps=3", "stage.eval_interval=0",
                     "checkpoint.save_interval=1")  # fmt: skip
    straight = run_trainer(args, tmp_path / "straight")
    assert straight.returncode == 0, straight.stdout[-3000:]
    assert "reference model built" in straight.stdout
    assert step_metrics(straight.stdout, 3)["kl_loss"] > 0
    killed = run_trainer(args, tmp_path / "resumed", kill_at="train_step:2")
    assert killed.returncode != 0
    resumed = run_trainer(args, tmp_path / "resumed")
    assert resumed.returncode == 0 and "step 3" in resumed.stdout, resumed.stdout[-3000:]
    final = "checkpoints/step_00000003"
    assert_identical(
        checkpoint_tensors(tmp_path / "straight" / final), checkpoint_tensors(tmp_path / "resumed" / final)
    )


@pytest.mark.slow
def test_tensor_parallel_grpo_matches_one_process(prompts, tmp_path):
    args = grpo_args(prompts, "stage.eval_interval=0", "parallel.world_size=null")
    single = run_trainer(args, tmp_path / "single")
    assert single.returncode == 0, single.stdout[-3000:]
    logs = run_trainer_ranks(args, tmp_path / "tp2", 2, "parallel=tp2")
    assert all(log.startswith("[rc=0]") for log in logs), logs[0][-3000:]
    a, b = step_metrics(single.stdout, 2), step_metrics(logs[0], 2)
    for key in ("reward_mean", "response_length", "accuracy"):  # same samples
        assert a[key] == b[key], key
    assert abs(a["loss"] - b["loss"]) < 1e-4
    final = "checkpoints/step_00000002"
    model, _ = _max_diffs(checkpoint_tensors(tmp_path / "single" / final), checkpoint_tensors(tmp_path / "tp2" / final))
    assert model < 1e-5


def _compare_runs(single: str, logs: list[str], steps: int, keys: tuple[str, ...]) -> dict[str, float]:
    """Same samples (rewards, lengths) and the same objective terms within 1e-5 at every step; the largest
    difference seen."""
    worst: dict[str, float] = {}
    for step in range(1, steps + 1):
        a, b = step_metrics(single, step), step_metrics(logs[0], step)
        for key in ("reward_mean", "response_length", "accuracy"):
            assert a[key] == b[key], (step, key)
        for key in keys:
            worst[key] = max(worst.get(key, 0.0), abs(a[key] - b[key]))
            assert abs(a[key] - b[key]) < 1e-5, (step, key, a[key], b[key])
    return worst


def _max_diffs(x: dict, y: dict) -> tuple[float, float]:
    """Largest |difference| over model tensors and over Adam's first moments (after one update: 0.1 x the
    clipped gradient, so a 1e-6 bound on them bounds every gradient by 1e-5)."""
    weights = [k for k in x if not k.startswith(("optimizer", "scheduler")) and torch.is_tensor(x[k])]
    moments = [k for k in x if k.startswith("optimizer.state.exp_avg.")]
    assert weights and moments and x.keys() == y.keys()
    return tuple(max((x[k] - y[k]).abs().max().item() for k in keys) for keys in (weights, moments))


def test_token_budget_microbatches_match_padded_rows(prompts, tmp_path):
    """grpo.micro_batch_tokens packs responses end to end into rows of a token budget (per-response positions and
    attention) for the update and the reference / old-policy passes: one GRPO step of the MoE+MLA model (KL term,
    truncated IS, the MTP term) gives the same loss terms and gradients as padded rows within 1e-5 (fp32), with
    less padding computed. MoE load balancing (sequence aux loss, expert-bias counts) sees rows, not responses, so
    it is off here; TP2 x PP2 packed against one packed process is in the pipeline test below."""
    model = "dsv3_tiny"
    args = grpo_args(prompts, f"model={model}", "stage.eval_interval=0", "optim.train_steps=1",
                     "grpo.loss.kl_coef=0.01", "grpo.loss.rollout_correction=tis",
                     "reward.weights={accuracy: 1.0, language: 1.0}", "grpo.mtp_loss_coef=0.3",
                     "model.moe_aux_loss_coeff=0", "model.moe_router_enable_expert_bias=false")  # fmt: skip
    padded = run_trainer(args, tmp_path / "padded")
    assert padded.returncode == 0, padded.stdout[-3000:]
    packed = run_trainer([*args, "grpo.micro_batch_tokens=512"], tmp_path / "packed")
    assert packed.returncode == 0, packed.stdout[-3000:]
    mtp = ("mtp_loss", "mtp_acc")
    worst = _compare_runs(padded.stdout, [packed.stdout], 1, ("loss", "pg_loss", "kl_loss", "grad_norm", *mtp))
    a, b = step_metrics(padded.stdout, 1), step_metrics(packed.stdout, 1)
    assert (a["microbatches"], b["microbatches"]) == (2, 1)  # 8 responses: 2 x 4 padded rows, or one packed row
    assert b["pad_fraction"] == 0 < a["pad_fraction"]
    final = "checkpoints/step_00000001"
    weights, moments = _max_diffs(
        checkpoint_tensors(tmp_path / "padded" / final), checkpoint_tensors(tmp_path / "packed" / final)
    )
    print(f"{model}: max |diff| {worst}, Adam first moments {moments:.2e}, padding {a['pad_fraction']:.2f} -> "
          f"{b['pad_fraction']:.2f}")  # fmt: skip
    assert a["grad_norm"] > 1e-5 and moments < 1e-6
    assert a["mtp_loss"] > 0 and 0 <= a["mtp_acc"] <= 1


PACKED = "grpo.micro_batch_tokens=256"
MTP = "grpo.mtp_loss_coef=0.3"
GROUPS = "grpo.rollout_row_groups=2"
"""The references decode the rollout in the two row groups that PP=2 keeps in flight by default (in turn)."""
SCORED = ("pp2", "tp2pp2")
"""Layouts whose reward includes a reward model's score (reward_checkpoint), built in the policy's layout: a
continuous reward, so the groups' advantages are not all 0 (accuracy and language alone can be equal across a
group of an untrained model's responses, and were after a change of sampler)."""
PIPELINE_LAYOUTS = {  # name: (model, (ranks, overrides), the reference run's (ranks, overrides))
    # The reward model's score is part of the reward (reward_checkpoint): split into the same two stages.
    "pp2": ("qwen2_tiny", (2, ["parallel=pp2"]), (1, [GROUPS])),
    # Token-budget micro-batches on both sides: every micro-batch one packed row of the call's one width; the
    # reward model split over TP=2 x PP=2. Adam's eps 1e-6: TP's other summation order moves gradients by ~1e-7,
    # which an update g / (|g| + 1e-8) turns into 1e-5 weight differences where |g| is that small.
    "tp2pp2": (
        "qwen2_tiny",
        (4, ["parallel=pp2", "parallel.tensor_model_parallel_size=2", PACKED, "optim.adam_eps=1e-6"]),
        (1, [PACKED, GROUPS, "optim.adam_eps=1e-6"]),
    ),
    # Megatron's interleaved schedule: 4 layers as 4 virtual stages over 2 ranks (MoE + MLA, KL reference); the
    # rollout keeps 3 row groups in flight.
    "pp2vpp2": (
        "dsv3_tiny",
        (2, ["parallel=pp2", "parallel.virtual_pipeline_model_parallel_size=2", "grpo.rollout_row_groups=3"]),
        (1, ["grpo.rollout_row_groups=3"]),
    ),
    # Two data-parallel replicas sample their own prompts, so the reference is EP2 alone (the same replicas). The
    # MTP term is on: the MTP block sits on the last stage.
    "pp2ep2": (
        "dsv3_tiny",
        (4, ["parallel=pp2", "parallel.expert_model_parallel_size=2", MTP]),
        (2, ["parallel=ep2", MTP, GROUPS]),
    ),
}


def _pipeline_args(prompts: Path, model: str) -> list[str]:
    return grpo_args(prompts, f"model={model}", "stage.eval_interval=1", "parallel.world_size=null",
                     "optim.train_steps=1", "reward.weights={accuracy: 1.0, language: 1.0}")  # fmt: skip


@pytest.fixture(scope="module")
def initial_weights(prompts, tmp_path_factory):
    """``initial_weights(model)``: a checkpoint both sides of a pipeline comparison start from (megatron
    initialises each pipeline stage from its own seed): one GRPO step at lr 1e-30 in one process, made once per
    model for the layouts that share it."""
    made: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in made:
            out = tmp_path_factory.mktemp(f"init_{model}")
            args = [*_pipeline_args(prompts, model), "stage.eval_interval=0", "optim.lr=1e-30", "optim.min_lr=1e-30",
                    "optim.weight_decay=0"]  # fmt: skip
            init = run_trainer(args, out)
            assert init.returncode == 0, init.stdout[-3000:]
            made[model] = out / "checkpoints" / "step_00000001"
        return made[model]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(PIPELINE_LAYOUTS))
def test_pipeline_parallel_grpo_matches_one_process(prompts, tmp_path, layout, request, initial_weights):
    """One GRPO update under PP=2 (with a reward model's score in the reward), TP=2 x PP=2 (fp32, packed
    micro-batches) against one process, and PP=2 x EP=2
    (MoE+MLA, MTP trained) against EP=2: pipelined rollout gives the same samples, the reference and old-policy
    log-probabilities go through the pipeline schedule (KL term and truncated IS on), and the loss, KL and MTP
    terms and every gradient match within 1e-5; the held-out evaluation after it gives the same metrics."""
    model, (ranks, overrides), (ref_ranks, ref_overrides) = PIPELINE_LAYOUTS[layout]
    # Both runs start from the same weights; the language reward varies between an untrained model's responses,
    # so advantages and gradients are not 0.
    args = [*_pipeline_args(prompts, model), f"checkpoint.load={initial_weights(model)}", "grpo.loss.kl_coef=0.01",
            "grpo.loss.rollout_correction=tis"]  # fmt: skip
    if layout in SCORED:
        args += ["reward=preference", f"reward.reward_model_path={request.getfixturevalue('reward_checkpoint')}",
                 "reward.weights={accuracy: 1.0, language: 1.0, reward_model: 1.0}"]  # fmt: skip
    ref = run_trainer_ranks(args, tmp_path / "ref", ref_ranks, *ref_overrides)
    assert all(log.startswith("[rc=0]") for log in ref), ref[-1][-3000:]
    logs = run_trainer_ranks(args, tmp_path / layout, ranks, *overrides)
    assert all(log.startswith("[rc=0]") for log in logs), logs[-1][-3000:]
    if layout in SCORED:  # the reward model was built in the pipeline layout and scored every rollout
        assert "loaded for the reward_model reward" in logs[0]
    mtp = ("mtp_loss", "mtp_acc") if MTP in overrides else ()
    worst = _compare_runs(ref[0], logs, 1, ("loss", "pg_loss", "kl_loss", "rollout_is_mean", "grad_norm", *mtp))
    a, b = step_metrics(ref[0], 1), step_metrics(logs[0], 1)  # held-out evaluation through the pipelined engine
    assert {k: v for k, v in a.items() if k.startswith("eval/")} == {
        k: v for k, v in b.items() if k.startswith("eval/")
    }
    assert a["eval/prompts"] == 4
    final = "checkpoints/step_00000001"
    weights, moments = _max_diffs(
        checkpoint_tensors(tmp_path / "ref" / final), checkpoint_tensors(tmp_path / layout / final)
    )
    print(f"{layout}: max |diff| {worst}, weights {weights:.2e}, Adam first moments {moments:.2e}")
    assert step_metrics(ref[0], 1)["grad_norm"] > 1e-5  # a real update (qwen2: 0.76; the MoE model: 3.4e-5)
    assert weights < 1e-5 and moments < 1e-6


@pytest.mark.slow
def test_pipeline_parallel_grpo_resumes_bit_identically(prompts, tmp_path):
    """PP=2, MoE+MLA policy with the KL reference: SIGKILL after step 2, resume, same final state as the
    uninterrupted run (every stage holds the same sampler state)."""
    args = grpo_args(prompts, "model=dsv3_tiny", "grpo.loss.kl_coef=0.01", "optim.train_steps=3",
                     "stage.eval_interval=0", "checkpoint.save_interval=1", "grpo.max_new_tokens=8")  # fmt: skip
    straight = run_trainer_ranks(args, tmp_path / "straight", 2, "parallel=pp2")
    assert all(log.startswith("[rc=0]") for log in straight), straight[-1][-3000:]
    killed = run_trainer_ranks(args, tmp_path / "resumed", 2, "parallel=pp2", kill_at="train_step:2")
    assert not all(log.startswith("[rc=0]") for log in killed)
    resumed = run_trainer_ranks(args, tmp_path / "resumed", 2, "parallel=pp2")
    assert all(log.startswith("[rc=0]") for log in resumed) and "step 3" in resumed[0], resumed[-1][-3000:]
    final = "checkpoints/step_00000003"
    assert_identical(
        checkpoint_tensors(tmp_path / "straight" / final), checkpoint_tensors(tmp_path / "resumed" / final)
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grpo.rollout_batch=4", "grpo.rollout_batch"),
        ("grpo.speculative=true", "grpo.speculative"),
    ],
)
def test_what_grpo_under_pipeline_parallelism_refuses(prompts, override, key):
    cfg = compose_config([*grpo_args(prompts), "model=dsv3_tiny", "parallel=pp2", override])
    with pytest.raises(ConfigError) as info:
        validate(cfg, 2, Accelerator(cuda=False, transformer_engine=False))
    assert info.value.key == key


def test_grpo_validates_under_pipeline_parallelism(prompts):
    cfg = compose_config([*grpo_args(prompts), "parallel=pp2"])
    assert validate(cfg, 2, Accelerator(cuda=False, transformer_engine=False)) == 1


def test_mtp_term_and_token_budget_checks(prompts):
    accel = Accelerator(cuda=False, transformer_engine=False)
    with pytest.raises(ConfigError) as info:  # qwen2_tiny has no MTP layers
        validate(compose_config([*grpo_args(prompts), "grpo.mtp_loss_coef=0.1"]), 1, accel)
    assert info.value.key == "grpo.mtp_loss_coef"
    six = [*grpo_args(prompts), "grpo.group_size=3"]  # 6 responses a step: not a multiple of micro_batch_size=4
    with pytest.raises(ConfigError) as info:
        validate(compose_config(six), 1, accel)
    assert info.value.key == "grpo.mini_batches"
    assert validate(compose_config([*six, "grpo.micro_batch_tokens=256"]), 1, accel) == 1  # no row count to divide
    for key, value in (("grpo.micro_batch_tokens", 0), ("grpo.mtp_loss_coef", -1)):
        with pytest.raises(ConfigError) as info:
            compose_config([*grpo_args(prompts), f"{key}={value}"])
        assert info.value.key == key
