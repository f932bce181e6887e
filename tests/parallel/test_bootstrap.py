"""The launcher's environment: torchrun, srun without torchrun, or a single process."""

from __future__ import annotations

import pytest

from r1mega.parallel.bootstrap import first_slurm_host, read_launch_env


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu007", "gpu007"),
        ("gpu[003-005,9]", "gpu003"),
        ("gpu[003-005],cpu1", "gpu003"),
        ("a-node[10,12-14]-ib", "a-node10-ib"),
        ("cpu1,gpu[1-2]", "cpu1"),
        ("localhost", "localhost"),
    ],
)
def test_first_slurm_host(nodelist: str, first: str) -> None:
    assert first_slurm_host(nodelist) == first


def test_torchrun_variables_win() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n1",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("n1", 1234)


def test_srun_without_torchrun() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node[04-07]",
        "SLURM_JOB_ID": "123456",
    }
    launch = read_launch_env(env)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 5, 16, 1)
    assert launch.master_addr == "node04"
    assert launch.master_port == 20000 + 123456 % 20000  # the same on every task of the job


def test_srun_respects_an_explicit_master() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "x[1-2]",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "4242",
    }
    launch = read_launch_env(env)
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 4242)


def test_single_process() -> None:
    launch = read_launch_env({})
    assert (launch.launcher, launch.rank, launch.world_size) == ("single", 0, 1)
    assert launch.master_port == 0  # the store binds port 0 and the system picks: no port chosen early to lose
    assert read_launch_env({"MASTER_PORT": "4343"}).master_port == 4343
