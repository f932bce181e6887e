"""Distributed start-up: read the launcher's environment, open the process group, build parallel state.

Works under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), under ``srun``
without torchrun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST as
master) and as a plain single process. gloo on CPU, NCCL on GPU. megatron-core's parallel state is
initialised for TP/PP/VPP/CP/EP/ETP/DP from the ``parallel`` config group.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from r1mega.config.schema import R1Config
from r1mega.config.validate import detect_accelerator, validate
from r1mega.utils.device import BF16_CPU_FLAGS, cpu_has_native_bf16
from r1mega.utils.logging import get_logger

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection

log = get_logger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as the launcher described it."""

    launcher: str
    """torchrun, slurm or single."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    """0 for a single process with no MASTER_PORT: its store binds a port the system picks (see ``initialize``)."""


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[003-005,9],cpu1`` (-> ``gpu003``)."""
    depth, first = 0, nodelist
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            first = nodelist[:i]
            break
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if not match:
        return first
    prefix, ranges, suffix = match.groups()
    start = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{start}{suffix}"


def read_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launcher's view of this process: torchrun's variables first, then Slurm's, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            env.get("MASTER_ADDR") or first_slurm_host(nodelist),
            int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
        )
    return LaunchEnv("single", 0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or 0))


PROCESS_GROUPS = ("tp", "pp", "cp", "ep", "expt_tp", "dp", "dp_cp", "expt_dp")
"""The megatron-core process groups a ``ParallelContext`` carries (``ProcessGroupCollection`` field names)."""


@dataclass
class ParallelContext:
    """The started distributed run, passed explicitly to what needs it.

    Stages, the rollout engine and the generation jobs take their process groups from ``groups`` (megatron-core's
    ``ProcessGroupCollection``, filled once by ``initialize``) instead of reading ``parallel_state`` globals, so
    what a component communicates over is visible at its call site.
    """

    launch: LaunchEnv
    data_parallel_size: int
    device: torch.device
    groups: ProcessGroupCollection
    """This rank's groups: tp, pp, cp, ep, expt_tp (experts' TP), dp, dp_cp, expt_dp."""

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    @property
    def dp_rank(self) -> int:
        """This rank's index in its data-parallel group."""
        return dist.get_rank(self.groups.dp)

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return dist.get_rank(self.groups.tp)

    @property
    def tp_size(self) -> int:
        return dist.get_world_size(self.groups.tp)

    @property
    def ep_size(self) -> int:
        return dist.get_world_size(self.groups.ep)


def initialize(cfg: R1Config, launch: LaunchEnv | None = None) -> ParallelContext:
    """Validate the config for this world size, open the process group and megatron-core's parallel state."""
    launch = launch or read_launch_env()
    dp = validate(cfg, launch.world_size)  # fails before any collective if the layout cannot work
    cuda = torch.cuda.is_available()
    if not cuda:
        from r1mega.parallel import cpu_compat

        cpu_compat.apply()
        # megatron-core wraps small elementwise functions in torch.compile (its jit_fuser; the MoE router's
        # expert-bias token count is the one r1mega's models reach). On a CPU, inductor traces and compiles it in
        # every process (measured: 2-4 s of a 9 s three-step MoE run, more with a cold compile cache) to fuse an
        # integer sum: run such functions eagerly. GPU runs keep megatron's compiled fusions.
        torch.compiler.set_stance("force_eager")
        device = torch.device("cpu")
    else:
        torch.cuda.set_device(launch.local_rank)
        device = torch.device("cuda", launch.local_rank)
        if cfg.deterministic:
            _deterministic_cuda()
        if not detect_accelerator().transformer_engine:
            from r1mega.parallel import cpu_compat

            # megatron-core 0.16.1 without TE on a GPU: the MoE router names te_general_gemm unguarded, and MLA
            # believes TE is present (its stand-in module imports); the same fixes the CPU path needs.
            cpu_compat.apply(force=True, only=list(cpu_compat.WITHOUT_TE))
    backend = cfg.parallel.backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    if not dist.is_initialized() and launch.master_port == 0:
        # One process and no port given: the store listens on port 0, so the system picks a free port at bind.
        # Choosing a free port first and binding it later lost a race in CI (EADDRINUSE: a connection in between
        # took the port as its source port).
        if launch.world_size != 1:
            raise ValueError(f"{launch.world_size} processes need a MASTER_PORT to meet at")
        store = dist.TCPStore(launch.master_addr, 0, 1, is_master=True, timeout=timeout)
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    elif not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
        )
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.etp,
        distributed_timeout_minutes=p.timeout_minutes,
    )
    model_parallel_cuda_manual_seed(cfg.seed)
    groups = ProcessGroupCollection.use_mpu_process_groups(list(PROCESS_GROUPS))
    torch.manual_seed(cfg.seed)
    log.info(
        "started %d process(es) via %s: TP=%d PP=%d CP=%d EP=%d ETP=%d DP=%d on %s (%s)",
        launch.world_size,
        launch.launcher,
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
        p.expert_model_parallel_size,
        p.etp,
        dp,
        device,
        backend,
    )
    if device.type == "cpu" and cfg.precision.dtype == "bf16" and not cpu_has_native_bf16():
        log.warning(
            "precision=bf16 on a CPU without native bf16 (no %s in /proc/cpuinfo): torch emulates bf16 matrix "
            "products, several times slower than fp32 here; precision=fp32 is the faster choice on this machine",
            " or ".join(BF16_CPU_FLAGS),
        )
    return ParallelContext(launch=launch, data_parallel_size=dp, device=device, groups=groups)


def _deterministic_cuda() -> None:
    """Deterministic CUDA kernels, as megatron's ``--deterministic-mode``: cuBLAS with a fixed workspace (read
    when its handle is made, so before the first matmul) and torch's deterministic algorithms (a kernel with no
    deterministic version warns rather than stops the run)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=True)


def destroy() -> None:
    """Tear down megatron-core's parallel state and the process group, and reset per-process MoE state."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process(cfg: R1Config) -> Iterator[ParallelContext]:
    """A one-process run (tests, tools): initialise, yield, tear down."""
    ctx = initialize(cfg, LaunchEnv("single", 0, 1, 0, "127.0.0.1", 0))
    try:
        yield ctx
    finally:
        destroy()
