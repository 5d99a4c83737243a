"""The docs hold together: README.md stays short, every relative link in README.md and docs/
resolves, and docs/cli.md names every command and every option that click declares."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from fcnify.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_MD = ROOT / "docs" / "cli.md"
README_LIMIT = 12_000  # characters: the limit issue 25 sets for a newcomer's first read

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6} +(.*)$", re.M)


def doc_files() -> list[Path]:
    """README.md and every page under docs/: the set whose links must resolve."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def link_targets(text: str) -> list[str]:
    """Targets of the Markdown links and images in `text`, code blocks and code spans left out
    (a `[x](y)` inside code is an example, not a link)."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def broken_links(page: Path) -> list[str]:
    """Relative link targets of `page` (anchors dropped) that name no existing file or folder."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    return broken


def commands(group: click.Group = cli, prefix: str = "fcnify") -> list[tuple[str, click.Command]]:
    """(`fcnify NAME ...`, command) for the root group and every command under it, walked
    through click's own tree so a new command or subgroup is included without listing it."""
    found: list[tuple[str, click.Command]] = [(prefix, group)]
    for name, command in sorted(group.commands.items()):
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found += commands(command, full)
        else:
            found.append((full, command))
    return found


def option_names(command: click.Command) -> list[str]:
    """Every spelling of every option of `command`: `--transpose` and `--no-transpose`, `-h`,
    `--help` (click adds the help option through the context, whose names the root group's
    context settings give, so the context is built as `fcnify COMMAND` builds it)."""
    root = click.Context(cli, info_name="fcnify", **cli.context_settings)
    ctx = root if command is cli else click.Context(command, info_name=command.name, parent=root)
    names: list[str] = []
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            names += [*param.opts, *param.secondary_opts]
    return names


def sections(text: str, full_name: str, group: bool = False) -> str:
    """The text under every heading of `text` that starts with `` `FULL_NAME`` followed by
    a space or the closing backquote (the command's prose section and its option reference);
    for a group, only the closing backquote, so its subcommands' sections do not count."""
    parts = HEADING.split(text)
    # parts: [before, heading1, body1, heading2, body2, ...]
    start = re.compile(r"^`" + re.escape(full_name) + (r"`" if group else r"[` ]"))
    return "\n".join(parts[i + 1] for i in range(1, len(parts), 2) if start.match(parts[i]))


def missing_options(text: str) -> list[str]:
    """`fcnify NAME --opt` for each command with no section in `text`, or whose sections
    do not name one of its options as a whole word."""
    missing = []
    for full_name, command in commands():
        body = sections(text, full_name, isinstance(command, click.Group))
        if not body:
            missing.append(full_name)
            continue
        for opt in option_names(command):
            if not re.search(r"(?<![\w-])" + re.escape(opt) + r"(?![\w-])", body):
                missing.append(f"{full_name} {opt}")
    return missing


def test_readme_is_short() -> None:
    """README.md is under 12,000 characters: the manual lives in docs/."""
    size = len(README.read_text(encoding="utf-8"))
    assert size < README_LIMIT, f"README.md is {size} characters (limit {README_LIMIT})"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link in README.md and docs/*.md names a file that exists."""
    assert page.is_file()
    assert broken_links(page) == []


def test_readme_links_every_docs_page() -> None:
    """Each docs/ page is one link away from README.md."""
    linked = {(README.parent / t.split("#", 1)[0]).resolve()
              for t in link_targets(README.read_text(encoding="utf-8"))}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "no docs/*.md found"
    assert [p.name for p in pages if p.resolve() not in linked] == []


def test_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    """The checker reports a missing target and accepts an existing one, a URL, an anchor and
    a link shown inside code."""
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md#part) [b](gone.md) ![c](img/none.png) [d](https://x.org/y)\n"
                    "[e](#top) `[f](code.md)`\n```\n[g](fenced.md)\n```\n")
    assert broken_links(page) == ["gone.md", "img/none.png"]


def test_every_command_and_option_is_in_cli_md() -> None:
    """docs/cli.md has a section for every fcnify command, naming each of its options."""
    found = commands()
    assert len(found) > 1, "click's tree walk found no commands"
    assert missing_options(CLI_MD.read_text(encoding="utf-8")) == []


def test_option_check_finds_what_is_missing() -> None:
    """Against a cli.md with one option and one command removed, the check names exactly those."""
    text = CLI_MD.read_text(encoding="utf-8")
    assert "--nms-iou" in text and "`fcnify doctor" in text
    cut = text.replace("--nms-iou", "--nms").replace("`fcnify doctor", "`fcnify doc-tor")
    missing = missing_options(cut)
    assert "fcnify classify-map --nms-iou" in missing
    assert "fcnify doctor" in missing
    assert len(missing) == 2, missing
