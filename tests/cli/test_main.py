"""The entry point imports only the command it runs, and its tables agree with the modules."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys

import pytest

from cli.main import COMMANDS, WORKERS, build_parser, one_line_error
from mesh.cli_error import CliError
from tests.support.processes import ENV, REPO


def _choices(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """name → help line of a parser's sub-commands."""
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in sub._choices_actions}


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: argparse.ArgumentParser = sub.choices[name]
    return found


def test_the_tables_name_every_command_with_its_modules_help_line() -> None:
    complete = build_parser()  # every module imported, as the help lines are written there
    top = _choices(complete)
    assert top.pop("worker") == "run one worker process"
    assert top == {name: help_line for name, (_, help_line) in COMMANDS.items()}
    workers = _choices(_subparser(complete, "worker"))
    assert workers == {name: help_line for name, (_, help_line) in WORKERS.items()}


def test_help_lists_every_command_without_importing_them() -> None:
    assert _choices(build_parser(["--help"])) == _choices(build_parser())


def test_a_command_parses_the_same_from_its_own_parser() -> None:
    argv = ["status", "--es", "http://127.0.0.1:1", "--timeout", "2"]
    assert build_parser(argv).parse_args(argv) == build_parser().parse_args(argv)
    argv = ["worker", "data", "--root", "/tmp/x", "--port", "0"]
    assert build_parser(argv).parse_args(argv) == build_parser().parse_args(argv)


def test_an_unknown_command_is_still_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["nosuch"]).parse_args(["nosuch"])
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


PROBE = """
import json, sys
from cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({name: name in sys.modules for name in ("torch", "elasticsearch")}),
      file=sys.stderr)
"""


IMPORTS = [
    (["--help"], False, False),
    (["status", "--help"], False, True),
    (["models", "list", "--help"], False, True),
    (["infer", "--help"], False, False),
    (["datasets", "list", "--help"], False, False),
    (["route", "explain", "--help"], False, False),
    (["worker", "--help"], False, False),
    (["worker", "inference", "--help"], True, False),
]


@pytest.mark.parametrize(
    ("argv", "torch", "store"), IMPORTS, ids=[" ".join(argv) for argv, _, _ in IMPORTS]
)
def test_commands_import_torch_and_the_store_client_only_when_they_need_them(
    argv: list[str], torch: bool, store: bool
) -> None:
    # A process of its own: this one has imported everything already.
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    imported = json.loads(result.stderr.strip().splitlines()[-1])
    assert imported == {"torch": torch, "elasticsearch": store}


def test_the_entry_point_answers_help_without_torch_the_store_client_or_grpc() -> None:
    """`python -m cli.main --help` in a fresh process: it works, and it costs no heavy import
    (torch and the store client take seconds, grpc a tenth: --help should be instant)."""
    probe = (
        "import json, runpy, sys\n"
        "try:\n"
        "    runpy.run_module('cli.main', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "heavy = ('torch', 'elasticsearch', 'grpc', 'numpy')\n"
        "print(json.dumps({'code': code, 'imported': [m for m in heavy if m in sys.modules]}),"
        " file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "--help"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"code": 0, "imported": []}
    assert result.stdout.startswith("usage: meshserve")
    for name in (*COMMANDS, "worker"):
        assert name in result.stdout


def test_errors_read_as_one_line_named_like_a_grpc_status() -> None:
    from mesh.errors import NotFound

    assert one_line_error(NotFound("model 'x' has no version 7")) == (
        "NOT_FOUND: model 'x' has no version 7"
    )
    assert one_line_error(CliError("no input")) == "no input"
    assert one_line_error(KeyError("bug")) is None  # a bug keeps its traceback


#: The pages a new user copies commands from.
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))]
#: A word that starts a meshserve command line in a shell block (after VAR=value words).
ENTRY = re.compile(r"^(?:sudo )?(?:\.venv/bin/)?meshserve$")


def _shell_commands(page: str) -> list[str]:
    """The page's ```sh lines, continuations joined; fails on a continuation that lost
    the backslash before it (pasted, it would run as a command of its own)."""
    text = (REPO / page).read_text()
    commands: list[str] = []
    for block in re.findall(r"^\s*```sh\n(.*?)^\s*```", text, flags=re.M | re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            assert not line.strip().startswith("-"), f"{page}: no backslash before: {line}"
            commands.append(line.strip())
    return commands


def _meshserve_argv(line: str) -> list[str] | None:
    """The arguments of a meshserve command line, or None for any other line. A synopsis's
    optional parts (``[--days 3650]``, ``[FILE...]``) are taken as given."""
    line = re.sub(r"\[((?:-|[A-Z])[^\[\]]*?)(?:\.\.\.)?\](?:\.\.\.)?", r"\1", line)
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)
    if not words or not ENTRY.match(" ".join(words[:2]) if words[0] == "sudo" else words[0]):
        return None
    words = words[2:] if words[0] == "sudo" else words[1:]
    # A flag whose value is checked as it is parsed needs one in the right form where the
    # docs show a placeholder (a synopsis's URL, a shell variable).
    words = [
        EXAMPLE_VALUES.get(before, {}).get(word, word)
        for before, word in zip(["", *words], words, strict=False)
    ]
    return words[:-1] if words[-1:] == ["&"] else words


EXAMPLE_VALUES = {
    "--es": {"URL": "http://es.example.com:9200", "$MESHSERVE_ES_URL": "https://es.example.com"}
}


@pytest.mark.parametrize("page", DOCS)
def test_every_meshserve_command_in_the_docs_parses(
    page: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A flag or command the docs still show after it was renamed or removed fails here."""
    for line in _shell_commands(page):
        argv = _meshserve_argv(line)
        if argv is None:
            continue
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit as exit:
            assert not exit.code, f"{page}: {line}\n{capsys.readouterr().err}"


def test_an_error_quoting_a_huge_value_is_cut_to_a_readable_line() -> None:
    """``meshserve apply`` of a file holding one 4 MB string printed all of it."""
    line = one_line_error(CliError("spec: must be a mapping, got a string ('" + "x" * 10**6 + "')"))
    assert line is not None and len(line) < 2100
    assert line.startswith("spec: must be a mapping") and line.endswith("characters cut)")


def test_an_error_of_several_lines_prints_as_one() -> None:
    """`meshserve call -d '{"nope": 5}'` printed protobuf's two-line message."""
    text = 'Message type "x.Y" has no field named "nope".\n Available Fields: "[\'name\']"'
    assert one_line_error(ValueError(text)) == (
        'Message type "x.Y" has no field named "nope". Available Fields: "[\'name\']"'
    )
