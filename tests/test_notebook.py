"""notebooks/training.ipynb: committed without outputs, and "Run all" works top to bottom (with a tiny model).

The run test is how CI executes the notebook: nbclient starts the `python3` kernel of the ipykernel installed in
this environment, with PAIR_NOTEBOOK_FLAGS shrinking the run (the notebook's parameters cell reads it), and fails on
the first cell that raises. It takes about 30-60 s on two CPU cores.
"""

from __future__ import annotations

import shlex
import sys

import nbformat
from conftest import REPO
from nbclient import NotebookClient

NOTEBOOK = REPO / "notebooks" / "training.ipynb"
# a 2 x 64 model, 40 steps, a short sample, no compilation: seconds of training on a CPU
TINY_FLAGS = (
    "--max_steps 40 --eval_every 10 --log_every 10 --eval_steps 2 --warmup_steps 5 --num_blocks 2 --num_heads 2 "
    "--embedding_dim 64 --context_len 64 --batch_size 8 --num_samples 1 --sample_tokens 50 --torch_compile False "
    "--device cpu"
)


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    with_outputs = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not with_outputs, f"code cells {with_outputs} carry outputs: clear them before committing"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, shakespeare_path):
    paths = ["--data_path", str(shakespeare_path), "--runs_dir", str(tmp_path / "runs")]
    paths += ["--save_model_dir", str(tmp_path / "models")]
    monkeypatch.setenv("PAIR_NOTEBOOK_FLAGS", f"{TINY_FLAGS} {shlex.join(paths)}")
    monkeypatch.setenv("PAIR_NOTEBOOK_CASES", "romeo,caliban_cue,unseen_chars")
    # Jupyter's user folders (kernelspecs, runtime files) in tmp: a `python3` kernelspec installed for the user
    # could point at another Python; this way the kernel is this environment's ipykernel.
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails

    text, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") + output.get("data", {}).get("text/plain", ""))
            images += "image/png" in output.get("data", {})
    text = "\n".join(text)
    assert f"python: {sys.executable}" in text  # the kernel is this environment's Python
    assert "step 40/40" in text and "final val loss" in text  # train.train ran the whole tiny run
    assert images == 1  # the loss curves
    assert "ROMEO:" in text  # the sample
    assert "3 cases:" in text and "checks passed" in text and "FAILED" not in text
    assert (tmp_path / "runs" / "notebook" / "plot.png").is_file()
    assert (tmp_path / "models" / "notebook" / "latest").is_file()
