"""Small HTML building blocks for the reports: escaped tables, figures, sections, one page."""

import html
import os
from typing import Iterable, Sequence

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.ok { color: #137333; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.muted { color: #777; } figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 520px; border: 1px solid #ddd; } figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; } .cols > div { flex: 1; min-width: 420px; }
"""


def esc(x) -> str:
  return html.escape(str(x))


def fmt(x, digits: int = 3) -> str:
  """Numbers for people: None -> 'n/a', floats rounded, the rest as text."""
  if x is None:
    return "n/a"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def fmt_ci(value, ci, digits: int = 3) -> str:
  if value is None:
    return "n/a"
  if not ci or ci[0] is None:
    return fmt(value, digits)
  return f"{fmt(value, digits)} [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def table(header: Sequence[str], rows: Iterable[Sequence], left_cols: int = 1) -> str:
  def cell(tag, i, v):
    cls = ' class="l"' if i < left_cols else ""
    return f"<{tag}{cls}>{v}</{tag}>"
  head = "".join(cell("th", i, esc(h)) for i, h in enumerate(header))
  body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
                 for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def figure(src: str, caption: str) -> str:
  return f'<figure><img src="{esc(src)}" alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def section(title: str, body: str) -> str:
  return f"<h2>{esc(title)}</h2>\n{body}\n"


def verdict(ok, yes: str, no: str) -> str:
  if ok is None:
    return '<span class="muted">n/a</span>'
  return f'<span class="ok">{esc(yes)}</span>' if ok else f'<span class="bad">{esc(no)}</span>'


def page(title: str, subtitle: str, body: str) -> str:
  return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
          f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
          f"<p class='muted'>{esc(subtitle)}</p>{body}</body></html>\n")


def referenced_files(html_text: str) -> list[str]:
  """Every src/href target of a page (used by tests to check a report has nothing missing)."""
  import re
  return re.findall(r'(?:src|href)="([^"#:]+)"', html_text)


def relpath(path: str, start: str) -> str:
  return os.path.relpath(path, start).replace(os.sep, "/")
