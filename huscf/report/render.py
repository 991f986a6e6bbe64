"""The report as neutral blocks (heading, paragraph, table, image, code, contents) and the two
renderers that turn a list of blocks into HTML (images inline as base64) and Markdown (images as
files), escaping every piece of text; ``commit`` writes both atomically."""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huscf.errors import HuscfError


# -- blocks -----------------------------------------------------------------------------------------
@dataclass
class Code:
    """Inline code inside a paragraph."""

    text: str


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Para:
    parts: list[str | Code]
    note: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file stem in report_files/ (sanitised again on output)
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class CodeBlock:
    text: str
    lang: str = ""


@dataclass
class Toc:
    entries: list[tuple[str, str]] = field(default_factory=list)  # (anchor, title)


Block = Heading | Para | Table | Image | CodeBlock | Toc


def para(*parts: str | Code, note: bool = False) -> Para:
    return Para(list(parts), note)

def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__

def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "image"


# -- renderers ---------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #eee}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.7em 0;font-size:.88em}th,td{border:1px solid #d0d7de;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f4f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em;border-radius:4px}
code{background:#f0f2f4;padding:0 .25em;border-radius:3px}pre code{background:none;padding:0}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.88em;margin-top:.3em}
p.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em}nav ul{columns:2;padding-left:1.2em}
"""
FILES_DIR = "report_files"  # next to report.md, which links its images there
_NUMERIC = re.compile(r"^(?:[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?(?: ?(?:MB|s|min|h|%))?|–)$")


def render_html(title: str, blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
           *(_block_html(b) for b in blocks), "</body></html>"]
    return "\n".join(out) + "\n"


def _td(cell: str) -> str:
    cls = ' class="n"' if _NUMERIC.match(cell) else ""
    return f"<td{cls}>{html.escape(cell)}</td>"


def _block_html(b: Block) -> str:
    if isinstance(b, Heading):
        anchor = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
        return f"<h{b.level}{anchor}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        cls = ' class="note"' if b.note else ""
        text = "".join(f"<code>{html.escape(p.text)}</code>" if isinstance(p, Code) else html.escape(p)
                       for p in b.parts)
        return f"<p{cls}>{text}</p>"
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in b.rows)
        thead = f"<thead><tr>{head}</tr></thead>" if any(b.header) else ""  # a key/value table has none
        return f"<table>{thead}<tbody>{body}</tbody></table>"
    if isinstance(b, Image):
        src = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{html.escape(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="{src}" alt="{html.escape(b.alt)}">{cap}</figure>'
    if isinstance(b, CodeBlock):
        lang = f' class="language-{html.escape(b.lang)}"' if b.lang else ""
        return f"<pre><code{lang}>{html.escape(b.text)}</code></pre>"
    if isinstance(b, Toc):
        items = "".join(f'<li><a href="#{html.escape(a)}">{html.escape(t)}</a></li>' for a, t in b.entries)
        return f"<nav><ul>{items}</ul></nav>"
    raise TypeError(f"unknown block {b!r}")


def _md_text(text: str) -> str:
    """Markdown-safe text: HTML special characters as entities, markdown punctuation backslash-escaped."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*\[\]|#])", r"\\\1", " ".join(text.split("\n")))


def _md_code(text: str) -> str:
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(title: str, blocks: list[Block]) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the images it links to, as {file name: PNG bytes} for ``FILES_DIR``."""
    out, files = [f"# {_md_text(title)}", ""], {}
    for b in blocks:
        if isinstance(b, Image):
            name = f"{len(files) + 1:02d}_{_file_stem(b.name)}.png"
            files[name] = b.png
            out += [f"![{_md_text(b.alt)}]({FILES_DIR}/{name})", ""]
            if b.caption:
                out += [f"*{_md_text(b.caption)}*", ""]
        else:
            out += [_block_md(b), ""]
    return "\n".join(out).rstrip() + "\n", files


def _block_md(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {_md_text(b.text)}"
    if isinstance(b, Para):
        text = "".join(_md_code(p.text) if isinstance(p, Code) else _md_text(p) for p in b.parts)
        return f"> **Note:** {text}" if b.note else text
    if isinstance(b, Table):
        numeric = [bool(b.rows) and all(_NUMERIC.match(r[i]) for r in b.rows if i < len(r))
                   for i in range(len(b.header))]
        lines = ["| " + " | ".join(_md_text(h) or " " for h in b.header) + " |",
                 "|" + "|".join(" ---: " if n else " --- " for n in numeric) + "|"]
        lines += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in b.rows]
        return "\n".join(lines)
    if isinstance(b, CodeBlock):
        fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", b.text)), default=0) + 1)
        return f"{fence}{b.lang}\n{b.text}\n{fence}"
    if isinstance(b, Toc):
        return "\n".join(f"- [{_md_text(t)}](#{a})" for a, t in b.entries)
    raise TypeError(f"unknown block {b!r}")


def commit(run_dir: Path, html_text: str, md_text: str, files: dict[str, bytes]) -> tuple[Path, Path]:
    """Write to temporary names, then rename into place (report_files/ first, report.html last)."""
    html_path, md_path, files_dir = run_dir / "report.html", run_dir / "report.md", run_dir / FILES_DIR
    tmp_html, tmp_md = run_dir / ".report.html.tmp", run_dir / ".report.md.tmp"
    tmp_dir, old_dir = run_dir / ".report_files.tmp", run_dir / ".report_files.old"
    try:
        for d in (tmp_dir, old_dir):
            if d.exists():
                shutil.rmtree(d)
        tmp_dir.mkdir()
        for name, data in files.items():
            (tmp_dir / name).write_bytes(data)
        tmp_md.write_text(md_text, encoding="utf-8")
        tmp_html.write_text(html_text, encoding="utf-8")
        if files_dir.is_dir():
            files_dir.rename(old_dir)
        tmp_dir.rename(files_dir)
        os.replace(tmp_md, md_path)
        os.replace(tmp_html, html_path)
    except OSError as exc:
        if old_dir.is_dir() and not files_dir.exists():
            old_dir.rename(files_dir)  # put the previous report's images back
        for p in (tmp_html, tmp_md):
            p.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise HuscfError(f"cannot write the report into {run_dir}: {one_line(exc)}") from None
    shutil.rmtree(old_dir, ignore_errors=True)
    return html_path, md_path

