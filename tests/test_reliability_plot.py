"""Issue 26 point 8: `pretrain plot` on a folder without metrics says which folder it expects, not a bare errno."""

from __future__ import annotations

import pytest

from pretrain.__main__ import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Errno" not in err and "Traceback" not in err
    return err


def test_plot_of_a_folder_without_metrics_names_the_expected_folder(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    err = _error_line(capsys)
    assert str(tmp_path) in err and "metrics.jsonl" in err and "runs/pretrain/" in err


def test_plot_of_a_missing_folder(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 1
    err = _error_line(capsys)
    assert "nope is not a folder" in err and "runs/pretrain/" in err


@pytest.mark.parametrize("missing", ["metrics.jsonl", "config.yaml"])
def test_plot_names_the_missing_file_and_the_run_of_a_subfolder(tmp_path, capsys, missing):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    for name in {"metrics.jsonl", "config.yaml"} - {missing}:
        (run / name).write_text('{"step": 1, "total_loss": 1.0}\n' if name == "metrics.jsonl" else "")
    assert main(["plot", str(run)]) == 1
    assert f"has no {missing}" in _error_line(capsys)
    (run / missing).write_text("")
    assert main(["plot", str(run / "export")]) == 1
    assert f"did you mean {run.resolve()}?" in _error_line(capsys)
