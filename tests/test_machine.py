"""How busy the machine was during a benchmark: /proc/stat arithmetic and the report the bench prints."""

import time

import pytest

from infoflow_rag import machine
from infoflow_rag.machine import CpuTimes, MachineWatch, others_and_steal, parse_proc_stat

STAT = """cpu  1000 20 300 9000 50 7 3 40 0 0
cpu0 500 10 150 4500 25 4 1 20 0 0
cpu1 500 10 150 4500 25 3 2 20 0 0
intr 12345
ctxt 678
"""


def test_proc_stat_busy_time_counts_user_nice_system_irq_softirq_and_not_idle_or_steal():
    times = parse_proc_stat(STAT, ticks_per_s=100)
    assert times == CpuTimes(busy=(1000 + 20 + 300 + 7 + 3) / 100, steal=0.4, cpus=2)


def test_proc_stat_refuses_text_that_is_not_its_cpu_line():
    with pytest.raises(ValueError, match="not a /proc/stat aggregate cpu line"):
        parse_proc_stat("intr 1 2 3\n", ticks_per_s=100)


def test_shares_leave_out_this_process_and_divide_by_the_whole_machine():
    before, after = CpuTimes(100.0, 1.0, 2), CpuTimes(118.0, 2.0, 2)  # 18 s busy, 1 s stolen in 10 s on 2 CPUs
    others, steal = others_and_steal(before, after, own_s=15.0, wall_s=10.0)
    assert others == pytest.approx(3 / 20) and steal == pytest.approx(1 / 20)
    assert others_and_steal(before, after, own_s=18.5, wall_s=10.0)[0] == 0  # tick rounding never goes negative


def test_watch_reports_what_other_processes_used_beside_its_own_work(monkeypatch):
    snapshots = iter([CpuTimes(50.0, 0.0, 2), CpuTimes(58.0, 0.5, 2)])
    clocks = {"process_time": iter([1.0, 7.0]), "perf_counter": iter([10.0, 15.0])}
    monkeypatch.setattr(machine, "read_cpu_times", lambda: next(snapshots))
    for name, values in clocks.items():
        monkeypatch.setattr(machine.time, name, lambda values=values: next(values))
    with MachineWatch() as watch:
        pass
    report = watch.report
    assert report.wall_s == 5.0 and report.cpus == 2
    assert report.others_share == pytest.approx((8 - 6) / 10) and report.steal_share == pytest.approx(0.05)
    assert "other processes used 20.0 % of the CPUs and the hypervisor stole 5.0 %" in report.line()


def test_watch_says_so_where_proc_stat_cannot_be_read(monkeypatch):
    monkeypatch.setattr(machine, "read_cpu_times", lambda: None)
    with MachineWatch() as watch:
        pass
    assert watch.report.others_share is None and watch.report.cpus >= 1
    assert "could not be read" in watch.report.line()


def test_watch_on_this_machine_gives_shares_of_at_most_the_whole_machine():
    if machine.read_cpu_times() is None:
        pytest.skip("no /proc/stat on this OS: the report says so (tested above)")
    with MachineWatch() as watch:
        end = time.perf_counter() + 0.2  # long enough that 10 ms ticks move a share by a few % at most
        while time.perf_counter() < end:
            pass
    r = watch.report
    assert r.cpus >= 1 and r.torch_threads >= 1 and r.cpu and r.wall_s >= 0.2
    assert 0 <= r.others_share <= 1.1 and 0 <= r.steal_share <= 1.1
