"""Reading the Terraform coder's answer: its files and its deployment steps.

The coder is asked for each file under a `### main.tf` heading followed by one fenced
block; this is the one parser of that format, for the web page, the CLI and the tests.
"""

from __future__ import annotations

import re

_FILE_HEADING = re.compile(r"^\s*#{2,6}\s*`?([\w./-]+\.tf)`?\s*:?\s*$")
_FENCE_OPEN = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)\s*$")
_STEPS_HEADING = re.compile(r"^\s*#{1,6}\s*deployment steps\s*:?\s*$", re.IGNORECASE)
_ANY_HEADING = re.compile(r"^\s*#{1,6}\s")


def split_terraform(text: str) -> dict[str, str]:
    """File name -> contents, in the order they appear; a heading without a fence is skipped."""
    lines = text.splitlines()
    files: dict[str, str] = {}
    index = 0
    while index < len(lines):
        heading = _FILE_HEADING.match(lines[index])
        index += 1
        if not heading:
            continue
        while index < len(lines) and not lines[index].strip():
            index += 1
        fence = _FENCE_OPEN.match(lines[index]) if index < len(lines) else None
        if not fence:
            continue
        marker = fence[1]
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != marker:
            body.append(lines[index])
            index += 1
        index += 1  # past the closing fence
        files[heading[1].rsplit("/", 1)[-1]] = "\n".join(body).rstrip() + "\n"
    return files


def deployment_steps(text: str) -> str:
    """The markdown under the "Deployment steps" heading, up to the next heading ('' if none)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if _STEPS_HEADING.match(line):
            body: list[str] = []
            for following in lines[index + 1 :]:
                if _ANY_HEADING.match(following):
                    break
                body.append(following)
            return "\n".join(body).strip()
    return ""
