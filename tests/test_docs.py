"""The README and docs/ stay true and short: every error message they quote exists in the code,
every relative link resolves, and the README stays a user's guide (a loose cap catches a runaway file).

Convention for quoted error messages (README "Errors you may see", and any docs page):

* In a section whose heading contains "error", every backticked span in the *first cell* of a
  table row is a message as the user sees it (or a part of one), and so is every line of a
  fenced block opened with ```error.
* A part of the message that varies is written as a placeholder: ``<name>`` (angle brackets
  around a word), ``{...}``, ``[…]``, ``…`` or ``...``.
* The literal parts between placeholders must each occur in one string literal of
  ``src/ctsynth/**/*.py`` or ``stages/*.py`` (f-string fields count as placeholders there), and
  every message needs at least one literal part of ``MIN_FRAGMENT`` characters, so no quote goes
  unchecked. A message reworded in the code therefore fails here until the docs follow.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO, SHARED

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
CODE = [*sorted((REPO / "src" / "ctsynth").rglob("*.py")), *sorted((REPO / "stages").glob("*.py"))]

MAX_README_LINES = 450          # a guard against a runaway file, not a target
MIN_FRAGMENT = 12          # every quoted message has a literal part at least this long ...
MIN_CHECKED = 5            # ... and every literal part at least this long must be in the code
PLACEHOLDER = re.compile(r"<[A-Za-z…. _/-][^<>]*>|\{[^{}]*\}|\[…\]|\[\.\.\.\]|…|\.\.\.")
FIELD = "\x00"             # stands for an f-string field in the code's strings

# Links allowed to point at a missing file. Remove an entry once its file exists.


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def code_strings() -> str:
    """Every string literal of the package and the stage scripts but docstrings, f-string fields
    as FIELD."""
    found = []
    for path in CODE:
        tree = ast.parse(path.read_text(), filename=str(path))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                found.append("".join(v.value if isinstance(v, ast.Constant) else FIELD for v in node.values))
    return FIELD.join(_squash(s) for s in found)


def _sections(text: str):
    """(heading, line, fence) for every line: the heading above it, and the info string of the
    fenced block it is in ('' for a bare fence, None outside); headings and fence lines are
    not yielded."""
    heading, fence = "", None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
            continue
        yield heading, line, fence


def quoted_errors(text: str) -> list[str]:
    """The messages a page quotes, by the convention of this module's docstring."""
    messages = []
    for heading, line, fence in _sections(text):
        if "error" not in heading.lower():
            continue
        if fence is not None:
            if fence.split()[:1] == ["error"] and line.strip():
                messages.append(line.strip())
        elif line.lstrip().startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())
            if len(cells) > 2:
                messages += re.findall(r"`([^`]+)`", cells[1])
    return messages


def missing_parts(message: str, corpus: str) -> list[str]:
    """What of ``message`` the code does not hold: literal parts absent from its strings, or a
    note when the message has no literal part long enough to check."""
    parts = [_squash(p).strip() for p in PLACEHOLDER.split(message)]
    parts = [p for p in parts if len(p) >= MIN_CHECKED]
    if not any(len(p) >= MIN_FRAGMENT for p in parts):
        return [f"(no literal part of {MIN_FRAGMENT}+ characters: quote more of the message)"]
    return [p for p in parts if p not in corpus]


def test_the_readme_quotes_its_error_messages_by_the_convention():
    assert len(quoted_errors(README.read_text())) >= 10, "README 'Errors you may see' table not found"


def test_every_quoted_error_message_exists_in_the_code():
    corpus = code_strings()
    bad = {}
    for page in PAGES:
        for message in quoted_errors(page.read_text()):
            missing = missing_parts(message, corpus)
            if missing:
                bad[f"{page.relative_to(REPO)}: {message}"] = missing
    assert not bad, "quoted error messages the code does not produce:\n" + "\n".join(
        f"  {where}\n    missing: {parts}" for where, parts in bad.items())


def test_the_check_catches_a_made_up_message():
    corpus = code_strings()
    page = ("## Errors you may see\n\n| message contains | meaning |\n|---|---|\n"
            "| `the frobnicator refused to <verb> the model` | made up |\n"
            "| `affine is singular` | real |\n\n"
            "```error\nctsynth train: no such message exists anywhere\n```\n"
            "## Elsewhere\n\n| `not an error section, so not a quote` | x |\n")
    quotes = quoted_errors(page)
    assert quotes == ["the frobnicator refused to <verb> the model", "affine is singular",
                      "ctsynth train: no such message exists anywhere"]
    assert "the frobnicator refused to" in missing_parts(quotes[0], corpus)
    assert missing_parts(quotes[1], corpus) == []
    assert missing_parts(quotes[2], corpus)
    assert missing_parts("<key>: got <value>", corpus), "a quote too short to check must fail"


def test_readme_is_a_short_users_guide():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): "
                                       "move measurements and long explanations into docs/")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    fence = False
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(text: str) -> list[str]:
    """Targets of the markdown links of ``text``, outside code blocks and code spans."""
    prose = "\n".join(line for _, line, fence in _sections(text) if fence is None)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)", prose)


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not SHARED.exists() and dest.is_relative_to(SHARED.resolve()):
                continue                                         # ../shared is beside a checkout, not in it
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def module_map(text: str) -> dict[str, str]:
    """README's module map: ``{subpackage: the text of its bullet}``."""
    bullets = re.findall(r"^- `(\w+)/` — (.*?)(?=^- `|^$)", text, flags=re.M | re.S)
    return {pkg: body for pkg, body in bullets}


def test_the_module_map_and_the_folders_agree():
    """Every subpackage of src/ctsynth has a bullet in the README's module map naming each of its
    modules, and the map names no folder or module that does not exist."""
    pkg_root = REPO / "src" / "ctsynth"
    folders = {p.name for p in pkg_root.iterdir() if (p / "__init__.py").is_file()}
    mapped = module_map(README.read_text())
    assert set(mapped) == folders, (sorted(set(mapped) ^ folders))
    for pkg, body in mapped.items():
        modules = {p.stem for p in (pkg_root / pkg).glob("*.py") if p.stem != "__init__"}
        named = set(re.findall(r"`(\w+)`", body))
        assert modules <= named, (pkg, sorted(modules - named))
        assert not {n for n in named if n.islower() and n not in modules} - {"ctsynth"}, (pkg, sorted(named - modules))


def _committed(path: str) -> bytes:
    """The HEAD version of ``path``: a local `dvc repro` rewrites the working copies of results."""
    import subprocess

    done = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, timeout=60)
    assert done.returncode == 0, f"{path} is not committed: {done.stderr.decode().strip()}"
    return done.stdout


REFERENCE_FILES = ("metrics.json", "metrics_ci.json", "metrics_notes.json", "validation.json", "headline.json")


def test_the_results_page_is_written_from_the_committed_reference_run(tmp_path):
    """Every number docs/results.md quotes comes from result files of this commit, and those files
    are the outputs dvc.lock names (same md5): traceable to what made them."""
    import hashlib

    import yaml

    from ctsynth.tools import reference

    for name in REFERENCE_FILES:
        (tmp_path / name).write_bytes(_committed(f"reports/{name}"))
    assert reference.markdown(tmp_path) == _committed("docs/results.md").decode(), \
        "docs/results.md is stale: python -m ctsynth.tools.reference > docs/results.md"
    outs = {o["path"]: o["md5"] for o in yaml.safe_load(_committed("dvc.lock"))["stages"]["evaluate"]["outs"]}
    for name in REFERENCE_FILES:
        assert hashlib.md5(_committed(f"reports/{name}")).hexdigest() == outs[f"reports/{name}"], name
    assert "docs/results.md" in (REPO / "README.md").read_text()


def test_a_changed_number_makes_the_results_page_stale(tmp_path):
    from ctsynth.tools import reference

    for name in REFERENCE_FILES:
        (tmp_path / name).write_bytes(_committed(f"reports/{name}"))
    metrics = (tmp_path / "metrics.json").read_text()
    (tmp_path / "metrics.json").write_text(metrics.replace('"ssim": 0.', '"ssim": 0.0', 1))
    assert reference.markdown(tmp_path) != _committed("docs/results.md").decode()


def test_the_readme_stage_table_names_each_stages_code():
    """The README's stage table has a row per dvc.yaml stage, and its code column names the module
    holding that stage's `run()`, which the stage script imports."""
    import yaml

    from ctsynth.core.imports import imports_of

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rows = re.findall(r"^\| (\w+) \|.*\| `([\w/]+\.py)` \|$", README.read_text(), flags=re.M)
    assert sorted(name for name, _ in rows) == sorted(stages)
    for name, module in rows:
        assert (REPO / "src" / "ctsynth" / module).is_file(), module
        assert module in imports_of(REPO / "stages" / f"{name}.py"), (name, module)
        assert Path(module).stem == name, (name, module)              # named after the stage


MODULE_NAME = re.compile(r"(?<![\w./-])ctsynth(?:\.[A-Za-z_]\w*)+")


def _resolves(name: str) -> bool:
    """``ctsynth.<module>[.<attribute>...]`` names an importable module and attributes of it."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _mlflow_tags() -> set[str]:
    """The ``ctsynth.*`` MLflow tag names (quoted string literals in the sources), which are no modules."""
    text = "".join(p.read_text() for p in (REPO / "src").rglob("*.py"))
    named = {m for m in re.findall(r"[\"'](ctsynth\.\w+)[\"']", text) if not _resolves(m)}
    train = (REPO / "src" / "ctsynth" / "train" / "train.py").read_text()            # set_tags({f"ctsynth.{k}": ...})
    built = re.search(r'set_tags\(\{f"ctsynth\.\{k\}": v for k, v in dict\((.*?)\)\.items', train, flags=re.S)
    return named | {f"ctsynth.{k}" for k in re.findall(r"(\w+)=", built.group(1))}


def test_every_ctsynth_module_named_in_docs_and_docstrings_exists():
    """README, docs/ and the sources (docstrings, comments) name only modules and attributes that
    exist: a move or rename that leaves `ctsynth.metrics` behind fails here."""
    tags = _mlflow_tags()
    assert "ctsynth.data_hash" in tags
    files = [README, *sorted((REPO / "docs").rglob("*.md")), *sorted((REPO / "src").rglob("*.py")),
             *sorted((REPO / "stages").glob("*.py"))]
    stale = sorted({f"{path.relative_to(REPO)}: {name}" for path in files
                    for name in MODULE_NAME.findall(path.read_text()) if name not in tags and not _resolves(name)})
    assert not stale, stale
    assert not _resolves("ctsynth.metrics") and _resolves("ctsynth.evaluate.metrics.DiceAccumulator")


def test_the_docs_index_links_every_page():
    """docs/README.md indexes every page of docs/ (the seed-grid tables as their folder), under one
    of its four kinds: how-to, reference, explanation, experiment logs."""
    index = (REPO / "docs" / "README.md").read_text()
    for kind in ("## How-to", "## Reference", "## Explanation", "## Experiment logs"):
        assert kind in index, kind
    linked = {(REPO / "docs" / target).resolve() for target in re.findall(r"\]\(([^)#]+)", index)}
    pages = [p for p in (REPO / "docs").rglob("*.md") if p.name != "README.md"]
    missing = [p.relative_to(REPO).as_posix() for p in pages
               if p.resolve() not in linked and not any(folder in p.resolve().parents for folder in linked)]
    assert not missing, f"docs/README.md does not index {missing}"


def test_readme_results_table_is_the_committed_run_for_both_conditions():
    """The README's first results table (both conditions, test patients) is written from the
    committed result files: a number that disagrees with reports/metrics.json fails here."""
    from ctsynth.evaluate.results import Results
    from ctsynth.tools.reference import conditions_table
    res = Results.read(REPO / "reports")
    table = conditions_table(res)
    readme = (REPO / "README.md").read_text()
    assert table in readme, "README results table is stale: paste python -m ctsynth.tools.reference --readme"
    assert readme.index(table) < readme.index("## The pipeline")           # the first table a reader meets
    assert "heart masks alone" in table and res.value("heart_only_ssim") is not None


def _minus(text: str) -> str:
    return text.replace("-", "−")


def _held_out(d: dict, which: str) -> str:
    n = d[f"privacy_heldout_{which}_n_patients"]
    rate = d[f"privacy_heldout_{which}_case_withhold"]
    return (f"{round(rate * n)} of {n} ({rate:.0%}); slices above: "
            f"{100 * d[f'privacy_heldout_{which}_slice_withhold']:.1f} %").replace("%)", " %)")


# Numbers docs/ quotes from a committed result file: (doc, file under reports/, how the doc writes it).
# docs/results.md and the README's table are written from the files (tests above); these are prose.
QUOTES = [
    ("docs/sharing.md", "privacy_synthetic.json",
     lambda d: f"{d['privacy_synthetic_n_pass']} of {d['privacy_synthetic_n_cases']} synthetic cases pass"),
    ("docs/sharing.md", "privacy_synthetic.json", lambda d: _held_out(d, "val_loo")),
    ("docs/sharing.md", "privacy_synthetic.json", lambda d: _held_out(d, "test")),
    ("docs/sharing.md", "privacy_synthetic.json",
     lambda d: (f"{round(d['privacy_control_warped_withheld'] * d['privacy_synthetic_n_cases'])} of "
                f"{d['privacy_synthetic_n_cases']} ({100 * d['privacy_control_warped_withheld']:.1f} %)")),
    ("docs/sharing.md", "privacy_synthetic.json",
     lambda d: f"on the default run {d['privacy_synthetic_case_share_allowed']:.0%}".replace("%", " %")),
    ("docs/experiments/utility.md", "metrics_ci.json",
     lambda d: _minus(f"[{d['utility_gain_mixed_ci95']['lo']:.4f}, {d['utility_gain_mixed_ci95']['hi']:.4f}] in")),
    ("docs/experiments/utility.md", "metrics.json", lambda d: _minus(f"{d['utility_gain_mixed']:.4f} [")),
]


def test_docs_quote_the_committed_result_files():
    """A number docs/ quotes from a committed file (QUOTES) is written as the file has it now: rerun
    the pipeline, and a doc that still says the old figure fails here."""
    import json
    stale = []
    for doc, name, written in QUOTES:
        text = written(json.loads((REPO / "reports" / name).read_text()))
        if text not in (REPO / doc).read_text():
            stale.append(f"{doc}: expected {text!r} (from reports/{name})")
    assert not stale, stale
