"""InfluenceExplorer: pick a test prompt, scrub through the iterations, watch the top training examples change.

    from sdi_widgets import InfluenceExplorer
    explorer = InfluenceExplorer(result, train_texts=train.texts(), query_texts=queries.texts(), k=10)
    display(explorer)            # or leave `explorer` as the last line of a cell
    explorer.save_html("explorer.html")   # the same explorer as one self-contained page

Built from core ipywidgets only (7.7 to 8.x), so it runs in JupyterLab, Notebook 7, VS Code and Colab
without enabling anything. It never computes gradients: every ranking is precomputed by
:class:`~sdi_widgets.data.ExplorerData`, and a slider move only re-renders a k-row HTML table and one
blitted matplotlib frame.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Sequence

import ipywidgets as widgets
import numpy as np
import torch

from sdi.results import InfluenceResult

from .data import ExplorerData, Ranking
from .figure import DOWN, GREEN, RED, UP, StepFigure, diverging_colors, rank_colors
from .static import render_html, write_atomic

MONO = "font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace"


class InfluenceExplorer(widgets.VBox):
    """An ipywidgets explorer of an influence result; ``display(explorer)`` shows it.

    Arguments (the optional extras are described in :class:`~sdi_widgets.ExplorerData`;
    :func:`~sdi_widgets.inputs.explorer_inputs` computes all of them for a LoopedGPT)::

        result:        an sdi.InfluenceResult (sdi (N, Q, T)) or the path of a saved one (.npz)
        train_texts:   N readable training examples; query_texts: Q readable queries
        k:             how many training examples each ranking shows (1 <= k <= N)
        train_labels, flipped, query_answers, query_truth: optional extras

    Controls (public, so notebooks and tests can drive them): ``filter`` (Text), ``query`` (Dropdown of
    query indices), ``step`` (IntSlider over iterations ``t = 1..T``), ``play`` (Play), ``sign``
    (ToggleButtons: "proponents"/"opponents") and ``checkpoint`` (Dropdown of views; hidden unless the
    result kept more than one checkpoint). Outputs: ``answers``, ``table``, ``heatmap`` (HTML) and ``plot`` (Image).
    """

    def __init__(
        self,
        result: InfluenceResult | str | os.PathLike,
        train_texts: Sequence[str],
        query_texts: Sequence[str],
        k: int = 10,
        *,
        train_labels: Sequence[str] | None = None,
        flipped: Sequence[int] | torch.Tensor | None = None,
        query_answers: Sequence[Sequence[str]] | None = None,
        query_truth: Sequence[str] | None = None,
        max_heat_rows: int = 24,
    ) -> None:
        data = ExplorerData(result, train_texts, query_texts, k, train_labels=train_labels, flipped=flipped,
                            query_answers=query_answers, query_truth=query_truth)
        if not isinstance(max_heat_rows, int) or max_heat_rows < 1:
            raise ValueError(f"max_heat_rows must be a positive int, got {max_heat_rows!r}")
        self.data = data
        self.max_heat_rows = max_heat_rows
        T = data.n_steps
        self._labels = [data.query_label(q) for q in range(data.n_query)]
        self.filter = widgets.Text(placeholder="filter prompts…", description="prompt",
                                   layout=widgets.Layout(width="220px"))
        self.query = widgets.Dropdown(options=self._query_options(""), value=0,
                                      layout=widgets.Layout(width="440px"))
        self.checkpoint = widgets.Dropdown(options=[(n, v) for v, n in enumerate(data.view_names)], value=0,
                                           description="weights", layout=widgets.Layout(width="260px"))
        self.play = widgets.Play(value=1, min=1, max=T, interval=700, description="play")
        self.step = widgets.IntSlider(value=1, min=1, max=T, description="iteration t", continuous_update=True,
                                      layout=widgets.Layout(width="420px"))
        widgets.jslink((self.play, "value"), (self.step, "value"))
        self.sign = widgets.ToggleButtons(options=[("▲ proponents", "proponents"), ("▼ opponents", "opponents")],
                                          value="proponents", style={"button_width": "110px"})
        self.answers = widgets.HTML()
        self.table = widgets.HTML()
        self.plot = widgets.Image(format="png", layout=widgets.Layout(width="470px"))
        self.heatmap = widgets.HTML(layout=widgets.Layout(width="470px"))
        self._figure = StepFigure(k, T)

        picker = widgets.HBox([self.filter, self.query] + ([self.checkpoint] if data.n_views > 1 else []))
        scrubber = widgets.HBox([self.play, self.step, self.sign])
        plots = widgets.VBox([self.plot, self.heatmap], layout=widgets.Layout(margin="0 0 0 14px"))
        # wraps the plots under the table where the page is narrow (a book column, a split notebook)
        body = widgets.HBox([self.table, plots], layout=widgets.Layout(align_items="flex-start", flex_flow="row wrap"))
        super().__init__(children=[picker, self.answers, scrubber, body])

        self.filter.observe(self._on_filter, names="value")
        for control in (self.query, self.sign, self.checkpoint):
            control.observe(self._on_view, names="value")
        self.step.observe(self._on_step, names="value")
        self._render_query()
        self._render_step()

    # -- state ---------------------------------------------------------------------------------------
    @property
    def current(self) -> tuple[int, int, int, str]:
        """(view, query, 0-based step, sign) on display."""
        return self.checkpoint.value, self.query.value, self.step.value - 1, self.sign.value

    def ranking(self) -> Ranking:
        """The ranking on display."""
        return self.data.ranking(*self.current)

    def save_html(self, path: str | os.PathLike, title: str = "Step-resolved influence explorer") -> Path:
        """Write the explorer, opened at the current query, step, sign and weights, as one self-contained HTML file."""
        view, query, step, sign = self.current
        page = render_html(self.data, title=title,
                           initial={"view": view, "query": query, "step": step, "sign": sign})
        return write_atomic(path, page)

    # -- events --------------------------------------------------------------------------------------
    def _query_options(self, text: str) -> list[tuple[str, int]]:
        needle = text.strip().lower()
        return [(label, q) for q, label in enumerate(self._labels) if needle in label.lower()]

    def _on_filter(self, change) -> None:
        options = self._query_options(change["new"])
        current = self.query.value
        if not options:  # keep showing the last query; an empty list would leave nothing selected
            self.filter.description = "no match"
            return
        self.filter.description = "prompt"
        choice = current if current in [q for _, q in options] else options[0][1]
        # Replacing the options makes the dropdown select its first one for a moment: render once, at the end.
        self.query.unobserve(self._on_view, names="value")
        try:
            self.query.options = options
            self.query.value = choice
        finally:
            self.query.observe(self._on_view, names="value")
        if choice != current:
            self._render_query()
            self._render_step()

    def _on_view(self, change) -> None:
        if change["new"] is None:
            return
        self._render_query()
        self._render_step()

    def _on_step(self, change) -> None:
        # jslink syncs the two in a browser; this keeps them equal when the slider is set from Python
        if self.play.value != change["new"]:
            self.play.value = change["new"]
        self._render_step()

    # -- rendering -----------------------------------------------------------------------------------
    def _render_query(self) -> None:
        """Everything that depends on (view, query, sign) but not on the step: figure background, heat-map cells."""
        view, query, _, sign = self.current
        union = torch.unique(self.data.top_indices(view, query, sign)).tolist()
        scores = self.data.scores(view, query).numpy()
        tracin = self.data.tracin(view, query).numpy()
        self._figure.set_query(scores, tracin, union, sign, f"SDI$_t$ of the current top-{self.data.k}, query {query}",
                               key=(view, query, sign))
        rows = self.data.heat_rows(view, query, sign, self.max_heat_rows)
        self._heat = HeatRows(rows, scores[rows], self.data)

    def _render_step(self) -> None:
        view, query, step, sign = self.current
        ranking = self.data.ranking(view, query, step, sign)
        idx = ranking.indices
        scores = self.data.scores(view, query)
        tracin = self.data.tracin(view, query)
        self.table.value = table_html(self.data, ranking, tracin[idx], sign, step)
        self.answers.value = answers_html(self.data, query, step)
        self.heatmap.value = self._heat.html(step, set(idx.tolist()), sign)
        self.plot.value = self._figure.frame(step, scores[idx].numpy(), tracin[idx].numpy())


# ---------------------------------------------------------------------------------------------- HTML

def table_html(data: ExplorerData, ranking: Ranking, tracin: torch.Tensor, sign: str, step: int) -> str:
    """The top-k table: rank, movement, colour key, train index, text, label, SDI_t (with a bar), TracIn."""
    colors = rank_colors(data.k, sign)
    scale = float(ranking.scores.abs().max()) or 1.0
    bar_color = GREEN if sign == "proponents" else RED
    head = "".join(f'<th style="text-align:{a};padding:2px 6px;border-bottom:1px solid #ccc">{h}</th>'
                   for h, a in (("#", "right"), ("move", "left"), ("", "left"), ("train", "right"),
                                ("prompt", "left"), ("answer", "left"), (f"SDI<sub>{step + 1}</sub>", "right"),
                                ("TracIn", "right")))
    rows = []
    for r, (i, score, prev, move, total) in enumerate(zip(ranking.indices.tolist(), ranking.scores.tolist(),
                                                          ranking.prev_ranks.tolist(), ranking.movement.tolist(),
                                                          tracin.tolist())):
        label = data.train_labels[i] if data.train_labels is not None else ""
        flag = (' <span title="label flipped (corrupted) on purpose" style="color:#b35806;font-weight:bold">'
                '⚑ flipped</span>') if i in data.flipped else ""
        width = 100 * abs(score) / scale
        bar = (f'<div style="display:inline-block;width:48px;height:8px;background:#eee;vertical-align:middle;'
               f'margin-right:4px"><div style="width:{width:.0f}%;height:8px;background:{bar_color}"></div></div>')
        rows.append(
            f'<tr data-train-index="{i}" data-rank="{r + 1}" data-prev-rank="{prev}">'
            f'<td style="text-align:right;padding:1px 6px;color:#666">{r + 1}</td>'
            f'<td style="padding:1px 6px">{movement_html(prev, move, data.k)}</td>'
            f'<td><span style="display:inline-block;width:10px;height:10px;background:{colors[r]}"></span></td>'
            f'<td style="text-align:right;padding:1px 6px;color:#666">{i}</td>'
            f'<td style="padding:1px 6px;{MONO};white-space:pre">{html.escape(data.train_texts[i])}</td>'
            f'<td style="padding:1px 6px;{MONO};font-weight:bold">{html.escape(label)}{flag}</td>'
            f'<td style="text-align:right;padding:1px 6px;white-space:nowrap">{bar}{score:+.3g}</td>'
            f'<td style="text-align:right;padding:1px 6px;color:#555">{total:+.3g}</td></tr>')
    title = "proponents (push the query's loss down)" if sign == "proponents" else \
        "opponents (push the query's loss up)"
    return (f'<div style="font-size:12px"><div style="margin:2px 0 4px 0;color:#333"><b>Top {data.k} {title}</b>'
            f' at iteration t = {step + 1}</div><table style="border-collapse:collapse">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def movement_html(prev: int, move: int, k: int) -> str:
    """Rank movement since the previous iteration: ▲n, ▼n, = or new (with the previous rank)."""
    if prev == 0:
        return '<span style="color:#999">·</span>'
    if prev > k:
        return f'<span style="color:{UP}" title="rank {prev} at the previous iteration">★ new <small>({prev})</small></span>'
    if move > 0:
        return f'<span style="color:{UP}">▲{move}</span>'
    if move < 0:
        return f'<span style="color:{DOWN}">▼{-move}</span>'
    return '<span style="color:#999">=</span>'


def answers_html(data: ExplorerData, query: int, step: int) -> str:
    """The query, its right answer, and the model's answer after every iteration (current one outlined)."""
    text = html.escape(data.query_texts[query])
    parts = [f'<span style="{MONO};font-size:13px;font-weight:bold">{text}</span>']
    if data.query_truth is not None:
        parts.append(f'<span style="color:#555">right answer <b style="{MONO}">'
                     f'{html.escape(data.query_truth[query])}</b></span>')
    losses = data.result.query_losses
    if isinstance(losses, torch.Tensor) and losses.dim() == 2 and losses.shape[1] == data.n_query \
            and torch.isfinite(losses[-1, query]):
        parts.append(f'<span style="color:#555">loss {float(losses[-1, query]):.3g}</span>')
    cells = ""
    if data.query_answers is not None:
        for t in range(data.n_steps):
            right = data.is_right(query, t)
            bg = {True: "#d9f0d3", False: "#f4cccc", None: "#eeeeee"}[right]
            mark = {True: "✓", False: "✗", None: ""}[right]
            border = "2px solid #222" if t == step else "1px solid #ccc"
            cells += (f'<span data-step="{t + 1}" title="iteration {t + 1}" style="display:inline-block;'
                      f'min-width:26px;text-align:center;margin:1px;padding:0 2px;background:{bg};border:{border};'
                      f'{MONO};font-size:11px"><small style="color:#777">{t + 1}</small> '
                      f'{html.escape(data.query_answers[query][t])}{mark}</span>')
        cells = f'<div style="margin-top:2px"><span style="color:#555;font-size:11px">answer after each iteration: </span>{cells}</div>'
    return f'<div style="font-size:12px;margin:4px 0">{" · ".join(parts)}{cells}</div>'


class HeatRows:
    """The train-example x iteration heat map of one (view, query, sign) as HTML; cells are coloured once.

    rows: training indices (the examples that reach the top-k, in order of first appearance);
    values: (R, T) their SDI_t. Only the current-iteration outline and the top-k markers change per step.
    """

    def __init__(self, rows: Sequence[int], values: np.ndarray, data: ExplorerData) -> None:
        self.rows = list(rows)
        vmax = float(np.abs(values).max()) if values.size else 1.0
        colors = diverging_colors(values, vmax)
        self.cells = [[f'background:{c}" title="#{i} t={t + 1}: {v:+.3g}' for t, (c, v) in enumerate(zip(crow, vrow))]
                      for i, crow, vrow in zip(self.rows, colors, values.tolist())]
        self.labels = [html.escape(_short(data.train_texts[i], 16)) for i in self.rows]
        self.k, self.n_steps = data.k, data.n_steps

    def html(self, step: int, current: set[int], sign: str) -> str:
        width = max(8, min(24, 300 // self.n_steps))
        head = "".join(f'<th style="font-weight:{"bold" if t == step else "normal"};color:#555;font-size:9px;'
                       f'width:{width}px">{t + 1}</th>' for t in range(self.n_steps))
        now = "box-shadow:inset 2px 0 #111,inset -2px 0 #111;"
        body = []
        for i, label, cells in zip(self.rows, self.labels, self.cells):
            mark = "▸" if i in current else ""
            tds = "".join(f'<td style="{now if t == step else ""}height:10px;padding:0;{c}"></td>'
                          for t, c in enumerate(cells))
            body.append(f'<tr data-train-index="{i}"><td style="{MONO};font-size:10px;text-align:right;'
                        f'padding:0 4px;white-space:pre;line-height:10px">{label}</td>'
                        f'<td style="width:8px;padding:0;font-size:10px;line-height:10px">{mark}</td>{tds}</tr>')
        return (f'<div style="font-size:12px;margin-top:4px"><div style="color:#333">SDI<sub>t</sub> of the examples '
                f'that reach the top-{self.k} ({sign}); ▸ = in the top-{self.k} now</div>'
                f'<table style="border-collapse:collapse;margin-top:2px"><thead><tr><th></th><th></th>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>')


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
