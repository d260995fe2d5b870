"""audit.html: one self-contained page (thumbnails embedded as JPEG data) that shows what the
audit found, each finding with what it should be compared with: each class's typical images
once, above the label suspects and the outliers; a pair of copies side by side. The first
``SHOWN`` of each kind; the outliers past the first ``OUTLIERS_OPEN`` folded; audit.csv has them all."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np

from transferkit._io import write_text
from transferkit.audit.checks import DISTINCT_FLOOR
from transferkit.audit.findings import AuditResult, Finding
from transferkit.reporting.html import html_page

SHOWN = 60
"""Findings of each kind drawn: what a person checks by eye before reaching for audit.csv."""
TYPICAL = 3
"""Typical images shown per class: its images whose given label the out-of-sample model is surest of."""
THUMB, SMALL = 128, 72

KIND_TEXT = {
    "label_issue": "label issues: confident learning doubts the given label",
    "label_conflict": "copies filed under two classes: one label cannot be right",
    "leakage": "copies in two splits: validation or test scores flatter",
    "near_duplicate": "copies within one split",
    "outlier": "far from every class",
}


class Thumbnails:
    """Each file's thumbnail as a data URI, made once per size."""

    def __init__(self) -> None:
        self.made: dict[tuple[str, int], str] = {}

    def img(self, path: str, size: int = THUMB, alt: str = "") -> str:
        key = (path, size)
        if key not in self.made:
            self.made[key] = self._encode(path, size)
        uri = self.made[key]
        if not uri:
            return f'<span class="muted">({html.escape(alt or "image")} unreadable now)</span>'
        return f'<img src="{uri}" alt="{html.escape(alt)}" title="{html.escape(path)}">'

    @staticmethod
    def _encode(path: str, size: int) -> str:
        from transferkit.data.images import UnreadableImage, load_image

        try:
            image = load_image(path, min_side=size)
        except UnreadableImage:  # changed since the audit read it
            return ""
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _typical(result: AuditResult) -> dict[int, list[str]]:
    """Per class, the images whose given label has the highest out-of-sample probability."""
    images = result.images
    typical: dict[int, list[str]] = {}
    for label in range(len(result.classes)):
        members = np.flatnonzero(images.labels == label)
        best = members[np.argsort(-images.label_quality[members], kind="stable")[:TYPICAL]]
        typical[label] = [images.paths[i] for i in best]
    return typical


def _strip(thumbs: Thumbnails, paths: list[str], alt: str) -> str:
    return '<div class="strip">' + "".join(thumbs.img(p, SMALL, alt) for p in paths) + "</div>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table class=\"findings\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _where(finding: Finding, paired: bool = False) -> str:
    path, split, label = ((finding.paired_path, finding.paired_split, finding.paired_label) if paired
                          else (finding.path, finding.split, finding.label))
    return f'<b>{html.escape(label)}</b>, {html.escape(split)}<div class="path">{html.escape(path)}</div>'


LABEL_QUALITY = (
    "Label quality is the probability that a model which never saw the image gives it its label: near 1, "
    "the image looks like the rest of its class; near 0, it looks like another class, so its label may be wrong "
    "(or the photo is unusual)."
)


def _typical_strip(result: AuditResult, thumbs: Thumbnails, typical: dict[int, list[str]], names: list[str]) -> str:
    """Each named class's typical images, once, for the rows below to be compared with."""
    index = {name: k for k, name in enumerate(result.classes)}
    rows = [[f"<b>{html.escape(name)}</b>", _strip(thumbs, typical[index[name]], f"typical {name}")]
            for name in dict.fromkeys(names)]
    return '<p class="muted">Typical images of each class, to compare with:</p>' + _table(["class", "typical images"], rows)


def _label_section(result: AuditResult, thumbs: Thumbnails, typical: dict[int, list[str]]) -> str:
    findings = result.of_kind("label_issue")
    rows = [
        [thumbs.img(f.path, alt=f"suspect {f.label}"), _where(f), f"{f.score:.3f}",
         f"<b>{html.escape(f.suggested_label)}</b>"]
        for f in findings[:SHOWN]
    ]
    shown = [name for f in findings[:SHOWN] for name in (f.label, f.suggested_label)]
    table = (f'<p class="note" id="label_quality">{html.escape(LABEL_QUALITY)}</p>'
             + _typical_strip(result, thumbs, typical, shown)
             + _table(["image", "given label, split, file", "label quality (0 to 1, lower is worse)",
                       "suggested label"], rows))
    return _section("label_issues", "Label issues", findings, table)


def _pair_section(result: AuditResult, thumbs: Thumbnails) -> str:
    findings = [f for f in result.findings if f.paired_path]
    rows = [
        [html.escape(f.kind.replace("_", " ")) + (" (identical bytes)" if f.identical else ""), f"{f.score:.3f}",
         thumbs.img(f.path, alt="copy"), _where(f), thumbs.img(f.paired_path, alt="original"), _where(f, paired=True)]
        for f in findings[:SHOWN]
    ]
    table = _table(["kind", "cosine similarity", "copy", "", "paired with", ""], rows)
    return _section("duplicates", "Near-duplicates and leakage", findings, table)


OUTLIERS_OPEN = 8
"""Outliers shown open, the most unusual first; the rest of the list is folded. The scores fall
smoothly, with no gap to cut at (hymenoptera, tf_flowers); hymenoptera's first 8 of 21 held its
real finds (a caterpillar under ants, honeycomb and hive boxes under bees), the rest mostly swarms
and distant shots."""


def _outlier_rows(findings: list[Finding], thumbs: Thumbnails) -> str:
    return _table(["image", "label, split, file", "outlier score"],
                  [[thumbs.img(f.path, alt=f"outlier {f.label}"), _where(f), f"{f.score:.3f}"] for f in findings])


def _outlier_section(result: AuditResult, thumbs: Thumbnails, typical: dict[int, list[str]]) -> str:
    findings = result.of_kind("outlier")
    if not findings:
        return _section("outliers", "Outliers", findings, "")
    median = float(np.median(result.images.outlier_score))
    said = (f"The outlier score is how far an image's features lie from the average of the nearest class "
            f"(cosine distance: 0 is the class's typical look; the median image here scores {median:.3f}). "
            f"Images from {result.summary.get('outlier_cut', 0):.3f} (above three quarters of the scores by 1.5 "
            "times their middle half's spread) are listed, the most unusual first; further down the list they "
            "stand out less, often a crowd or a distant shot. Look for another subject, or a view the classes "
            "rarely show.")
    shown = findings[:SHOWN]
    opened, folded = shown[:OUTLIERS_OPEN], shown[OUTLIERS_OPEN:]
    body = (f'<p class="note" id="outlier_score">{html.escape(said)}</p>'
            + _typical_strip(result, thumbs, typical, [f.label for f in opened]) + _outlier_rows(opened, thumbs))
    if folded:
        body += (f'<details id="more_outliers"><summary>{len(folded)} more, less unusual</summary>'
                 f"{_outlier_rows(folded, thumbs)}</details>")
    return _section("outliers", "Outliers", findings, body)


def _section(anchor: str, title: str, findings: list[Any], table: str) -> str:
    if not findings:
        return f'<h2 id="{anchor}">{title}</h2><p>None found.</p>'
    more = f" The first {SHOWN} are shown; audit.csv lists all {len(findings)}." if len(findings) > SHOWN else ""
    return f'<h2 id="{anchor}">{title} ({len(findings)})</h2><p class="muted">{more}</p>{table}'


def _health_section(result: AuditResult) -> str:
    splits = sorted({s for h in result.health for s in h.images}, key=lambda s: ("train", "val", "test").index(s)
                    if s in ("train", "val", "test") else 3)
    rows = [
        [html.escape(h.name), *(str(h.images.get(s, 0)) for s in splits), f"{h.share:.1%}", f"{h.noise_rate:.1%}",
         str(h.label_issues), '<span class="bad">' + html.escape("; ".join(h.problems)) + "</span>"]
        for h in result.health
    ]
    ratio = result.summary["imbalance_ratio"]
    return (f'<h2 id="classes">Class health</h2><p>Largest class over smallest: {ratio:.2f}.</p>'
            + _table(["class", *splits, "share", "estimated label noise", "label issues", "problems"], rows))


def write_page(result: AuditResult) -> None:
    """Write ``result.html_file``."""
    thumbs = Thumbnails()
    typical = _typical(result)
    counts = result.summary["counts"]
    overview = _table(["finding", "count"], [[html.escape(text), str(counts[kind])] for kind, text in KIND_TEXT.items()])
    title = f"transferkit audit: {result.summary['data']}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p>{html.escape(result.line())}. Model {html.escape(result.summary["model"])}; '
        f'near-copies from cosine similarity {result.summary["duplicate_threshold"]}, or from {DISTINCT_FLOOR} for two '
        "images each other's distinctly nearest. Nothing was moved or deleted: "
        "filter audit.csv and train with <code>--exclude</code> to leave images out.</p>",
        '<h2 id="summary">Summary</h2>' + overview,
        _health_section(result),
        _label_section(result, thumbs, typical),
        _pair_section(result, thumbs),
        _outlier_section(result, thumbs, typical),
    ]
    write_text(result.html_file, html_page(title, "".join(body)))
