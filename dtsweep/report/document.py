"""A report as a list of blocks, rendered to Markdown and to HTML with the same content.

Building both from one block list (instead of parsing the Markdown back) keeps the HTML
exact without a Markdown dependency. Inline text may use `code`, **bold** and [text](url).
"""

from __future__ import annotations

import html
import math
import re

import pandas as pd

_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|\[([^\]]+)\]\(([^)\s]+)\)")


def _inline_html(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        code, bold, label, href = m.groups()
        if code is not None:
            out.append(f"<code>{html.escape(code)}</code>")
        elif bold is not None:
            out.append(f"<strong>{html.escape(bold)}</strong>")
        else:
            out.append(f'<a href="{html.escape(href)}">{html.escape(label)}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def format_cell(v, digits: int = 2) -> str:
    """Numbers rounded for reading; missing values as an em dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


class Document:
    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def table(self, df: pd.DataFrame, digits: int = 2) -> None:
        header = [str(c) for c in df.columns]
        rows = [[format_cell(v, digits) for v in r] for r in df.itertuples(index=False)]
        self.blocks.append(("table", header, rows))

    def image(self, src: str, caption: str) -> None:
        self.blocks.append(("image", src, caption))

    def to_markdown(self) -> str:
        parts = [f"# {self.title}"]
        for kind, *a in self.blocks:
            if kind == "heading":
                parts.append(f"{'#' * a[0]} {a[1]}")
            elif kind == "paragraph":
                parts.append(a[0])
            elif kind == "bullets":
                parts.append("\n".join(f"- {item}" for item in a[0]))
            elif kind == "table":
                header, rows = a
                cell = lambda s: s.replace("|", "\\|")  # noqa: E731
                lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
                parts.append("\n".join(lines))
            elif kind == "image":
                parts.append(f"![{a[1]}]({a[0]})\n\n*{a[1]}*")
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, *a in self.blocks:
            if kind == "heading":
                body.append(f"<h{a[0]}>{_inline_html(a[1])}</h{a[0]}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_html(a[0])}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in a[0]) + "</ul>")
            elif kind == "table":
                header, rows = a
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
                trs = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "image":
                src, cap = html.escape(a[0]), _inline_html(a[1])
                body.append(f'<figure><img src="{src}" alt="{html.escape(a[1])}"><figcaption>{cap}</figcaption></figure>')
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
            "text-align:right}th{background:#eee}img{max-width:100%}figcaption{font-style:italic}"
        )
        return (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
        )
