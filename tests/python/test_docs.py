"""docs/interop.md shows exactly the code the interop tests run: each
`<!-- snippet: PATH -->` marker is followed by a python block equal to the
file, and every snippet file is shown."""
import re

from conftest import ROOT

DOC = ROOT / "docs" / "interop.md"
SNIPPETS = ROOT / "tests" / "python" / "snippets"


def test_doc_blocks_equal_the_snippet_files():
    text = DOC.read_text()
    found = re.findall(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```\n", text, re.S)
    assert found, "no snippet markers in docs/interop.md"
    shown = set()
    for path, code in found:
        assert code == (ROOT / path).read_text(), f"docs/interop.md differs from {path}"
        shown.add((ROOT / path).resolve())
    assert shown == {p.resolve() for p in SNIPPETS.glob("*.py")}
