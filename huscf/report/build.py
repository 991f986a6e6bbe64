"""``huscf report RUN_DIR``: report.html (self-contained, images inline) and report.md (images in report_files/).

Here the run (``run.py``) becomes the sections that apply, as neutral blocks (``sections.py``);
``render.py`` renders the blocks to HTML and Markdown (escaping every piece of text) and writes
both to temporary names, then renames them: a failure leaves no half-written report.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from huscf.report.render import Block, Heading, Toc, commit, para, render_html, render_markdown
from huscf.report.run import Run, load_run
from huscf.report.sections import SECTIONS


def build_blocks(run: Run) -> tuple[str, list[Block]]:
    """The title and the report's blocks: intro, table of contents, then every section that applies."""
    title = f"HuSCF-GAN run report: {run.config.get('name', run.path.name)}"
    toc = Toc()
    blocks: list[Block] = [para(f"Run directory {run.path}, report written "
                                f"{datetime.now().astimezone().isoformat(timespec='seconds')}."), toc]
    for name, body in filter(None, (make(run) for make in SECTIONS)):  # None: the section does not apply
        anchor = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "section"
        toc.entries.append((anchor, name))
        blocks.append(Heading(name, 2, anchor))
        blocks += body
    return title, blocks


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.html and RUN_DIR/report.md (+ RUN_DIR/report_files/); returns (html, md) paths.

    Raises HuscfError (one line) when config.yaml or metrics.jsonl is missing, a JSON file is broken, or
    the directory cannot be written; in every failure case no report file is left half-written.
    """
    run = load_run(Path(run_dir))
    title, blocks = build_blocks(run)
    return commit(run.path, render_html(title, blocks), *render_markdown(title, blocks))  # (md text, its images)
