"""docs/interop.md shows exactly the code the interop tests run: each
`<!-- snippet: PATH -->` marker is followed by a python block equal to the
file, and every snippet file is shown."""
import re

from kit import ROOT

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


def _tracked_text_files():
    import subprocess

    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in out:
        path = ROOT / rel
        if path.is_symlink() or not path.is_file():
            continue
        if path.suffix in {".rs", ".md", ".sql", ".py", ".sh", ".toml", ".json"}:
            yield rel, path.read_text(errors="replace")


def test_the_method_is_described_in_the_repository():
    """docs/method.md states the method; nothing cites a document the
    repository does not have, and every 'docs/method.md §N' names a section
    that exists."""
    method = (ROOT / "docs" / "method.md").read_text()
    for needle in [
        "completeness", "refinement", "influence", "class share", "Nesterov",
        "weight decay", "residual", "Batch mode", "arXiv:2109.05880",
        "dot = (v·p) · (u·a + 1)",
    ]:
        assert needle.lower() in method.lower(), f"docs/method.md does not cover {needle!r}"
    sections = set(re.findall(r"^## (\d+)\. ", method, re.M))
    outside = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
    for rel, text in _tracked_text_files():
        assert outside not in text, f"{rel} cites {outside}, which the repository does not have"
        for n in re.findall(r"docs/method\.md §(\d+)", text):
            assert n in sections, f"{rel} cites docs/method.md §{n}, which does not exist"


def test_no_skips_turns_a_skip_into_a_failure(pytester, monkeypatch):
    """Under REPTRACE_NO_SKIPS=1 (scripts/test.sh sets it) a skipped test
    fails with its reason, so that CI cannot pass by skipping, e.g., the
    Spark tests on a machine without Java."""
    pytester.makeconftest((ROOT / "tests" / "python" / "conftest.py").read_text())
    # The copied conftest imports the kit beside it.
    pytester.makepyfile(kit=(ROOT / "tests" / "python" / "kit.py").read_text())
    pytester.makepyfile(
        test_inner="""
        import pytest
        def test_needs_java():
            pytest.skip("no java here")
        @pytest.mark.xfail(reason="known")
        def test_expected_failure():
            assert False
        """
    )
    monkeypatch.setenv("REPTRACE_NO_SKIPS", "1")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*REPTRACE_NO_SKIPS=1 allows no skip*no java here*"])
    monkeypatch.setenv("REPTRACE_NO_SKIPS", "0")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(skipped=1, xfailed=1)
