"""What the machine was doing while a benchmark ran, printed beside its figures.

Timings on a shared machine are only as good as the machine was quiet. Instead of a load average (which counts
the benchmark's own threads), :class:`MachineWatch` reads the CPU time every process spent during the run
(``/proc/stat``), takes away this process's own, and reports the rest as a share of the machine; on a virtual
machine it also reports the share the hypervisor gave to other guests (steal). Both are ``None`` where
``/proc/stat`` does not exist (not Linux).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .allocator import allocator_state

PROC_STAT = Path("/proc/stat")
CPU_INFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds since boot, summed over every CPU."""

    busy: float  # user + nice + system + irq + softirq (guest time is already inside user)
    steal: float  # time a virtual CPU waited while the hypervisor ran another guest
    cpus: int


def parse_proc_stat(text: str, ticks_per_s: float) -> CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat: ``cpu user nice system idle iowait irq softirq steal ...``."""
    lines = text.splitlines()
    fields = lines[0].split()
    if fields[0] != "cpu" or len(fields) < 9:
        raise ValueError(f"not a /proc/stat aggregate cpu line: {lines[0]!r}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return CpuTimes((user + nice + system + irq + softirq) / ticks_per_s, steal / ticks_per_s, cpus)


def read_cpu_times() -> CpuTimes | None:
    try:
        return parse_proc_stat(PROC_STAT.read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def cpu_model() -> str:
    try:
        for line in CPU_INFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class MachineReport:
    cpu: str
    cpus: int
    torch_version: str
    torch_threads: int
    wall_s: float
    others_share: float | None  # CPU time of every other process / (wall time x CPUs); None: not measurable
    steal_share: float | None  # CPU time stolen by the hypervisor / (wall time x CPUs)
    allocator: str  # how malloc was set: it changes a forward's time (infoflow_rag/allocator.py)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        head = (
            f"machine: {self.cpu}, {self.cpus} CPUs, torch {self.torch_version} on {self.torch_threads} threads, "
            f"malloc: {self.allocator}; "
            f"during the {self.wall_s:.0f} s run "
        )
        if self.others_share is None or self.steal_share is None:
            return head + "the load of other processes could not be read (no /proc/stat)"
        return (
            head + f"other processes used {100 * self.others_share:.1f} % of the CPUs and the hypervisor stole "
            f"{100 * self.steal_share:.1f} %"
        )


def others_and_steal(before: CpuTimes, after: CpuTimes, own_s: float, wall_s: float) -> tuple[float, float]:
    """Shares of the machine (wall time x CPUs) that other processes used and the hypervisor stole."""
    capacity = wall_s * after.cpus
    others = max(0.0, after.busy - before.busy - own_s)  # ticks are 10 ms: a short run can undercount by a few
    return others / capacity, (after.steal - before.steal) / capacity


class MachineWatch:
    """``with MachineWatch() as watch: ...`` then ``watch.report``: the machine during the block."""

    report: MachineReport | None = None  # set when the block ends, however it ends

    def __enter__(self) -> MachineWatch:
        self._times = read_cpu_times()
        self._own = time.process_time()  # every thread of this process, user + system
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall, own = time.perf_counter() - self._wall, time.process_time() - self._own
        after = read_cpu_times()
        shares: tuple[float | None, float | None] = (None, None)
        if self._times is not None and after is not None and wall > 0:
            shares = others_and_steal(self._times, after, own, wall)
        cpus = after.cpus if after is not None else os.cpu_count() or 1
        self.report = MachineReport(
            cpu_model(), cpus, torch.__version__, torch.get_num_threads(), wall, *shares, allocator_state()
        )
