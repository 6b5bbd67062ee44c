"""How the explorer looks, shared by the widget and the static page: colours, one stylesheet, the SVG plot.

Everything is vector (SVG inside HTML) and theme-aware: text takes the front end's colour (JupyterLab's and
VS Code's CSS variables where they exist, else the inherited colour), backgrounds are transparent, and the few
accent colours are mid-tones readable on white and on dark backgrounds alike (brighter ones where a dark theme
announces itself). No binary image messages, no JavaScript: hovering a table row highlights its line and
bar, and hovering a line highlights its row, by CSS alone (``:has``), so it also works in a kernel-less
snapshot of the widget.

Rows and lines are linked by rank class ``sdi-r{r}`` (0-based position in the current top-k) on the table
row, the trajectory, its current-iteration dot, its TracIn bar and its legend entry.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from .data import ExplorerData

# Sign colours (bars, switch, heat map) and rank movement, chosen for >= 3:1 on white and on #1e1e1e.
GREEN, RED = "#2e8b45", "#d6404f"   # proponents, opponents
UP, DOWN = "#3a7fc2", "#888888"      # rank movement: blue up, grey down (green/red already mean the sign)
FLIP = "#c0620a"
_LINE_ENDS = {"proponents": ((0x1b, 0x78, 0x37), (0x4a, 0xa3, 0x5c)),
              "opponents": ((0xc9, 0x30, 0x3f), (0xe0, 0x60, 0x6a))}
_HEAT_ENDS = {"proponents": (46, 160, 67), "opponents": (218, 54, 51)}


def rank_colors(k: int, sign: str) -> list[str]:
    """k hex colours, strongest first, all mid-tones (>= 3:1 against white and against #1e1e1e)."""
    dark, light = (np.array(c, dtype=float) for c in _LINE_ENDS[sign])
    return ["#%02x%02x%02x" % tuple(np.rint(dark + (light - dark) * (r / max(1, k - 1))).astype(int))
            for r in range(k)]


def diverging_colors(values: np.ndarray, vmax: float) -> np.ndarray:
    """CSS colours for ``values`` in [-vmax, vmax] (any shape): green (+) or red (-), opacity = ``|value| / vmax``.

    Zero is transparent, so the map sits on the page's own background in light and dark themes alike.
    """
    u = np.clip(np.asarray(values, dtype=np.float64) / (vmax or 1.0), -1, 1)
    pos, neg = (f"{r},{g},{b}" for r, g, b in (_HEAT_ENDS["proponents"], _HEAT_ENDS["opponents"]))
    return np.vectorize(lambda x: f"rgba({pos if x >= 0 else neg},{abs(x):.2f})")(u)


def explorer_css(scope: str = ".sdi-x", max_k: int = 64) -> str:
    """The stylesheet of one explorer root (``scope``): theme colours, fixed table, linked hover."""
    hover = []
    for r in range(max_k):
        c = f".sdi-r{r}"
        on = f"{scope}:has({c}:hover)"
        hover.append(f"{on} .sdi-line:not({c}){{opacity:.15}}{on} polyline{c}{{stroke-width:3.4}}"
                     f"{on} tr{c}>td{{background:var(--sdi-hover)}}{on} text{c}{{font-weight:bold}}")
    dark = ", ".join(f"{m} {scope}" for m in ('[data-jp-theme-light="false"]', ".vscode-dark",
                                             ".vscode-high-contrast", '[data-theme="dark"]', '[theme="dark"]'))
    return f"""
{scope} {{ --sdi-muted: var(--jp-ui-font-color2, var(--vscode-descriptionForeground, var(--pst-color-text-muted)));
  --sdi-line: rgba(128,128,128,.5); --sdi-hover: rgba(128,128,128,.2); --sdi-track: rgba(128,128,128,.25);
  --sdi-up: {UP}; --sdi-down: {DOWN}; --sdi-flip: {FLIP}; --sdi-right: rgba(46,160,67,.3);
  --sdi-wrong: rgba(218,54,51,.3); --sdi-green: {GREEN}; --sdi-red: {RED};
  color: var(--jp-content-font-color1, var(--vscode-editor-foreground));
  font-family: var(--jp-ui-font-family, system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif);
  font-size: 12px; line-height: 1.35; }}
{dark} {{ --sdi-up: #6ea8e0; --sdi-flip: #e8903a; --sdi-down: #9a9a9a; }}
{scope} .mono {{ font-family: var(--jp-code-font-family, ui-monospace, SFMono-Regular, Menlo, Consolas,
  "DejaVu Sans Mono", "Liberation Mono", monospace); }}
{scope} .muted {{ color: var(--sdi-muted); }}
{scope} .caption {{ margin: 2px 0 4px 0; }}
{scope} .query {{ font-weight: 600; font-size: 13px; }}
{scope} .steps {{ margin-top: 3px; display: flex; flex-wrap: wrap; gap: 2px; align-items: center; }}
{scope} .steps .cell {{ display: inline-block; min-width: 28px; text-align: center; padding: 0 3px;
  border: 1px solid var(--sdi-line); font-size: 11px; }}
{scope} .steps .cell.right {{ background: var(--sdi-right); }}
{scope} .steps .cell.wrong {{ background: var(--sdi-wrong); }}
{scope} .steps .cell.current {{ outline: 2px solid currentColor; outline-offset: -1px; }}
{scope} .steps small {{ color: var(--sdi-muted); }}
{scope} table.sdi-top {{ border-collapse: collapse; table-layout: fixed; font-size: 12px; }}
{scope} table.sdi-top th {{ text-align: left; font-weight: 600; padding: 2px 6px;
  border-bottom: 1px solid var(--sdi-line); white-space: nowrap; overflow: hidden; }}
{scope} table.sdi-top td {{ padding: 1px 6px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
{scope} table.sdi-top .num {{ text-align: right; }}
{scope} table.sdi-top td.text {{ white-space: pre; }}
{scope} .up {{ color: var(--sdi-up); }} {scope} .down {{ color: var(--sdi-down); }}
{scope} .same, {scope} .first {{ color: var(--sdi-muted); }}
{scope} .flip {{ color: var(--sdi-flip); font-weight: 600; font-family: inherit; }}
{scope} .copies {{ color: var(--sdi-muted); font-family: inherit; }}
{scope} .swatch {{ display: inline-block; width: 14px; height: 3px; vertical-align: middle; }}
{scope} .sbar {{ display: inline-block; width: 44px; height: 8px; background: var(--sdi-track); margin-right: 4px;
  vertical-align: middle; }}
{scope} .sbar > span {{ display: block; height: 8px; }}
{scope} svg {{ display: block; overflow: visible; }}
{scope} svg text {{ font-size: 9px; fill: currentColor; }}
{scope} svg text.mono {{ font-size: 8.5px; }}
{scope} svg .axis {{ stroke: currentColor; stroke-width: .8; opacity: .75; fill: none; }}
{scope} svg .zero {{ stroke: currentColor; stroke-width: .6; opacity: .4; }}
{scope} svg .now {{ stroke: currentColor; stroke-width: 1; stroke-dasharray: 4 3; opacity: .8; fill: none; }}
{scope} svg .dot {{ fill: currentColor; }}
{scope} .heat td.cell {{ height: 10px; padding: 0; }}
{scope} .heat td.cur {{ box-shadow: inset 2px 0 currentColor, inset -2px 0 currentColor; }}
{scope} .sdi-snapshot {{ display: none; }}
.cell_output {scope} .sdi-snapshot {{ display: block; margin: 2px 0; padding: 2px 6px; border-left: 3px solid var(--sdi-up); }}
.cell_output {scope} .sdi-live {{ pointer-events: none; opacity: .55; }}
{"".join(hover)}
"""


def fmt(v: float) -> str:
    """Like ``f"{v:+.3g}"`` with a real minus sign (as the static page's ``fmt``)."""
    return f"{v:+.3g}".replace("-", "−")


def trajectory_svg(top_scores: np.ndarray, top_tracin: np.ndarray, indices: Sequence[int], labels: Sequence[str],
                   step: int, colors: Sequence[str], ylim: tuple[float, float], tlim: tuple[float, float],
                   title: str) -> str:
    """The plot of one iteration as an SVG string (``width`` 480 x ``height`` 220 CSS pixels).

    top_scores: (k, T) SDI_t trajectories of the current top-k, strongest first; top_tracin: (k,) their TracIn;
    indices, labels: their training indices and short texts (the legend); step: 0-based current iteration;
    ylim, tlim: fixed axis ranges (kept while scrubbing, so lines move and axes do not).
    """
    k, T = top_scores.shape
    L, R, TOP, B = 46, 270, 22, 186          # trajectory axes
    BL, BR = 282, 352                        # TracIn bars; the legend sits right of them, one entry per bar
    lo, hi = ylim
    tlo, thi = tlim

    def x(s: float) -> float:
        return L + (R - L) * (0.5 if T == 1 else s / (T - 1))

    def y(v: float) -> float:
        return B - (B - TOP) * (v - lo) / ((hi - lo) or 1.0)

    def bx(v: float) -> float:
        return BL + (BR - BL) * (v - tlo) / ((thi - tlo) or 1.0)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" data-role="trajectory" width="480" height="220" '
           f'viewBox="0 0 480 220" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{L}" y="11">{title}</text>',
           f'<text x="{BL}" y="11">TracIn = Σ<tspan baseline-shift="sub" font-size="7">t</tspan></text>',
           f'<line class="zero" x1="{L}" x2="{R}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>',
           f'<path class="axis" d="M{L},{TOP}V{B}H{R}"/>']
    for v in (lo, hi):
        out.append(f'<text x="{L - 4}" y="{y(v) + 3:.1f}" text-anchor="end">{fmt(v)}</text>')
    if min(y(0) - y(hi), y(lo) - y(0)) > 12:
        out.append(f'<text x="{L - 4}" y="{y(0) + 3:.1f}" text-anchor="end">0</text>')
    every = -(-T // 12)
    out += [f'<text x="{x(s):.1f}" y="{B + 12}" text-anchor="middle">{s + 1}</text>' for s in range(0, T, every)]
    out.append(f'<text x="{(L + R) / 2:.0f}" y="{B + 26}" text-anchor="middle">iteration t</text>')
    out.append(f'<line class="now" data-role="current-step" x1="{x(step):.1f}" x2="{x(step):.1f}" y1="{TOP}" y2="{B}"/>')
    bh = (B - TOP) / max(k, 1)
    for r in range(k - 1, -1, -1):  # the strongest drawn last, on top
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in enumerate(top_scores[r].tolist()))
        tip = html.escape(f"#{indices[r]} {labels[r]}  SDI_{step + 1} {fmt(float(top_scores[r, step]))}  "
                          f"TracIn {fmt(float(top_tracin[r]))}")
        out.append(f'<polyline class="sdi-line sdi-r{r}" data-train-index="{indices[r]}" points="{pts}" fill="none" '
                   f'stroke="{colors[r]}" stroke-width="1.6"><title>{tip}</title></polyline>')
        out.append(f'<circle class="sdi-line sdi-r{r} dot" cx="{x(step):.1f}" cy="{y(float(top_scores[r, step])):.1f}" '
                   f'r="2.4"/>')
    out.append(f'<line class="zero" x1="{bx(0):.1f}" x2="{bx(0):.1f}" y1="{TOP}" y2="{B}"/>')
    for r in range(k):
        v = float(top_tracin[r])
        ytop = TOP + r * bh
        tip = html.escape(f"#{indices[r]} {labels[r]}  TracIn {fmt(v)}")
        out.append(f'<rect class="sdi-line sdi-r{r}" x="{min(bx(0), bx(v)):.1f}" y="{ytop + 1:.1f}" '
                   f'width="{abs(bx(v) - bx(0)):.1f}" height="{bh * 0.72:.1f}" fill="{colors[r]}"><title>{tip}</title></rect>')
        out.append(f'<text class="sdi-r{r} mono" data-role="legend" x="{BR + 6}" y="{ytop + bh * 0.36 + 3:.1f}">'
                   f'<tspan fill="{colors[r]}">■</tspan> #{indices[r]} {html.escape(labels[r])}<title>{tip}</title></text>')
    out += [f'<text x="{BL}" y="{B + 12}">{fmt(tlo)}</text>',
            f'<text x="{BR}" y="{B + 12}" text-anchor="end">{fmt(thi)}</text>', "</svg>"]
    return "".join(out)


CHAR_PX = 7.4   # a 12 px monospace character, rounded up (DejaVu Sans Mono: 7.22)
MAX_TEXT = 40   # longer training texts are cut with an ellipsis (the full text is in the tooltip)


def column_widths(data: "ExplorerData") -> list[int]:
    """Pixel widths of the top-k table's 8 columns, fixed per explorer so scrubbing never changes the layout."""
    shown = data._shown.tolist()
    text = min(MAX_TEXT, max(len(data.train_text(i)) for i in shown))
    label = max((len(data.train_labels[i]) for i in shown), default=0) if data.train_labels is not None else 0
    flag = 62 if data.flipped else 0
    digits = len(str(data.n_train - 1))
    return [40, 84, 28, max(44, int(8 * digits + 14)), int(CHAR_PX * max(text, 6) + 14),
            int(max(CHAR_PX * max(label, 6) + 14 + flag, 54)), 126, 76]


def padded(lo: float, hi: float, frac: float) -> tuple[float, float]:
    """[lo, hi] widened to include 0 and padded by ``frac`` of its span."""
    lo, hi = min(0.0, lo), max(0.0, hi)
    pad = frac * ((hi - lo) or 1.0)
    return lo - pad, hi + pad
