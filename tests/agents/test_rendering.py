"""Model output is untrusted: whatever it contains, the rendered HTML must not execute; and
each run is presented the way its agent's spec says."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from agents.models import AgentRun
from agents.rendering import present_run, render_markdown, sanitize_html, separate_labels


class _Elements(HTMLParser):
    """Collects (tag, attributes) of every element, as a browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.elements


def assert_inert(html: str) -> None:
    """No script-capable element, no event handler, no javascript:/data: URL."""
    for tag, attributes in elements(html):
        assert tag not in {"script", "iframe", "object", "embed", "img", "svg", "style", "form"}
        for name, value in attributes.items():
            assert not name.startswith("on"), (tag, name)
            assert name not in {"style", "srcdoc", "formaction"}, (tag, name)
            if name in {"href", "src"}:
                assert (value or "").split(":", 1)[0].lower() in {"http", "https", "mailto"}


ATTACKS = [
    "<script>alert(1)</script>",
    '<img src="x" onerror="alert(1)">',
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[click](JaVaScRiPt:alert(1))",
    "[click](&#106;avascript:alert(1))",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![pixel](https://tracker.example/p.gif)",
    '<svg onload="alert(1)"></svg>',
    '<iframe src="https://evil.example"></iframe>',
    '<div style="background:url(javascript:alert(1))">x</div>',
    "<details open ontoggle=alert(1)>x</details>",
    '```js" onmouseover="alert(1)\nconsole.log(1)\n```',
    "<!-- <script>alert(1)</script> -->",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_markdown_attacks_render_inert(attack: str) -> None:
    html = render_markdown(f"# Design\n\nSome text.\n\n{attack}\n\nMore text.")
    assert_inert(html)
    assert "<h1>Design</h1>" in html  # the legitimate markdown still renders


def test_raw_html_is_shown_as_text_not_markup() -> None:
    html = render_markdown("Use <b>bold</b> and <script>alert('x')</script> here.")
    assert "<script" not in html
    assert "<b>" not in html
    assert "&lt;script&gt;" in html  # the reader sees what the model wrote


def test_javascript_link_loses_its_target() -> None:
    html = render_markdown("[docs](javascript:alert(1)) and [real](https://learn.microsoft.com)")
    hrefs = [attrs.get("href") for tag, attrs in elements(html) if tag == "a"]
    assert hrefs == ["https://learn.microsoft.com"]
    assert 'rel="noopener noreferrer nofollow"' in html


def test_image_becomes_a_link_so_no_third_party_fetch() -> None:
    html = render_markdown("![diagram](https://cdn.example/d.png)")
    assert elements(html) == [
        ("p", {}),
        ("a", {"href": "https://cdn.example/d.png", "rel": "noopener noreferrer nofollow"}),
    ]
    assert "[image: diagram]" in html


def test_mermaid_fence_survives_as_marked_block() -> None:
    source = "flowchart TD\n  user[User] --> gw[Application Gateway]\n  gw --> app"
    html = render_markdown(f"## Diagram\n\n```mermaid\n{source}\n```\n")
    assert '<pre class="mermaid-source"><code>' in html
    # Escaped for HTML; the browser's textContent gives mermaid the original source back.
    assert "user[User] --&gt; gw[Application Gateway]" in html


def test_mermaid_source_cannot_smuggle_markup() -> None:
    html = render_markdown("```mermaid\nflowchart TD\n  A[<img src=x onerror=alert(1)>] --> B\n```")
    assert_inert(html)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_code_fence_keeps_a_safe_language_class_only() -> None:
    html = render_markdown('```hcl\nresource "azurerm_resource_group" "rg" {}\n```')
    assert '<pre><code class="language-hcl">' in html
    hostile = render_markdown("```hcl onclick=alert(1)\nx\n```")
    assert "onclick" not in hostile


def test_tables_and_lists_render() -> None:
    html = render_markdown("| Service | SKU |\n|:--|--:|\n| App Service | P1v3 |\n\n- one\n- two\n")
    tags = [tag for tag, _ in elements(html)]
    assert {"table", "thead", "tbody", "th", "td", "ul", "li"} <= set(tags)
    assert "style=" not in html  # alignment styles are dropped with every other style


def test_sanitize_html_strips_handlers_from_allowed_tags() -> None:
    cleaned = sanitize_html(
        '<p onclick="x()">hi <a href="javascript:x()" onmouseover="y()">a</a></p>'
    )
    assert_inert(cleaned)
    assert "hi" in cleaned


def test_empty_text_renders_empty() -> None:
    assert render_markdown("") == ""


def test_labelled_lines_become_separate_paragraphs() -> None:
    audit = (
        "VERDICT: NEEDS REVISION\nSUMMARY: Close, but not yet.\nSTRENGTHS:\n- Managed services\n"
        "REQUIRED CHANGES:\n- Add a WAF\n"
    )
    html = render_markdown(separate_labels(audit))
    assert "<p><strong>Verdict:</strong> NEEDS REVISION</p>" in html
    assert "<p><strong>Summary:</strong> Close, but not yet.</p>" in html
    # The label after a list starts a new block instead of joining the list's last item.
    assert "<li>Managed services</li>\n</ul>\n<p><strong>Required changes</strong></p>" in html
    assert "<li>Add a WAF</li>" in html


def present(agent: str, text: str = "", report: dict | None = None) -> dict:
    return present_run(AgentRun(agent=agent, output_text=text, output_json=report))


def test_each_run_is_presented_as_its_agent_spec_says() -> None:
    audit = present("auditor", "VERDICT: APPROVED\nSUMMARY: Sound.\nSTRENGTHS:\n- Managed")
    assert audit["kind"] == "markdown"
    assert "<strong>Verdict:</strong> APPROVED" in audit["html"]  # labelled lines apart

    design = present("carlos", "VERDICT: not a label line for an architect")
    assert design["kind"] == "markdown" and "<strong>" not in design["html"]

    report = {"carlos": {}, "ronei": {}, "summary": "Both **fine**."}
    security = present("security", json.dumps(report), report)
    assert (security["kind"], security["template"]) == ("analysis", "agents/analysis/security.html")
    assert "<strong>fine</strong>" in security["summary_html"]
    assert json.loads(security["raw_json"]) == report
    invalid = present("cost", "not JSON")
    assert (invalid["kind"], invalid["report"]) == ("analysis", None)
    assert invalid["raw_text"] == "not JSON"

    terraform = present("terraform", "### main.tf\n```hcl\nresource {}\n```")
    assert terraform["kind"] == "terraform"
    assert terraform["files"] == [{"name": "main.tf", "content": "resource {}\n"}]

    # A run of an agent no spec declares any more (a retired agent) still shows, as text.
    retired = present("retired", "# Old\n<script>alert(1)</script>")
    assert retired["kind"] == "markdown"
    assert_inert(retired["html"])


def test_a_finished_answer_is_rendered_once_however_often_its_page_is_viewed():
    """Issue 16's profile: every view of a design page rendered all nine answers again (60 %
    of the page's CPU). The same text gives the same safe HTML, from the cache after the
    first time; another heading level or another text is rendered anew."""
    from agents.rendering import _rendered

    text = "# Carlos's design\n\nSome **bold** text and <script>alert(1)</script>."
    first = render_markdown(text, top_heading=3)
    hits = _rendered.cache_info().hits
    assert render_markdown(text, top_heading=3) == first
    assert _rendered.cache_info().hits == hits + 1
    assert "<h3>" in first and "<script>" not in first
    assert "<h4>" in render_markdown(text, top_heading=4)
