"""Default intra-op threads per worker: the CPU quota (cgroup v1/v2, affinity) shared out among workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnserve.errors import FailedPreconditionError
from cnnserve.serving.config import service_config, worker_threads
from cnnserve.serving.threads import available_cores, cpu_quota_cores, default_threads


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_quota_is_read_along_the_process_path(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/kubepods/pod1/ctr")
    write(root / "cpu.max", "max 100000")
    write(root / "kubepods" / "pod1" / "cpu.max", "250000 100000")  # the pod: 2.5 cores
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000")  # the container: no own limit
    assert cpu_quota_cores(root, proc) == pytest.approx(2.5)
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "150000 100000")  # the tighter one wins
    assert cpu_quota_cores(root, proc) == pytest.approx(1.5)


def test_cgroup_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/user.slice")
    write(root / "cpu.max", "max 100000")
    write(root / "user.slice" / "cpu.max", "max 100000")
    assert cpu_quota_cores(root, proc) is None


def test_cgroup_v2_in_a_container_whose_path_is_the_hosts(tmp_path: Path) -> None:
    """The container sees its own cgroup mounted at the root while /proc/self/cgroup names the host path."""
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "0::/system.slice/docker-abc.scope")
    write(root / "cpu.max", "200000 100000")
    assert cpu_quota_cores(root, proc) == pytest.approx(2.0)


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc-self-cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc")
    ctl = root / "cpu,cpuacct" / "docker" / "abc"
    write(ctl / "cpu.cfs_quota_us", "300000")
    write(ctl / "cpu.cfs_period_us", "100000")
    assert cpu_quota_cores(root, proc) == pytest.approx(3.0)
    write(ctl / "cpu.cfs_quota_us", "-1")  # no limit
    assert cpu_quota_cores(root, proc) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota_cores(tmp_path / "nothing", tmp_path / "no-proc") is None


def test_cores_are_the_affinity_capped_by_the_quota_rounded_down() -> None:
    assert available_cores(quota_cores=None, affinity=8, read_quota=False) == 8
    assert available_cores(quota_cores=2.5, affinity=8) == 2
    assert available_cores(quota_cores=16.0, affinity=8) == 8
    assert available_cores(quota_cores=0.5, affinity=8) == 1  # at least one


@pytest.mark.parametrize(
    ("cores", "workers", "cap", "expected"),
    [
        (2, 1, None, 2),  # one compute-bound AlexNet worker takes the cores
        (2, 2, 1, 1),  # two LeNet workers: one each
        (16, 2, 1, 1),  # LeNet is capped at one thread however many cores there are
        (16, 3, None, 5),
        (2, 8, None, 1),  # more workers than cores: never 0
    ],
)
def test_default_threads(cores: int, workers: int, cap: int | None, expected: int) -> None:
    assert default_threads(cores, workers, cap) == expected


def test_service_config_applies_the_rule_unless_told() -> None:
    alexnet_yaml = {"format": "onnx"}
    lenet_yaml = {"format": "onnx", "max_threads": 1}
    assert service_config(alexnet_yaml, {}, "cpu", workers=1, cores=4).threads == 4
    assert service_config(alexnet_yaml, {}, "cpu", workers=2, cores=4).threads == 2
    assert service_config(lenet_yaml, {}, "cpu", workers=1, cores=4).threads == 1
    # every worker on the machine counts when the operator says how many there are
    machine = {"CNNSERVE_WORKERS_ON_MACHINE": "4"}
    assert service_config(alexnet_yaml, machine, "cpu", workers=1, cores=8).threads == 2
    # the explicit settings win: the env over the yaml over the rule
    assert service_config({**alexnet_yaml, "threads": 3}, {}, "cpu", workers=1, cores=8).threads == 3
    env = {"CNNSERVE_WORKER_THREADS": "5"}
    assert service_config({**lenet_yaml, "threads": 3}, env, "cpu", workers=1, cores=8).threads == 5
    assert service_config({**alexnet_yaml, "max_threads": 2}, {}, "cpu", workers=1, cores=8).threads == 2


def test_bad_thread_settings_name_their_source() -> None:
    with pytest.raises(FailedPreconditionError, match="CNNSERVE_WORKERS_ON_MACHINE='none'"):
        worker_threads({}, {"CNNSERVE_WORKERS_ON_MACHINE": "none"}, 1, cores=2)
    with pytest.raises(FailedPreconditionError, match=r"handler\.max_threads=0"):
        worker_threads({"max_threads": 0}, {}, 1, cores=2)


def test_this_machine_has_at_least_one_core() -> None:
    assert available_cores() >= 1
