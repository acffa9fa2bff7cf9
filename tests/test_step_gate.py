"""The step gate (pretrain.step_gate): a run waits before a step while the test's hold file exists, and says so."""

from __future__ import annotations

import threading

import pytest

from pretrain.step_gate import at_path, hold_path, wait_at_gate

pytestmark = pytest.mark.timeout(60)  # a gate that never announces itself must fail, not hang


def test_no_gate_folder_or_no_hold_file_passes_at_once(tmp_path):
    wait_at_gate("", 3, is_main=True)
    wait_at_gate(str(tmp_path), 3, is_main=True)
    assert not at_path(tmp_path, 3).exists()


def test_held_until_the_hold_file_is_removed(tmp_path):
    hold_path(tmp_path, 4).touch()
    passed = threading.Event()

    def run() -> None:
        wait_at_gate(str(tmp_path), 4, is_main=True, poll_s=0.01)
        passed.set()

    thread = threading.Thread(target=run)
    thread.start()
    while not at_path(tmp_path, 4).exists():  # the run announces that it stands at the gate
        assert thread.is_alive()
        threading.Event().wait(0.01)
    assert not passed.is_set()
    hold_path(tmp_path, 4).unlink()
    thread.join(timeout=30)
    assert passed.is_set()


def test_only_the_main_process_announces(tmp_path):
    hold_path(tmp_path, 2).touch()
    thread = threading.Thread(target=wait_at_gate, args=(str(tmp_path), 2, False, 0.01))
    thread.start()
    thread.join(timeout=0.2)
    assert thread.is_alive() and not at_path(tmp_path, 2).exists()
    hold_path(tmp_path, 2).unlink()
    thread.join(timeout=30)
    assert not thread.is_alive()
