"""The repository's documentation stands alone: every relative link of its Markdown files and every
``docs/<page>.md#<section>`` cited anywhere (code comments, docstrings, docs) exists, and nothing cites a document
kept outside the repository."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_SUFFIXES = (".md", ".py", ".sh", ".h", ".cuh", ".cu", ".cpp", ".toml", ".txt", ".cfg", ".yml", ".yaml")
SKIPPED_DIRS = {".git", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis"}

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # a Markdown inline link's target
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
# The contract and background notes the project was specified with live outside the repository; the docs/ pages
# replace them.  (Spelled in pieces so that this file does not cite them itself.)
OUTSIDE = re.compile(r"\b" + "SP" + r"EC\b|\b" + "OU" + r"RO\.md\b|\b" + "KERN" + r"ELS\.md\b|\.\./" + "shared/")


def repository_files() -> list[str]:
    """Paths (relative to the root) of the repository's text files, outside virtual environments and builds."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".venv")
                   and not d.endswith(".egg-info")]
        inside_ci = os.path.relpath(folder, ROOT).split(os.sep)[0] == ".ci"
        for name in files:
            if name.endswith(TEXT_SUFFIXES) or inside_ci:
                found.append(os.path.relpath(os.path.join(folder, name), ROOT))
    return sorted(found)


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def outside_code_blocks(text: str) -> str:
    """Markdown ``text`` without its fenced code blocks."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    """The section anchors of Markdown file ``path`` (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen, found = {}, set()
    for line in outside_code_blocks(read(path)).splitlines():
        match = re.match(r"#{1,6} +(.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_docs_pages_exist():
    pages = {name for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")}
    assert {"op.md", "models.md", "serving.md", "training.md", "gpu.md", "results.md"} <= pages, pages


def test_every_relative_link_exists():
    broken = []
    for path in repository_files():
        if not path.endswith(".md"):
            continue
        for target in LINK.findall(outside_code_blocks(read(path))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(os.path.join(ROOT, resolved)):
                broken.append(f"{path}: {target} (no {resolved})")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{path}: {target} (no section #{anchor} in {resolved})")
    assert not broken, "\n".join(broken)


def test_every_cited_docs_section_exists():
    """``docs/<page>.md#<section>``, as code comments cite the docs, resolved from the repository's root."""
    broken = []
    for path in repository_files():
        for page, anchor in CITATION.findall(read(path)):
            target = os.path.join("docs", page)
            if not os.path.isfile(os.path.join(ROOT, target)):
                broken.append(f"{path}: docs/{page} does not exist")
            elif anchor and anchor not in anchors(target):
                broken.append(f"{path}: docs/{page}#{anchor}: no such section")
    assert not broken, "\n".join(broken)


def test_nothing_cites_a_document_outside_the_repository():
    citing = sorted({path for path in repository_files() if OUTSIDE.search(read(path))})
    assert not citing, f"these files cite documents kept outside the repository (cite docs/ instead): {citing}"


@pytest.mark.parametrize("heading, anchor", [("The GPU pass, measured (H100, 2026-12-06)",
                                              "the-gpu-pass-measured-h100-2026-12-06"),
                                             ("Ouro's objective: pre-training", "ouros-objective-pre-training"),
                                             ("`backend=` and `auto`", "backend-and-auto")])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor
