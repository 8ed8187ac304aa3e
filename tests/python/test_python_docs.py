"""docs/python.md shows the example the suite runs, and the example runs."""
import os
import re
import subprocess
import sys

from kit import ROOT

DOC = ROOT / "docs" / "python.md"


def test_doc_shows_the_example_file():
    text = DOC.read_text()
    found = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```\n", text, re.S)
    assert found, "no example in docs/python.md"
    for path, code in found:
        assert code == (ROOT / path).read_text(), f"docs/python.md differs from {path}"


def test_example_runs_and_answers(tmp_path):
    run = tmp_path / "torch-digits"
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/python/examples/torch_digits.py"), str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    # The three answers: proponents, class shares and shares per epoch.
    assert "rank_in_layer" in out.stdout and "share" in out.stdout and "epoch" in out.stdout
    import reptrace

    checks = reptrace.open(run).verify()
    assert not [c for c in checks if c["status"] == "FAIL"], checks


def test_transformer_example_runs_and_answers(tmp_path):
    run = tmp_path / "transformer"
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/python/examples/torch_transformer.py"), str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    # Proponents at the token embedding and an attention projection, class
    # shares, and each layer's storage.
    assert "rank_in_layer" in out.stdout and "share" in out.stdout
    assert re.search(r"^tok\s+embedding\s+factors\s+\d+ B/record$", out.stdout, re.M), out.stdout
    assert re.search(r"^blocks.0.ln1\s+layer_norm\s+full\s+\d+ B/record$", out.stdout, re.M)
    import reptrace

    checks = reptrace.open(run).verify()
    assert not [c for c in checks if c["status"] == "FAIL"], checks
