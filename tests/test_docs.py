"""The README's and docs' code blocks run, in order, against a real server.

tests/docs_runner.py says how each block is run and compared. When an output
changes on purpose, regenerate the docs from a real run rather than by hand:
`CRUZFLOW_DOCS_UPDATE=1 .venv/bin/python -m pytest -q tests/test_docs.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.docs_runner import (
    ROOT,
    UPDATE_VARIABLE,
    Block,
    DocError,
    check_excerpt,
    doc_files,
    matches,
    normalise,
    parse_blocks,
    parse_console,
    run_doc,
)

DOCS = doc_files()


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(ROOT)) for doc in DOCS])
def test_the_doc_runs_as_written(doc: Path) -> None:
    log = run_doc(doc, update=os.environ.get(UPDATE_VARIABLE) == "1")
    for entry in log:
        print(entry)


# ------------------------------------------------ the runner, on small docs


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_a_shell_session_carries_cwd_variables_and_status(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        """\
```console
$ mkdir -p made/here && cd made/here
$ export GREETING=hello
$ note='kept by the shell'
$ pwd | sed 's|.*/made|made|'
made/here
$ echo "$GREETING, $note" \\
    "and a continued line"
hello, kept by the shell and a continued line
$ ls /no/such/folder
ls: cannot access '/no/such/folder': No such file or directory
$ echo $?
2
```

```sh
test "$GREETING" = hello
```

```python
import os

print(os.environ["GREETING"], os.getcwd().endswith("made/here"))
```

```text
hello True
```
""",
    )
    assert run_doc(doc) == []


def test_a_newcomers_shell_has_no_venv_and_the_scratch_copy_has_the_repo(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        """\
```console
$ command -v cruzflow || echo "not on PATH"
not on PATH
$ source .venv/bin/activate && command -v cruzflow | sed 's|.*/\\.venv/|.venv/|'
.venv/bin/cruzflow
$ test -f examples/cruzflow.toml && test ! -e examples/data && echo fresh
fresh
$ grep '^listen' examples/cruzflow.toml
listen = "127.0.0.1:50051"
listen = "127.0.0.1:8080"
```
""",
    )
    assert run_doc(doc) == []


def test_a_wrong_output_names_the_file_the_line_the_command_and_both_outputs(
    tmp_path: Path,
) -> None:
    doc = _doc(tmp_path, "Text.\n\n```console\n$ echo one\none\n$ echo two\nthree\n```\n")
    with pytest.raises(DocError) as error:
        run_doc(doc)
    message = str(error.value)
    assert message.startswith(f"{doc}:6: `echo two` printed something else than the doc shows.")
    assert "--- expected (lines 7-7 of" in message
    assert "three\n--- actual:\ntwo\n" in message
    assert UPDATE_VARIABLE in message


def test_a_failing_command_must_show_its_status(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "```console\n$ false\n```\n")
    with pytest.raises(DocError, match=r"doc.md:2: `false` exited 1 .*`\$ echo \$\?`"):
        run_doc(doc)


def test_update_mode_writes_the_real_output_and_keeps_what_matches(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        """\
```console
$ printf 'a\\nb\\nc\\n'
a
...
$ echo 2026-11-24T16:28:13.523Z took 8 ms
2030-01-01T00:00:00Z took 1 m 02 s
$ echo new

$ echo after
old
```
""",
    )
    log = run_doc(doc, update=True)
    assert log == [
        f"{doc}:7: updated the output of `echo new`",
        f"{doc}:9: updated the output of `echo after`",
    ]
    assert doc.read_text() == (
        """\
```console
$ printf 'a\\nb\\nc\\n'
a
...
$ echo 2026-11-24T16:28:13.523Z took 8 ms
2030-01-01T00:00:00Z took 1 m 02 s
$ echo new
new

$ echo after
after
```
"""
    )
    assert run_doc(doc) == []


def test_every_block_runs_or_says_why_not(tmp_path: Path) -> None:
    with pytest.raises(DocError, match=r"doc.md:1: a toml block the runner cannot run"):
        run_doc(_doc(tmp_path, "```toml\na = 1\n```\n"))
    with pytest.raises(DocError, match=r"doc.md:1: a skip says why"):
        parse_blocks(_doc(tmp_path, "<!-- doc-test: skip -->\n```toml\na = 1\n```\n"))
    with pytest.raises(DocError, match=r"doc.md:1: the doc-test directive is not followed"):
        parse_blocks(_doc(tmp_path, "<!-- doc-test: skip (why) -->\ntext\n```sh\ntrue\n```\n"))
    skipped = "<!-- doc-test: skip (a reference) -->\n\n```toml\na = 1\n```\n"
    assert run_doc(_doc(tmp_path, skipped)) == []


def test_an_excerpt_must_match_the_file_it_quotes(tmp_path: Path) -> None:
    good = (
        "<!-- doc-test: excerpt examples/approval/workflow.py -->\n"
        "```python\n"
        "# examples/approval/workflow.py (abridged)\n"
        "class ApprovalWorkflow(WorkflowEntrypoint[ApprovalParams]):\n"
        "    ...\n"
        '        await step.sleep("cool-off", cool_off)\n'
        "```\n"
    )
    check_excerpt(parse_blocks(_doc(tmp_path, good))[0])
    # The same lines out of order.
    bad = good.replace(
        "class ApprovalWorkflow(WorkflowEntrypoint[ApprovalParams]):\n    ...\n", ""
    ).replace("```\n", "class ApprovalWorkflow(WorkflowEntrypoint[ApprovalParams]):\n```\n", 1)
    bad = bad.replace("```python\nclass", "```python\n")
    with pytest.raises(DocError, match=r"doc.md:5: this line of the excerpt is not in"):
        check_excerpt(parse_blocks(_doc(tmp_path, bad))[0])


def test_commands_end_where_bash_would_run_them() -> None:
    block = Block(
        doc=ROOT / "doc.md",
        fence_line=1,
        lang="console",
        first=1,
        lines=[
            "$ grpcurl -d '{",
            '    "a": 1',
            "  }' host list",
            "{}",
            "$ token=$(echo a |",
            "    tr a b)",
            "$ echo one \\",
            "    two   # a comment's apostrophe",
            "one two",
        ],
    )
    commands = parse_console(block)
    assert [(c.line, c.text.count("\n"), c.expected) for c in commands] == [
        (2, 2, ["{}"]),
        (6, 1, []),
        (8, 1, ["one two"]),
    ]


@pytest.mark.parametrize(
    ("expected", "actual", "same"),
    [
        (["created 2026-11-24 18:57:00"], ["created 2026-12-06 01:42:09"], True),
        (["#1   18:57:00.461  status running"], ["#10  01:42:12.047  status running"], False),
        (["#1   18:57:00.461  status running"], ["#1  01:42:12.047  status running"], True),
        (
            ["  … cool-off  sleeping  118 ms  wakes in 4.9 s"],
            ["  … cool-off  sleeping  1 m 02 s  wakes in 3 s"],
            True,
        ),
        (['"retry_delay": "10s"'], ['"retry_delay": "0.5s"'], True),
        (
            ["id 7d464dda-0d19-5810-a518-c6d998b08199"],
            ["id 08c8326e-f124-5826-a843-58f9f737c69f"],
            True,
        ),
        (["f9a1ce4a8d094b82bba0e32fc1dfc8ed"], ["18a4f6e1b1d24942afbcf62394fff6c4"], True),
        (["a", "...", "z"], ["a", "b", "c", "z"], True),
        (["a", "... (b and c)", "z"], ["a", "z"], True),
        (["a", "...", "z"], ["a", "b"], False),
        (["last error: ...); is it running?"], ["last error: UNKNOWN: x); is it running?"], True),
        (["  indented"], ["indented"], False),
        (["5 seconds"], ["6 seconds"], False),
    ],
)
def test_normalising_and_matching(expected: list[str], actual: list[str], same: bool) -> None:
    assert matches(normalise(expected), normalise(actual)) is same


def test_make_run_is_refused_when_make_would_reinstall(tmp_path: Path) -> None:
    """The scratch copy shares the checkout's .venv, so a stale one is
    reported rather than reinstalled from the copy (a stand-in make here)."""
    doc = _doc(
        tmp_path,
        """\
```console
$ mkdir fake && printf '#!/bin/sh\\necho pip install -e .\\n' > fake/make && chmod +x fake/make
$ export PATH="$PWD/fake:$PATH"
$ make run
cruzflow listening on 127.0.0.1:50051
```
""",
    )
    with pytest.raises(DocError, match=r"doc.md:4: `make run` would do more than serve"):
        run_doc(doc)
