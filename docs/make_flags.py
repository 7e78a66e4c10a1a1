"""Writes docs/flags.md from the training configuration's command-line parser, so the page can never
disagree with `run.py --help`; tests/test_docs.py fails when the file is out of date.

    python docs/make_flags.py
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from segment_anything.training.config import TrainConfig  # noqa: E402

OUT = REPO / "docs" / "flags.md"
HEADER = """# Training flags

Every flag of `python run.py` (the same as `sam-train`), with its default and meaning. This page is
generated from the training configuration by `python docs/make_flags.py`; edit the configuration,
not this file. Boolean flags take a value (`--skip_bad True`, `--dist no`; yes/true/t/y/1 or
no/false/f/n/0) or stand alone for true (`--skip_bad`). The topic pages explain the flags in
context: [data](data.md), [training](training.md), [distributed](distributed.md).
"""


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def default_of(action: argparse.Action) -> str:
    if action.default is None or action.default == "":
        return "—"
    return f"`{action.default}`"


def table(actions) -> list:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in actions:
        if not action.option_strings or action.dest == "help":
            continue
        meaning = action.help or ""
        if action.choices and not all(str(c) in meaning for c in action.choices):
            meaning += " (one of: " + ", ".join(f"`{c}`" for c in action.choices) + ")"
        rows.append(f"| `{action.option_strings[0]}` | {cell(default_of(action))} | {cell(meaning)} |")
    return rows if len(rows) > 2 else []


def render() -> str:
    parser = TrainConfig.parser()
    lines = HEADER.splitlines()
    for group in parser._action_groups:
        rows = table(group._group_actions)
        if not rows:
            continue
        if group.title not in ("options", "optional arguments"):  # sections, where the parser has them
            lines += ["", f"## {group.title[:1].upper()}{group.title[1:]}"]
        lines += [""] + rows
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(REPO)}")
