"""MFU: against a data-sheet peak, or a re-measured CPU peak that keeps the fastest rate; never above 1."""

from __future__ import annotations

import logging
import math

from pretrain.throughput import Throughput


def test_mfu_against_a_fixed_peak():
    stats = Throughput(flops_per_step=4e9, peak=1e10, world_size=2).stats(images=8, step_seconds=2.0,
                                                                         data_seconds=0.5)
    assert stats == {"images_per_s": 8.0, "data_time_s": 0.5, "step_time_s": 2.0, "mfu": 0.2}


def test_a_disturbed_cpu_peak_is_replaced_by_the_fastest_measurement():
    readings = iter([2e9, 8e9, 5e9])  # the first taken while data workers started
    throughput = Throughput(flops_per_step=4e9, peak=0.0, measure=lambda: next(readings))
    mfus = [throughput.stats(images=1, step_seconds=1.0, data_seconds=0.0)["mfu"] for _ in range(3)]
    assert math.isnan(mfus[0])  # 4e9 / 2e9 = 2: unreliable, not reported as a figure
    assert mfus[1:] == [0.5, 0.5]  # the peak keeps the fastest reading


def test_the_cpu_peak_is_measured_at_the_first_reports_only():
    calls = []
    throughput = Throughput(flops_per_step=4e9, peak=0.0, measure=lambda: calls.append(1) or 8e9, measurements=2)
    mfus = [throughput.stats(images=1, step_seconds=1.0, data_seconds=0.0)["mfu"] for _ in range(5)]
    assert len(calls) == 2  # each measurement is a second of matmuls: not paid at every log of a long run
    assert mfus == [0.5] * 5


def test_mfu_above_one_warns_once(caplog):
    throughput = Throughput(flops_per_step=4e9, peak=1e9)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert math.isnan(throughput.stats(images=1, step_seconds=1.0, data_seconds=0.0)["mfu"])
    assert len([r for r in caplog.records if "unreliable" in r.message]) == 1
