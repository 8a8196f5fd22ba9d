"""The documentation's relative links lead somewhere: README.md and docs/*.md."""

import glob
import os
import re

from conftest import ROOT
import pytest
import subprocess

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")


def markdown_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def prose_lines(path):
    """The lines of a Markdown file outside its fenced code blocks."""
    inside = False
    for line in open(path, encoding="utf-8").read().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield line


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The anchors of a file's headings, repeated ones numbered as GitHub numbers them."""
    found, seen = set(), {}
    for line in prose_lines(path):
        match = re.match(r"#{1,6} (.+)$", line)
        if match:
            name = anchor(match.group(1))
            count = seen.get(name, 0)
            seen[name] = count + 1
            found.add(name if count == 0 else f"{name}-{count}")
    return found


def links(path):
    for line in prose_lines(path):
        yield from LINK.findall(CODE_SPAN.sub("``", line))


def test_anchors_are_githubs():
    assert anchor("ECCV Caption / CxC") == "eccv-caption--cxc"
    assert anchor("A VSRN checkpoint for the detector's features") == "a-vsrn-checkpoint-for-the-detectors-features"
    assert anchor("Extracting region features: `extract_regions.py`") == "extracting-region-features-extract_regionspy"


def test_every_relative_link_leads_to_a_file_and_heading():
    broken, checked = [], 0
    for path in markdown_files():
        name = os.path.relpath(path, ROOT)
        for target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            file_part, _, fragment = target.partition("#")
            linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(linked):
                broken.append(f"{name}: {target} (no such file)")
            elif fragment and (not linked.endswith(".md") or fragment not in anchors(linked)):
                broken.append(f"{name}: {target} (no such heading)")
    assert checked > 50  # the search finds the pages' links
    assert not broken, "\n".join(broken)


def test_readme_commands_never_write_over_files_of_the_repository():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout: its shipped files are unknown")
    shipped = set(listed.stdout.split())
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    text = "".join(open(page, encoding="utf-8").read() for page in pages)
    commands = " ".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)).replace("\\\n", " ")
    outputs = re.findall(r"--(?:out|save_scores|logger_name) (\S+(?: [^-#\s]\S*)*)", commands)
    outputs = [path for paths in outputs for path in paths.split()]
    assert "map.png" in outputs  # the search finds the visualize.py commands of docs/visualize.md
    assert "scores.json" in outputs  # and every path of a flag that takes several
    for path in outputs:
        assert os.path.normpath(path) not in shipped, path
