"""Every "METHOD.md §n" cited in the repository names a section that METHOD.md has.

A citation is "METHOD.md §3", a range "METHOD.md §1-2" (or §1–2), or a list continuing with
further §s ("METHOD.md §1-2 and §5-6"). The section it names is the heading "## 3. Title".
Inside METHOD.md itself a bare "§3" is a citation too.
"""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD = 'METHOD.md'
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT)  # its examples are not citations
SECTION = r'§\s*(\d+)(?:\s*[-–]\s*(\d+))?'                   # §3, §1-2, §1–2; groups: first, last
ANY_SECTION = r'§\s*\d+(?:\s*[-–]\s*\d+)?'
CITATION = re.compile(r'METHOD\.md\s+' + ANY_SECTION + r'(?:\s*(?:,|and|or)\s*' + ANY_SECTION + r')*')
BARE = re.compile(SECTION)
HEADING = re.compile(r'^## (\d+)\. \S', re.MULTILINE)


def tracked_files():
    """The repository's tracked *.py and *.md files that exist on disk, relative to ROOT; a walk without git."""
    try:
        listed = subprocess.run(['git', 'ls-files', '*.py', '*.md'], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()
        return sorted(path for path in listed if os.path.isfile(os.path.join(ROOT, path)))
    except (OSError, subprocess.CalledProcessError):
        found = []
        for directory, subdirectories, files in os.walk(ROOT):
            subdirectories[:] = [d for d in subdirectories if d not in ('.git', 'out', '__pycache__')]
            found += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f.endswith(('.py', '.md'))]
        return sorted(found)


def expand(match):
    """The section numbers of one §-match, a range expanded: '§2-4' -> [2, 3, 4]."""
    start, end = match.group(1), match.group(2)
    return list(range(int(start), int(end or start) + 1))


def cited_sections(text, bare=False):
    """[(section number, character offset of its citation)] for every METHOD.md citation in text.

    bare=True also counts a § without "METHOD.md" before it (for METHOD.md's own cross-references).
    """
    if bare:
        return [(n, m.start()) for m in BARE.finditer(text) for n in expand(m)]
    cited = []
    for citation in CITATION.finditer(text):
        for m in BARE.finditer(citation.group(0)):
            cited += [(n, citation.start()) for n in expand(m)]
    return cited


def method_sections():
    with open(os.path.join(ROOT, METHOD), encoding='utf-8') as f:
        return {int(n) for n in HEADING.findall(f.read())}


def test_citation_parser_on_known_forms():
    def numbers(text):
        return [n for n, _ in cited_sections(text)]
    assert numbers("see METHOD.md §3.") == [3]
    assert numbers("METHOD.md §1-2 and §5–6 for the equations") == [1, 2, 5, 6]
    assert numbers("METHOD.md §2, §4 or §7; elsewhere §9") == [2, 4, 7]
    assert numbers("(METHOD.md\n    §6), printed") == [6]
    assert numbers("METHOD.md section 3, or §4 alone") == []
    assert [n for n, _ in cited_sections("§3's criterion and §1-2", bare=True)] == [3, 1, 2]


def test_method_has_sections_one_to_seven():
    sections = method_sections()
    assert set(range(1, 8)) <= sections, f"METHOD.md lacks the sections {sorted(set(range(1, 8)) - sections)}"


def test_every_citation_resolves():
    sections = method_sections()
    n_citations, unresolved = 0, []
    for path in tracked_files():
        if path == THIS_FILE:
            continue
        with open(os.path.join(ROOT, path), encoding='utf-8', errors='replace') as f:
            text = f.read()
        for number, offset in cited_sections(text, bare=(path == METHOD)):
            n_citations += path != METHOD
            if number not in sections:
                line = text.count('\n', 0, offset) + 1
                unresolved.append(f"{path}:{line}: §{number}, but METHOD.md has no heading '## {number}.'")
    assert n_citations > 0, "no METHOD.md § citation found outside METHOD.md: is the scan looking in the right place?"
    assert not unresolved, "citations of missing METHOD.md sections:\n" + "\n".join(unresolved)
