"""Run the code blocks of a markdown file in order, as a newcomer would.

A newcomer follows README.md (or a page of docs/) from a fresh clone, in one
terminal: this runner does the same, so the docs cannot go stale. For each
file it makes a scratch copy of the repository's tracked files, as a clone
has them (so `make run`'s `examples/data` and what `cruzflow new` writes
never land in the checkout), links the checkout's `.venv` into it, and runs
the fenced blocks top to bottom in one shell session: the working
directory, the variables (exported or not), the functions and `$?` carry
over from one command to the next, so `cd`, `export`, `token=$(...)` and
`source .venv/bin/activate` behave as in a terminal.

What each block means:

- ``console``: ``$ command`` lines (with ``\\`` continuations, or quotes
  left open across lines) are run; the lines after a command, up to the next
  ``$``, are its expected output (stdout and stderr together). A command
  must exit 0 unless the next command is ``$ echo $?``, which shows its exit
  status. ``make run`` and ``cruzflow serve`` are started in the background
  where they appear, as in a second terminal, and their output is compared
  up to the ``cruzflow listening on`` line; the server is stopped when the
  file ends.
- ``sh``: the whole block is run as one script and must exit 0.
- ``python``: the block is run as a script with the venv's python and must
  exit 0; a ``text`` block right after it is its expected output.
- Any block may be marked with an HTML comment on the line before it
  (blank lines between are allowed):
  ``<!-- doc-test: skip (why) -->`` does not run it (the reason is
  required); ``<!-- doc-test: excerpt PATH -->`` checks that every line of
  the block, except ``...`` lines and a first comment line naming the file,
  appears in PATH in the same order; ``<!-- doc-test: pytest DIR -->`` runs
  the block as a pytest module placed in DIR. Any other block that is not
  marked fails the run: a block is either checked or says why not.

Expected and actual output are compared after normalising what changes from
run to run: timestamps and clock times, durations (``8 ms``, ``1 m 02 s``,
``"10s"``), uuids, generated 32-hex ids, page tokens, runs of spaces inside a line
(column widths follow the values), and the port. The runner serves on a free
port and writes it for every ``50051`` in commands, scripts and the example
config (``CRUZFLOW_ADDRESS`` points the CLI at it), and reads it back as
``50051`` in output. An expected line that is ``...`` (or ``... (a note)``)
matches any number of lines; ``...`` inside a line matches any text.

Update mode (``CRUZFLOW_DOCS_UPDATE=1``, or ``python -m tests.docs_runner
--update FILE...``) writes the real output of every command whose expected
output does not match into the markdown file instead of failing.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_PORT = 50051
DOC_HTTP_PORT = 8080
"""The example config's HTTP port, written and read back like DOC_PORT."""
COMMAND_TIMEOUT = 120.0
SERVER_START_TIMEOUT = 60.0
UPDATE_VARIABLE = "CRUZFLOW_DOCS_UPDATE"


class DocError(AssertionError):
    """A block of a doc does not do what the doc says; the message says where."""


# ------------------------------------------------------------------ parsing

DIRECTIVE = re.compile(r"^<!--\s*doc-test:\s*(?P<kind>[a-z-]+)\s*(?P<arg>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
DIRECTIVES = ("skip", "excerpt", "pytest")
OUTPUT_LANGS = ("text",)


@dataclass
class Block:
    """A fenced code block: ``lines`` are between the fences, ``first`` is the
    0-based index in the file of its first content line."""

    doc: Path
    fence_line: int  # 1-based, for messages
    lang: str
    lines: list[str]
    first: int
    directive: str = ""
    argument: str = ""
    output: Block | None = None

    @property
    def where(self) -> str:
        return f"{_rel(self.doc)}:{self.fence_line}"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def parse_blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file with their directives; a python
    block's output block is attached to it rather than listed."""
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    pending: tuple[int, str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        if directive:
            kind, arg = directive["kind"], directive["arg"]
            if kind not in DIRECTIVES:
                raise DocError(
                    f"{_rel(doc)}:{i + 1}: unknown doc-test directive {kind!r} "
                    f"(known: {', '.join(DIRECTIVES)})"
                )
            if kind == "skip" and not re.fullmatch(r"\(.+\)", arg):
                raise DocError(
                    f"{_rel(doc)}:{i + 1}: a skip says why, in parentheses: "
                    "<!-- doc-test: skip (a config reference) -->"
                )
            if kind in ("excerpt", "pytest") and not arg:
                raise DocError(f"{_rel(doc)}:{i + 1}: doc-test {kind} needs a path")
            pending = (i + 1, kind, arg)
            i += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if pending is not None and line.strip():
                raise DocError(
                    f"{_rel(doc)}:{pending[0]}: the doc-test directive is not followed by a "
                    "code block"
                )
            i += 1
            continue
        marker = fence["fence"]
        info = fence["info"].strip()
        end = i + 1
        while end < len(lines) and not (
            lines[end].startswith(marker)
            and lines[end].strip() == marker[0] * len(lines[end].strip())
        ):
            end += 1
        if end == len(lines):
            raise DocError(f"{_rel(doc)}:{i + 1}: the code block is never closed")
        block = Block(
            doc=doc,
            fence_line=i + 1,
            lang=info.split()[0] if info else "",
            lines=lines[i + 1 : end],
            first=i + 1,
        )
        if pending is not None:
            block.directive, block.argument = pending[1], pending[2]
            pending = None
        previous = blocks[-1] if blocks else None
        between = lines[previous.first + len(previous.lines) + 1 : i] if previous else []
        if (
            previous is not None
            and previous.lang == "python"
            and not previous.directive
            and previous.output is None
            and block.lang in OUTPUT_LANGS
            and not block.directive
            and all(not gap.strip() for gap in between)
        ):
            previous.output = block
        else:
            blocks.append(block)
        i = end + 1
    if pending is not None:
        raise DocError(
            f"{_rel(doc)}:{pending[0]}: the doc-test directive is not followed by a code block"
        )
    return blocks


@dataclass
class Command:
    """A ``$`` command of a console block and the output lines shown after it."""

    line: int  # 1-based line in the doc
    text: str
    expected: list[str]
    out_first: int  # 0-based index in the doc of the first expected line
    out_end: int  # one past the last line the expected output may occupy

    @property
    def display(self) -> str:
        return self.text.split("\n")[0]


def _complete(text: str) -> bool:
    """Whether bash would run the text or wait for more, as a terminal's
    prompt does (a quote, a `$(` or a pipe left open, a trailing `\\`)."""
    if text.endswith("\\"):
        return False
    check = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    return "unexpected EOF" not in check.stderr and "unexpected end of file" not in check.stderr


def parse_console(block: Block) -> list[Command]:
    commands: list[Command] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if lines[i].strip():
                raise DocError(
                    f"{_rel(block.doc)}:{block.first + i + 1}: output before any `$ command` "
                    "in a console block"
                )
            i += 1
            continue
        start = i
        text = lines[i][2:]
        while not _complete(text):
            i += 1
            if i == len(lines):
                raise DocError(
                    f"{_rel(block.doc)}:{block.first + start + 1}: the command never ends "
                    "(a quote left open, or a `\\` on its last line)"
                )
            text += "\n" + lines[i]
        i += 1
        out_first = i
        while i < len(lines) and not lines[i].startswith("$ "):
            i += 1
        out_end = i
        expected = lines[out_first:out_end]
        while expected and not expected[-1].strip():
            expected.pop()
        commands.append(
            Command(
                line=block.first + start + 1,
                text=text,
                expected=expected,
                out_first=block.first + out_first,
                out_end=block.first + out_end,
            )
        )
    return commands


# ------------------------------------------------------------ normalising

# Where the docs show the checkout: a reader's clone, not this machine's folder.
READER_CHECKOUT = "/home/you/cruzflow"

_NUMBER = r"\d+(?:\.\d+)?"
_UNIT = r"(?:ms|s|m|h|d)\b"
_NORMALISE: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:\d\d)?"),
        "<time>",
    ),
    (re.compile(r"\b\d\d:\d\d:\d\d(?:\.\d+)?\b"), "<time>"),
    (
        re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
        "<uuid>",
    ),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    # A child's derived id: its parent's, then 24 hex digits of a digest.
    (re.compile(r"-[0-9a-f]{24}\b"), "-<child>"),
    (re.compile(r'("(?:next_)?page_token": )"[^"]+"'), r'\1"<token>"'),
    (re.compile(rf"(?<![\w.]){_NUMBER} ?{_UNIT}(?: {_NUMBER} ?{_UNIT})*"), "<duration>"),
]


def normalise_line(line: str) -> str:
    for pattern, placeholder in _NORMALISE:
        line = pattern.sub(placeholder, line)
    indent = len(line) - len(line.lstrip(" "))
    return line[:indent] + re.sub(r"\s{2,}", " ", line[indent:]).rstrip()


def normalise(lines: list[str]) -> list[str]:
    out = [normalise_line(line) for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


# A line of its own: any number of lines, e.g. "..." or "... (sequences 4 to 9)".
ELISION = re.compile(r"\s*\.\.\.(?: \(.*\))?\s*")


def matches(expected: list[str], actual: list[str]) -> bool:
    """Whether the actual lines match the expected ones (both normalised): a
    ``...`` line (optionally with a comment in parentheses) matches any lines,
    ``...`` inside a line any text."""
    parts = []
    for line in expected:
        if ELISION.fullmatch(line):
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            pieces = [re.escape(piece) for piece in line.split("...")]
            parts.append(r"[^\n]*?".join(pieces) + r"\n")
    pattern = "".join(parts)
    text = "".join(line + "\n" for line in actual)
    return re.fullmatch(pattern, text) is not None


# ----------------------------------------------------------------- session


def _serves_http(command: str, cwd: Path) -> bool:
    """Whether the server ``command`` starts has an HTTP listener: its
    --http-listen, or an [http] section in its config (``make run``: the
    example's)."""
    if "--http-listen" in command:
        return True
    words = shlex.split(command)
    config = "examples/cruzflow.toml"
    for flag in ("--config", "-c"):
        if flag in words[:-1]:
            config = words[words.index(flag) + 1]
    for word in words:
        if word.startswith("CONFIG="):
            config = word.partition("=")[2]
    path = cwd / config
    return path.is_file() and re.search(r"^\[http\]", path.read_text(), re.MULTILINE) is not None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _repo_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in out.split("\0") if name]


def _base_env(port: int) -> dict[str, str]:
    """The environment of a newcomer's terminal: no venv on PATH, no
    cruzflow, OpenTelemetry, pytest or Python settings of the test run, and
    no make of its own (under `make test`, MAKELEVEL would make the README's
    `make run` print "Entering directory" lines a terminal does not show)."""
    dropped = (
        "CRUZFLOW_", "OTEL_", "PYTEST_", "PYTHON", "VIRTUAL_ENV", "COV_CORE_",
        "MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKE_TERMOUT", "MAKE_TERMERR",
    )  # fmt: skip
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    path = [
        entry
        for entry in env.get("PATH", os.defpath).split(os.pathsep)
        if entry and not (Path(entry).parent / "pyvenv.cfg").exists()
    ]
    env["PATH"] = os.pathsep.join(path)
    env.setdefault("LANG", "C.UTF-8")
    env["CRUZFLOW_ADDRESS"] = f"127.0.0.1:{port}"
    return env


_SERVER = re.compile(r"^(?:\w+=\S*\s+)*(?:make\s+(?:\S+=\S*\s+)*run\b|(?:\S*/)?cruzflow\s+serve\b)")


@dataclass
class Replacement:
    first: int  # 0-based line index in the doc
    end: int
    lines: list[str]


@dataclass
class Session:
    """One newcomer's terminal on a scratch copy of the repository."""

    doc: Path
    update: bool = False
    port: int = field(default_factory=_free_port)
    http_port: int = field(default_factory=_free_port)
    replacements: list[Replacement] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="cruzflow-docs-"))
        self.repo = self.scratch / "cruzflow"
        self.state = self.scratch / "state"
        self.state.mkdir()
        self._copy_repo()
        self.env = _base_env(self.port)
        self.cwd = self.repo
        # The variables bash has of itself (BASH*, PPID, ...) and from the
        # environment: not saved between commands as the shell's own.
        self.baseline = set(
            subprocess.run(
                ["bash", "--noprofile", "--norc", "-c", "compgen -v"],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
        )
        self.last_rc = 0
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log = self.state / "server.log"

    # -- setup and teardown

    def _copy_repo(self) -> None:
        venv = ROOT / ".venv"
        if not (venv / "bin" / "python").exists():
            raise DocError("no .venv in the checkout: run `make install` first")
        # make decides whether to reinstall by comparing the venv's stamp with
        # pyproject.toml: keep every copy older than the venv, so it never does.
        ceiling = (venv / "pyvenv.cfg").stat().st_mtime - 1
        for name in _repo_files():
            source = ROOT / name
            if not source.is_file() or name.startswith((".venv/", "examples/data/")):
                continue
            target = self.repo / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            stat = source.stat()
            os.utime(target, (stat.st_atime, min(stat.st_mtime, ceiling)))
        (self.repo / ".venv").symlink_to(venv)
        config = self.repo / "examples" / "cruzflow.toml"
        config.write_text(self._to_port(config.read_text()))
        os.utime(config, (ceiling, ceiling))

    def close(self) -> None:
        self.stop_server()
        if os.environ.get("CRUZFLOW_DOCS_KEEP") == "1":
            print(f"docs runner: scratch copy kept in {self.scratch}", file=sys.stderr)
        else:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def stop_server(self) -> None:
        server, self.server = self.server, None
        if server is None or server.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    # -- ports and output

    def _to_port(self, text: str) -> str:
        text = re.sub(rf"(?<!\d){DOC_PORT}(?!\d)", str(self.port), text)
        return re.sub(rf"(?<!\d){DOC_HTTP_PORT}(?!\d)", str(self.http_port), text)

    def _from_port(self, text: str) -> str:
        text = re.sub(rf"(?<!\d){self.port}(?!\d)", str(DOC_PORT), text)
        return re.sub(rf"(?<!\d){self.http_port}(?!\d)", str(DOC_HTTP_PORT), text)

    def _actual_lines(self, output: str) -> list[str]:
        # Paths into the checkout (tracebacks name files) as a reader's clone
        # would show them: the scratch copy's own folder is of this run only.
        output = output.replace(str(self.repo), READER_CHECKOUT)
        lines = [line.rstrip() for line in self._from_port(output).splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    # -- running

    def _wrap(self, command: str, keep_state: bool) -> str:
        """The script that runs one command as the next one typed in the same
        terminal: the shell's own variables and functions (a `token=...`,
        activate's `deactivate`) and `$?` come back; exported variables and
        the working directory come back through the process's env and cwd."""
        saved = shlex.quote(str(self.state / "shell"))
        script = f"[ -f {saved} ] && source {saved} 2>/dev/null\n(exit {self.last_rc})\n{command}\n"
        if keep_state:
            baseline = " ".join(sorted(self.baseline))
            script += (
                "__doc_rc=$?\n"
                f"pwd > {shlex.quote(str(self.state / 'cwd'))}\n"
                f"env -0 > {shlex.quote(str(self.state / 'env'))}\n"
                "{\n"
                "  for __doc_v in $(compgen -v); do\n"
                "    case $__doc_v in __doc_*) continue ;; esac\n"
                f'    case " {baseline} " in *" $__doc_v "*) continue ;; esac\n'
                '    declare -p "$__doc_v"\n'
                "  done\n"
                "  declare -f\n"
                f"}} > {saved} 2>/dev/null\n"
                "exit $__doc_rc\n"
            )
        return script

    def _load_state(self) -> None:
        self.cwd = Path((self.state / "cwd").read_text().strip())
        env = {}
        for item in (self.state / "env").read_bytes().decode().split("\0"):
            name, sep, value = item.partition("=")
            if sep and name not in ("_", "SHLVL", "PWD", "OLDPWD"):
                env[name] = value
        self.env = env

    def shell(
        self, command: str, *, keep_state: bool = True, timeout: float = COMMAND_TIMEOUT
    ) -> tuple[int, str]:
        """Run a command as the next one typed in the terminal; (status, output)."""
        proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc", "-c", self._wrap(command, keep_state)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise DocError(
                f"`{command}` did not end within {timeout:g} s; its output:\n"
                + out.decode(errors="replace")
            ) from None
        if keep_state:
            self._load_state()
            self.last_rc = proc.returncode
        return proc.returncode, out.decode(errors="replace")

    def _check_make_only_serves(self, command: Command) -> None:
        """The scratch copy shares the checkout's .venv: a `make run` that
        would reinstall would point its editable installs at the scratch copy.
        Ask make what it would do first."""
        text = self._to_port(command.text)
        dry = re.sub(r"^(\s*(?:\w+=\S*\s+)*make)\b", r"\1 -n", text, count=1)
        if dry == text:
            return
        status, output = self.shell(dry, keep_state=False)
        lines = [line for line in output.splitlines() if line.strip()]
        if status != 0 or not lines or not all("cruzflow serve" in line for line in lines):
            raise DocError(
                f"{_rel(self.doc)}:{command.line}: `{command.display}` would do more than "
                "serve (is .venv older than pyproject.toml? run `make install` in the "
                f"checkout); `make -n` says:\n{output}"
            )

    def start_server(self, command: Command) -> str:
        if self.server is not None and self.server.poll() is None:
            raise DocError(
                f"{_rel(self.doc)}:{command.line}: `{command.display}` starts a second server "
                "while the first still runs"
            )
        self._check_make_only_serves(command)
        log = self.server_log.open("wb")
        self.server = subprocess.Popen(
            [
                "bash",
                "--noprofile",
                "--norc",
                "-c",
                self._wrap(self._to_port(command.text), keep_state=False),
            ],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        # A server with an HTTP listener prints its line right after.
        ready = (
            r"^cruzflow http listening on .*$"
            if _serves_http(self._to_port(command.text), self.cwd)
            else r"^cruzflow listening on .*$"
        )
        while True:
            text = self.server_log.read_text(errors="replace")
            found = re.search(ready, text, re.MULTILINE)
            if found:
                return text[: found.end()]
            if self.server.poll() is not None:
                raise DocError(
                    f"{_rel(self.doc)}:{command.line}: `{command.display}` exited "
                    f"{self.server.returncode} instead of serving; its output:\n{text}"
                )
            if time.monotonic() > deadline:
                raise DocError(
                    f"{_rel(self.doc)}:{command.line}: `{command.display}` did not print "
                    f"`cruzflow listening on` within {SERVER_START_TIMEOUT:g} s; its output:\n"
                    + text
                )
            time.sleep(0.05)

    # -- checking

    def check_output(
        self,
        what: str,
        line: int,
        expected: list[str],
        output: str,
        first: int,
        end: int,
    ) -> None:
        actual = self._actual_lines(output)
        want, got = normalise(expected), normalise(actual)
        if matches(want, got):
            return
        if self.update:
            self.replacements.append(Replacement(first, end, actual))
            self.log.append(f"{_rel(self.doc)}:{line}: updated the output of {what}")
            return
        diff = "\n".join(
            difflib.unified_diff(
                want, got, "expected (normalised)", "actual (normalised)", lineterm=""
            )
        )
        raise DocError(
            f"{_rel(self.doc)}:{line}: {what} printed something else than the doc shows.\n"
            f"--- expected (lines {first + 1}-{end} of {_rel(self.doc)}):\n"
            + "\n".join(expected)
            + "\n--- actual:\n"
            + "\n".join(actual)
            + f"\n--- difference after normalising:\n{diff}\n"
            f"(run with {UPDATE_VARIABLE}=1 to write the real output into the doc)"
        )

    def run_console(self, block: Block) -> None:
        commands = parse_console(block)
        for index, command in enumerate(commands):
            what = f"`{command.display}`"
            if _SERVER.match(command.text.strip()):
                output = self.start_server(command)
                self.check_output(
                    what, command.line, command.expected, output, command.out_first, command.out_end
                )
                continue
            status, output = self.shell(self._to_port(command.text))
            following = commands[index + 1].text.strip() if index + 1 < len(commands) else ""
            if status != 0 and following != "echo $?":
                raise DocError(
                    f"{_rel(self.doc)}:{command.line}: {what} exited {status} (a command that "
                    "fails must be followed by `$ echo $?` to show it); its output:\n" + output
                )
            self.check_output(
                what, command.line, command.expected, output, command.out_first, command.out_end
            )

    def run_sh(self, block: Block) -> None:
        status, output = self.shell(self._to_port("\n".join(block.lines)))
        if status != 0:
            raise DocError(f"{block.where}: the sh block exited {status}; its output:\n{output}")

    def _script(self, block: Block, prefix: str, folder: Path) -> Path:
        stem = re.sub(r"\W", "_", self.doc.stem.lower())
        path = folder / f"{prefix}{stem}_{block.fence_line}.py"
        path.write_text(self._to_port("\n".join(block.lines) + "\n"))
        return path

    def run_python(self, block: Block) -> None:
        script = self._script(block, "doc_", self.state)
        python = self.repo / ".venv" / "bin" / "python"
        status, output = self.shell(
            f"{shlex.quote(str(python))} {shlex.quote(str(script))}", keep_state=False
        )
        if status != 0:
            raise DocError(
                f"{block.where}: the python block exited {status}; its output:\n{output}"
            )
        if block.output is not None:
            out = block.output
            self.check_output(
                "the python block",
                block.fence_line,
                out.lines,
                output,
                out.first,
                out.first + len(out.lines),
            )

    def run_pytest(self, block: Block) -> None:
        folder = self.repo / block.argument
        module = self._script(block, "test_doc_", folder)
        python = self.repo / ".venv" / "bin" / "python"
        try:
            status, output = self.shell(
                f"cd {shlex.quote(str(folder))} && {shlex.quote(str(python))} -m pytest -q "
                f"-p no:cacheprovider {shlex.quote(module.name)}",
                keep_state=False,
            )
        finally:
            module.unlink()
        if status != 0:
            raise DocError(
                f"{block.where}: the block, run with pytest in {block.argument}/, failed:\n{output}"
            )

    def run(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.directive == "skip":
                continue
            if block.directive == "excerpt":
                check_excerpt(block)
            elif block.directive == "pytest":
                self.run_pytest(block)
            elif block.lang == "console":
                self.run_console(block)
            elif block.lang == "sh":
                self.run_sh(block)
            elif block.lang == "python":
                self.run_python(block)
            else:
                raise DocError(
                    f"{block.where}: a {block.lang or 'plain'} block the runner cannot run: "
                    "mark it <!-- doc-test: skip (why) --> or <!-- doc-test: excerpt PATH -->"
                )


def check_excerpt(block: Block) -> None:
    """Every line of an abridged excerpt is in the file it quotes, in order."""
    path = ROOT / block.argument
    if not path.is_file():
        raise DocError(f"{block.where}: the excerpt quotes {block.argument}, which does not exist")
    source = [line.rstrip() for line in path.read_text().splitlines()]
    lines = list(block.lines)
    if lines and lines[0].lstrip().startswith("#") and block.argument in lines[0]:
        lines = lines[1:]
    at = 0
    for offset, line in enumerate(lines):
        wanted = line.rstrip()
        if not wanted.strip() or wanted.strip() in ("...", "# ..."):
            continue
        try:
            at = source.index(wanted, at) + 1
        except ValueError:
            number = block.first + offset + (len(block.lines) - len(lines)) + 1
            raise DocError(
                f"{_rel(block.doc)}:{number}: this line of the excerpt is not in "
                f"{block.argument} (after its line {at}):\n{line}"
            ) from None


def apply_replacements(doc: Path, replacements: list[Replacement]) -> None:
    lines = doc.read_text().splitlines()
    for item in sorted(replacements, key=lambda r: r.first, reverse=True):
        # Keep the blank lines that separated this output from the next command.
        end = item.end
        while end > item.first and not lines[end - 1].strip():
            end -= 1
        lines[item.first : end] = item.lines
    doc.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def session(doc: Path, update: bool = False) -> Iterator[Session]:
    running = Session(doc=doc, update=update)
    try:
        yield running
    finally:
        running.close()


def run_doc(doc: Path, update: bool = False) -> list[str]:
    """Run every block of ``doc`` in order; raise DocError at the first that
    does not do what the doc says. In update mode, write real outputs into the
    doc instead and return what was updated."""
    blocks = parse_blocks(doc)
    with session(doc, update) as running:
        running.run(blocks)
    if running.replacements:
        apply_replacements(doc, running.replacements)
    return running.log


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("docs", nargs="*", type=Path, help="markdown files (default: all)")
    parser.add_argument(
        "--update", action="store_true", help="write the real outputs into the docs"
    )
    args = parser.parse_args()
    docs = [path.resolve() for path in args.docs] or doc_files()
    failed = False
    for doc in docs:
        started = time.monotonic()
        try:
            log = run_doc(doc, update=args.update)
        except DocError as error:
            print(error, file=sys.stderr)
            failed = True
            continue
        for entry in log:
            print(entry)
        print(f"{_rel(doc)}: ok ({time.monotonic() - started:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
