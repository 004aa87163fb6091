"""The README and the docs/ pages: a short README, and every relative link or image
pointing at a file that exists (and, for a #fragment, at a heading of that page)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link


def _anchors(page: Path) -> set[str]:
    """The #fragments a page's headings answer to (GitHub's rule: lower case, punctuation
    dropped, spaces to dashes, repeats numbered)."""
    seen: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_the_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in readme, page.name


def test_every_relative_link_resolves():
    broken, checked = [], 0
    for page in PAGES:
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_code(page.read_text())):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            checked += 1
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            ok = dest.exists() and (not fragment or dest.suffix != ".md" or fragment in set(_anchors(dest)))
            if not ok:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert checked > 50 and not broken, broken
