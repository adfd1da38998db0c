"""The README's Python API, as a notebook user meets it: examples/notebook.ipynb executed in a real
Jupyter kernel (nbclient, ipykernel), its outputs checked against the NumPy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from reference import assert_close, vggish

from worker import checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_notebook_runs_in_a_kernel_and_its_numbers_equal_the_reference(tmp_path, monkeypatch, machine):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("VGGISH_EXAMPLE_DIR", str(tmp_path))
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    results = [
        "".join(o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))
        for cell in notebook.cells if cell.cell_type == "code"
    ]
    assert results[1] == "(200, 128)"  # embed(...).embeddings.shape
    assert "file_name" in results[2] and "e0" in results[2]  # the frame, then e0..
    assert results[3] == "(202, 128)"  # a 2 s recording landed under watch: 2 rows more

    weights = checkpoint.read_variables(tmp_path / "model" / "vggish_untrained.ckpt")
    spectrograms = np.fromfile(tmp_path / "wavfile_spec.dat").reshape(-1, 96, 64)
    embeddings = np.fromfile(tmp_path / "wavfile_embed.dat").reshape(-1, 128)
    assert_close(embeddings, vggish(weights, spectrograms, relu_embedding=True))
