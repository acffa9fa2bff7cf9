"""Results files: JSON at full precision, Markdown tables for people."""

from __future__ import annotations

from evaluation.results import EvalResult, markdown_table, read_results, render_markdown, write_results


def test_markdown_table_formats_accuracies_and_hyperparameters():
    table = markdown_table([{"C": 0.001, "holdout_top1": 81.23456, "chosen": True},
                            {"C": 10.0, "holdout_top1": 7.0, "chosen": False}])
    assert table.splitlines() == [
        "| C     | holdout top1 | chosen |",
        "|-------|--------------|--------|",
        "| 0.001 | 81.23        | yes    |",
        "| 10    | 7.00         |        |",
    ]
    assert markdown_table([]) == "(no rows)"


def test_results_round_trip_and_markdown_sections(tmp_path):
    result = EvalResult(
        task="linear", metrics={"top1": 91.234567891},
        tables={"Linear probe": [{"head": "lr0.1_blocks4_avgpool", "val_top1": 91.234567891}],
                "Grid": [{"head": "lr0.1_blocks4_avgpool", "holdout_top1": 90.0, "chosen": True}]},
        meta={"weights": "w.safetensors", "arch": "vit_small", "patch_size": 14, "train": "tr", "n_train": 10,
              "val": "va", "n_val": 5, "num_classes": 2, "seed": 0},
    )
    json_path, md_path = write_results(result, tmp_path / "out")
    assert json_path.name == "results_linear.json" and md_path.name == "results_linear.md"
    assert read_results(json_path) == result  # full precision kept
    markdown = md_path.read_text()
    assert markdown == render_markdown(result)
    assert markdown.startswith("## Linear probe: vit_small/14, weights `w.safetensors`")
    assert "train `tr` (10 images); val `va` (5 images); 2 classes; seed 0" in markdown
    assert "| 91.23" in markdown and "### Grid" in markdown
