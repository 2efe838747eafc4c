"""The shell examples of README.md and docs/*.md, read as data.

Two kinds of check use them (tests/docs/test_doc_examples.py):

- every `mpfleet ...` command line of every ```sh block, and of every command's
  `--help`, must parse: click checks the command path, the options and each value's
  type, without running the command;
- a block marked runnable runs in a sandbox and must end as documented. The marker is
  an HTML comment on the line before the fence (GitHub does not render it):

      <!-- runnable: expect=/deployed \\d+ files/ exit=0 timeout=120 -->
      ```sh
      ...
      ```

  `expect=/regex/` (repeatable) must match the block's output (stdout and stderr);
  `exit=N` is the status the block ends with (default 0); `timeout=S` seconds
  (default 120). The blocks of one document run in order in one sandbox, so a later
  block may use what an earlier one made.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*runnable:?(.*?)-->\s*$")
_ATTRIBUTE = re.compile(r"(\w+)=(/(?:[^/\\]|\\.)*/|\S+)")
_SHELL = {"sh", "bash", "shell", "console"}


@dataclass
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    text: str
    runnable: bool = False
    expect: list[str] = field(default_factory=list)
    exit: int = 0
    timeout_s: float = 120.0

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(REPO)}:{self.line}"


def _attributes(block: Block, text: str) -> None:
    for key, value in _ATTRIBUTE.findall(text):
        if key == "expect":
            if not (value.startswith("/") and value.endswith("/") and len(value) >= 2):
                raise ValueError(f"{block.name}: expect= takes a /regex/, not {value!r}")
            block.expect.append(value[1:-1])
        elif key == "exit":
            block.exit = int(value)
        elif key == "timeout":
            block.timeout_s = float(value)
        else:
            raise ValueError(f"{block.name}: unknown runnable attribute {key!r}")


def shell_blocks(document: Path) -> list[Block]:
    """The ```sh blocks of `document`, in order, with their runnable markers read."""
    blocks, lines = [], document.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        if fence.group(1) in _SHELL:
            block = Block(document, i + 1, "\n".join(lines[i + 1:end]) + "\n")
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _MARKER.match(previous.strip())
            if marker:
                block.runnable = True
                _attributes(block, marker.group(1))
            blocks.append(block)
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in shell_blocks(document)]


# ---------------------------------------------------------------- command lines
_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")


def _logical_lines(text: str) -> list[str]:
    """The block's lines with `\\` continuations joined and here-document bodies left out."""
    out, pending, heredoc_end = [], "", None
    for raw in text.splitlines():
        if heredoc_end is not None:
            if raw.strip() == heredoc_end:
                heredoc_end = None
            continue
        line = pending + raw
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        heredoc = _HEREDOC.search(line)
        if heredoc:
            heredoc_end = heredoc.group(1)
        out.append(line)
    return out


def mpfleet_commands(text: str) -> list[list[str]]:
    """The argument lists of every `mpfleet ...` command in shell text (the words after
    `mpfleet`, up to the next shell operator; redirections and their targets left out)."""
    commands = []
    for line in _logical_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] | None = None  # the mpfleet command being read
        at_start, redirect = True, False
        for word in [*lexer, ";"]:
            if redirect:
                redirect = False
            elif set(word) <= set(";&|()"):  # an operator ends the command
                if words is not None:
                    commands.append(words)
                words, at_start = None, True
            elif set(word) <= set("<>"):
                redirect = True
            elif at_start:
                words, at_start = ([] if word == "mpfleet" else None), False
            elif words is not None:
                words.append(word)
    return commands


def help_examples(text: str) -> list[str]:
    """Lines of a --help text that show an `mpfleet ...` command (an example)."""
    found = []
    for raw in _logical_lines("\n".join(line.strip() for line in text.splitlines())):
        line = raw.strip().removeprefix("$ ")
        if line.startswith("mpfleet "):
            found.append(line)
    return found
