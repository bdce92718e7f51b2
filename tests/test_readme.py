"""Every ```python block of README.md runs as pasted.

Each block is executed on its own, in a fresh namespace (nothing carries over from
an earlier block) and in a temporary working directory (blocks write files:
`served/1`, `model.keras`, `clicks/*.parquet`). A block that cannot run here is
marked in the README by the line just before it:

    <!-- readme-test: skip (the reason) -->

and the skips are few and justified: `test_skips_are_few_and_say_why`.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->$")
# At most this many blocks may be skipped (the multi-worker one needs a cluster).
MAX_SKIPS = 1


def readme_blocks(text=None):
    """`[(line, code, skip_reason or None)]` of each ```python block, `line` 1-based."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise ValueError(f"README.md line {i + 1}: a ```python block without its closing ```")
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = SKIP.match(previous)
            blocks.append((start, "\n".join(lines[start:end]) + "\n", match and match.group("reason").strip()))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 7
    text = "<!-- readme-test: skip (needs a cluster) -->\n\n```python\nx = 1\n```\n```python\ny = 2\n```\n"
    assert readme_blocks(text) == [(3, "x = 1\n", "needs a cluster"), (6, "y = 2\n", None)]


def test_skips_are_few_and_say_why():
    skipped = [(line, reason) for line, _, reason in BLOCKS if reason]
    assert len(skipped) <= MAX_SKIPS, skipped
    for line, reason in skipped:
        assert len(reason.split()) >= 3, f"README.md line {line}: say why the block is skipped"
    # A marker that is not just before a block (a typo, a moved block) would skip nothing.
    markers = [line for line in README.read_text().splitlines() if "readme-test" in line]
    assert len(markers) == len(skipped)


@pytest.mark.parametrize("line, code, skip", BLOCKS, ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(f"README.md line {line}: {skip}")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)  # noqa: S102 - our README
