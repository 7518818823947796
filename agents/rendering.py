"""Markdown from the agents, rendered to HTML on the server and sanitised.

Model output is untrusted: it may echo a user's request or be steered by it, so it can
contain `<script>`, event handlers or `javascript:` links. Two layers keep those out:
markdown-it runs with raw HTML disabled (HTML in the text is shown as text), and nh3
(Ammonia) then re-parses the result against an allow-list of tags, attributes and URL
schemes. Images become plain links so a model cannot make the reader's browser fetch a
third-party URL (tracking pixels) just by opening the page.

Rendered for a page, agent text fits that page's outline: its headings start below the
heading they are shown under (`top_heading`; an agent's `# Title` is no second h1), and each
Mermaid diagram comes in a figure whose caption names what it shows (its node labels, the
text alternative of the drawing).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING, Any

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.token import Token

from agents.specs import Output, find_spec
from agents.terraform import deployment_steps, split_terraform

if TYPE_CHECKING:
    from agents.models import AgentRun

MERMAID_CLASS = "mermaid-source"
MERMAID_FIGURE_CLASS = "mermaid-figure"
# How many of a diagram's node labels its caption names before "and N more".
CAPTION_LABELS = 12

ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "blockquote", "br", "code", "del", "em", "figcaption", "figure", "h1",
        "h2", "h3", "h4", "h5", "h6", "hr", "li", "ol", "p", "pre", "s", "strong", "table",
        "tbody", "td", "th", "thead", "tr", "ul",
    }
)  # fmt: skip
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "code": {"class"},
    "figure": {"class"},
    "pre": {"class"},
    "ol": {"start"},
}
ALLOWED_URL_SCHEMES = frozenset({"http", "https", "mailto"})
_SAFE_CLASS = re.compile(
    rf"^(?:language-[A-Za-z0-9_+#.-]{{1,32}}|{MERMAID_CLASS}|{MERMAID_FIGURE_CLASS})$"
)


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    """nh3 hook: class names only from our own renderer's vocabulary, never free text."""
    if attribute == "class":
        kept = [name for name in value.split() if _SAFE_CLASS.match(name)]
        return " ".join(kept) or None
    return value


# A node's label in a Mermaid diagram: `id[Label]`, `id("Label")`, `id[("Label")]`,
# `id{Label}`, `id((Label))`, `id>Label]`; and a sequence's `participant id as Label`.
_NODE_LABEL = re.compile(
    r"""[\w-]+\s*(?:\[\[|\[\(|\(\[|\(\(|\{\{|[\[({>])\s*"?([^"\[\](){}|]+?)"?\s*[\])}]"""
)
_PARTICIPANT = re.compile(r"^\s*(?:participant|actor)\s+\S+\s+as\s+(.+?)\s*$", re.MULTILINE)


def diagram_summary(source: str) -> str:
    """A text alternative of a Mermaid diagram: its kind and the labels of its nodes."""
    lines = [line.strip() for line in source.strip().splitlines() if line.strip()]
    kind = lines[0].split()[0] if lines else "diagram"
    labels = list(
        dict.fromkeys(
            label.strip()
            for label in [*_NODE_LABEL.findall(source), *_PARTICIPANT.findall(source)]
            if label.strip()
        )
    )
    name = {"flowchart": "Flowchart", "graph": "Flowchart", "sequenceDiagram": "Sequence diagram"}
    summary = f"{name.get(kind, 'Diagram')}"
    if not labels:
        return summary
    shown = ", ".join(labels[:CAPTION_LABELS])
    more = len(labels) - CAPTION_LABELS
    return f"{summary} of {shown}" + (f", and {more} more" if more > 0 else "")


def _render_fence(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """Mermaid fences become a marked block the page's script can turn into a diagram."""
    token = tokens[idx]
    language = token.info.strip().split(maxsplit=1)[0].lower() if token.info.strip() else ""
    code = escape(token.content)
    if language == "mermaid":
        caption = escape(diagram_summary(token.content))
        return (
            f'<figure class="{MERMAID_FIGURE_CLASS}"><pre class="{MERMAID_CLASS}">'
            f"<code>{code}</code></pre><figcaption>{caption}</figcaption></figure>\n"
        )
    css = f' class="language-{escape(language)}"' if language else ""
    return f"<pre><code{css}>{code}</code></pre>\n"


def _render_heading(
    renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any
) -> str:
    """A heading `top_heading - 1` levels down (h6 at most): the page's own come first."""
    token = tokens[idx]
    level = min(int(token.tag[1]) + env.get("heading_shift", 0), 6)
    return f"</h{level}>\n" if token.nesting < 0 else f"<h{level}>"


def _render_image(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """An image is shown as a link to it: opening a page must not fetch third-party URLs."""
    token = tokens[idx]
    alt = escape(token.content or "image")
    src = escape(str(token.attrGet("src") or ""))
    return f'<a href="{src}">[image: {alt}]</a>'


def _build_parser() -> MarkdownIt:
    parser = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    parser.enable(["table", "strikethrough"])
    parser.add_render_rule("fence", _render_fence)
    parser.add_render_rule("image", _render_image)
    parser.add_render_rule("heading_open", _render_heading)
    parser.add_render_rule("heading_close", _render_heading)
    return parser


_parser = _build_parser()


def sanitize_html(html: str) -> str:
    """Keep only the allow-listed markup; everything executable is removed."""
    return nh3.clean(
        html,
        tags=set(ALLOWED_TAGS),
        attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
        attribute_filter=_keep_attribute,
        url_schemes=set(ALLOWED_URL_SCHEMES),
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def render_markdown(text: str, *, top_heading: int = 1) -> SafeString:
    """Markdown from a model (untrusted) as HTML that is safe to put in a page; its top
    headings (`#`) become `h<top_heading>`, the others follow below them."""
    if not text:
        return mark_safe("")
    return _rendered(text, top_heading)


# A finished answer never changes, and every view of a design page rendered all nine again:
# 60 % of the page's CPU (issue 16's profile), so 200 users opening their designs at once
# queued seconds behind it. Keyed by the text itself; about 10 MB at most.
@functools.lru_cache(maxsize=512)
def _rendered(text: str, top_heading: int) -> SafeString:
    html = _parser.render(text, {"heading_shift": max(top_heading - 1, 0)})
    return mark_safe(sanitize_html(html))  # sanitised just above


# An agent's answer is shown in its tab, under the tab's h2; its summary and deployment
# steps under an h3 of their own.
AGENT_TOP_HEADING = 3
SECTION_TOP_HEADING = 4


# A labelled answer's lines ("VERDICT: ...", "STRENGTHS:" then a list): Output.LABELLED.
_LABEL_LINE = re.compile(r"^([A-Z][A-Z /&-]{1,40}):[ \t]*(.*)$", re.MULTILINE)


def separate_labels(text: str) -> str:
    """Give each `LABEL:` line its own paragraph with the label in bold.

    In markdown such lines would otherwise run together into one paragraph, and a label
    that follows a list would be swallowed into the list's last item.
    """

    def labelled(match: re.Match[str]) -> str:
        label = match[1].strip().capitalize()
        rest = match[2].strip()
        return f"\n**{label}:** {rest}\n" if rest else f"\n**{label}**\n"

    return _LABEL_LINE.sub(labelled, text)


def present_run(run: AgentRun) -> dict[str, Any]:
    """What an agent's tab shows for a finished run, with every piece of model text made safe.

    The agent's spec decides: `kind` "analysis" for a JSON report (shown by the spec's
    template as a readable summary, plus the raw JSON), "terraform" (the four files, each
    copyable, plus the rest of the answer), else "markdown" (an agent no spec declares any
    more is shown as markdown too).
    """
    spec = find_spec(run.agent)
    output = spec.output if spec is not None else Output.MARKDOWN
    if output == Output.JSON:
        report = run.output_json if isinstance(run.output_json, dict) else None
        return {
            "kind": "analysis",
            "template": spec.template,
            "report": report,
            "raw_json": json.dumps(report, indent=2) if report is not None else "",
            "json_error": run.json_error,
            "raw_text": run.output_text,
            "summary_html": (
                render_markdown(report.get("summary", ""), top_heading=SECTION_TOP_HEADING)
                if report
                else ""
            ),
        }
    if output == Output.TERRAFORM:
        files = split_terraform(run.output_text)
        return {
            "kind": "terraform",
            "files": [{"name": name, "content": content} for name, content in files.items()],
            "steps_html": render_markdown(
                deployment_steps(run.output_text), top_heading=SECTION_TOP_HEADING
            ),
            "html": render_markdown(run.output_text, top_heading=AGENT_TOP_HEADING),
            "raw_text": run.output_text,
        }
    text = run.output_text
    if output == Output.LABELLED:
        text = separate_labels(text)
    return {"kind": "markdown", "html": render_markdown(text, top_heading=AGENT_TOP_HEADING)}
