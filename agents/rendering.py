"""Markdown from the agents, rendered to HTML on the server and sanitised.

Model output is untrusted: it may echo a user's request or be steered by it, so it can
contain `<script>`, event handlers or `javascript:` links. Two layers keep those out:
markdown-it runs with raw HTML disabled (HTML in the text is shown as text), and nh3
(Ammonia) then re-parses the result against an allow-list of tags, attributes and URL
schemes. Images become plain links so a model cannot make the reader's browser fetch a
third-party URL (tracking pixels) just by opening the page.
"""

from __future__ import annotations

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

ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5",
        "h6", "hr", "li", "ol", "p", "pre", "s", "strong", "table", "tbody", "td", "th",
        "thead", "tr", "ul",
    }
)  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "code": {"class"}, "pre": {"class"}, "ol": {"start"}}
ALLOWED_URL_SCHEMES = frozenset({"http", "https", "mailto"})
_SAFE_CLASS = re.compile(rf"^(?:language-[A-Za-z0-9_+#.-]{{1,32}}|{MERMAID_CLASS})$")


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    """nh3 hook: class names only from our own renderer's vocabulary, never free text."""
    if attribute == "class":
        kept = [name for name in value.split() if _SAFE_CLASS.match(name)]
        return " ".join(kept) or None
    return value


def _render_fence(renderer: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """Mermaid fences become a marked block the page's script can turn into a diagram."""
    token = tokens[idx]
    language = token.info.strip().split(maxsplit=1)[0].lower() if token.info.strip() else ""
    code = escape(token.content)
    if language == "mermaid":
        return f'<pre class="{MERMAID_CLASS}"><code>{code}</code></pre>\n'
    css = f' class="language-{escape(language)}"' if language else ""
    return f"<pre><code{css}>{code}</code></pre>\n"


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


def render_markdown(text: str) -> SafeString:
    """Markdown from a model (untrusted) as HTML that is safe to put in a page."""
    if not text:
        return mark_safe("")
    return mark_safe(sanitize_html(_parser.render(text)))  # sanitised just above


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
            "summary_html": render_markdown(report.get("summary", "")) if report else "",
        }
    if output == Output.TERRAFORM:
        files = split_terraform(run.output_text)
        return {
            "kind": "terraform",
            "files": [{"name": name, "content": content} for name, content in files.items()],
            "steps_html": render_markdown(deployment_steps(run.output_text)),
            "html": render_markdown(run.output_text),
            "raw_text": run.output_text,
        }
    text = run.output_text
    if output == Output.LABELLED:
        text = separate_labels(text)
    return {"kind": "markdown", "html": render_markdown(text)}
