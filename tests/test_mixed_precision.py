"""Stages with different precision settings in one `alignkit run`: accelerate keeps the first stage's precision for
the whole process unless alignkit resets what it keeps between stages."""

import json

import pytest
from conftest import alignkit, summary
from test_guarantees import loads, micro


@pytest.mark.parametrize("first, second", [(False, True), (True, False)])
def test_stages_with_different_precision_run_in_one_process(tmp_path, capsys, first, second):
    recipe, run = micro(tmp_path), tmp_path / "run"
    code, out, err = alignkit(
        capsys,
        "run",
        recipe,
        f"stages.pretrain.trainer.bf16={str(first).lower()}",
        f"stages.sft.trainer.bf16={str(second).lower()}",
    )
    assert code == 0, err[-3000:]
    assert summary(out) == {"pretrain": "trained", "sft": "trained"}
    loads(run, "pretrain", "sft")
    for stage in ("pretrain", "sft"):  # each trained all its steps
        history = json.loads((run / stage / "metrics.json").read_text())["log_history"]
        assert history[-1]["step"] == 3
