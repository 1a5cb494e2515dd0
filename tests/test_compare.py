"""The Python API of fine-tuning (keyword options, a run in a fresh process) gives the command's
results; the markdown table of a comparison."""
import json

import numpy as np
import pytest

from numlm import compare
from numlm.cli import main
from numlm.finetune import finetune, FinetuneArgs
from safetensors.numpy import load_file
from tests.test_finetune import bert_dir, data_csv  # noqa: F401 (fixtures)


def test_markdown_table_cells():
    t = compare.markdown_table(["method", "acc", "params", "s", "note"],
                               [["full", compare.percent(0.80314), 22713218, 91.26, None],
                                ["lora", compare.percent(0.7), 74498, 0.5, "a|b"]])
    assert t.splitlines() == ["| method | acc | params | s | note |", "| --- | --- | --- | --- | --- |",
                              "| full | 80.3% | 22,713,218 | 91.26 | - |", "| lora | 70.0% | 74,498 | 0.5 | a\\|b |"]
    with pytest.raises(ValueError, match="2 cells, the header 3"):
        compare.markdown_table(["a", "b", "c"], [[1, 2]])


def test_cli_flags():
    assert compare.cli_flags({"method": "lora", "r": 4, "alpha": 8.0, "progress": False, "resume": True,
                              "lr": None, "overwrite": False}) == \
        ["--method", "lora", "--r", "4", "--alpha", "8.0", "--no-progress", "--resume"]
    assert compare.cli_flags({"target": ["query", "key"]}) == ["--target", "query,key"]  # was "['query', 'key']"


def test_keyword_api_and_fresh_process_give_the_commands_results(bert_dir, data_csv, tmp_path):
    opts = dict(method="lora", r=2, alpha=4.0, epochs=1, batch_size=8, lr=1e-2)
    assert main(["finetune", str(bert_dir), "--data", str(data_csv), "--out", str(tmp_path / "cli"),
                 "--no-progress", "--method", "lora", "--r", "2", "--alpha", "4", "--epochs", "1",
                 "--batch-size", "8", "--lr", "1e-2"]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    api = finetune(bert_dir, data=data_csv, out=tmp_path / "api", progress=False, log=lambda *a: None, **opts)
    sub = compare.finetune_in_subprocess(bert_dir, data_csv, tmp_path / "sub", **opts)
    for res in (api, sub):
        for k in ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "trainable_params", "steps"):
            assert res[k] == cli[k], k
    assert cli["trainable_params"] == 2 * 2 * (2 * 16 + 2 * 16) + (16 * 2 + 2)  # q, v in 2 layers + classifier
    a, b = (load_file(str(tmp_path / d / "best" / "adapter_model.safetensors")) for d in ("cli", "sub"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_api_bad_options(bert_dir, data_csv, tmp_path):
    with pytest.raises(ValueError, match="unknown option 'rank'"):
        finetune(bert_dir, data=data_csv, out=tmp_path / "x", rank=4)
    with pytest.raises(ValueError, match="not both"):
        finetune(FinetuneArgs(str(bert_dir), str(data_csv), str(tmp_path / "x")), data=data_csv)
    with pytest.raises(ValueError, match="unknown option"):
        compare.finetune_in_subprocess(bert_dir, data_csv, tmp_path / "y", rank=4)
    with pytest.raises(RuntimeError, match="exited with 2: numlm finetune: error: argument --r: must be an integer >= 1"):
        compare.finetune_in_subprocess(bert_dir, data_csv, tmp_path / "z", method="lora", r=0)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_result_cells_read_the_results_dict():
    res = {"test_accuracy": 0.8236677, "val_accuracy": 0.84, "trainable_params": 74498, "train_seconds": 333.6,
           "peak_mb": 1312.09}
    assert compare.result_cells(res) == ["82.4%", "84.0%", 74498, "334 s", "1312 MB"]
    assert compare.result_cells(res, peak=False) == ["82.4%", "84.0%", 74498, "334 s"]
