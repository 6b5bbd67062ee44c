"""InfluenceExplorer: pick a test prompt, scrub through the iterations, watch the top training examples change.

    from sdi_widgets import InfluenceExplorer
    explorer = InfluenceExplorer(result, train_texts=train.texts(), query_texts=queries.texts(), k=10)
    display(explorer)            # or leave `explorer` as the last line of a cell
    explorer.save_html("explorer.html")   # the same explorer as one self-contained page

Built from core ipywidgets only (7.7 to 8.x) and nothing that front ends disagree on: no ``jslink`` and no
``Play`` widget (the play button is a ToggleButton whose loop runs in Python), no binary ``Image`` messages (the
plot is SVG inside an ``HTML`` widget), no JavaScript. So it runs the same in JupyterLab, Notebook 6/7, VS Code
and Colab (ipywidgets 7.7.1). It never computes gradients: every ranking is precomputed by
:class:`~sdi_widgets.data.ExplorerData`, and a slider move only re-renders a k-row HTML table and one SVG.

A kernel-less snapshot of the widget (a notebook saved with its widget state, as in the book) cannot follow
its slider; in a Jupyter Book page it says so and greys out its controls (``.cell_output`` CSS), and the
static export (:func:`~sdi_widgets.static.render_html`) is the interactive version without a kernel.

One front-end race to know of, in Notebook 6 with ipywidgets 7 (any widget, not only this one): cells run in the
first instant after the notebook opens, before its widget manager has asked the kernel which widgets exist, can
have their widgets built twice, and the view shows the copy that gets no updates (an empty table, a slider that
does not follow). Running the cell again fixes it; ``tests/test_explorer_ipywidgets7.py`` waits for the manager.
"""

from __future__ import annotations

import html
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import ipywidgets as widgets
import numpy as np
import torch

from sdi.results import InfluenceResult

from .data import ExplorerData, Ranking
from .figure import column_widths, diverging_colors, explorer_css, padded, rank_colors, trajectory_svg
from .static import render_html, write_atomic


class InfluenceExplorer(widgets.VBox):
    """An ipywidgets explorer of an influence result; ``display(explorer)`` shows it.

    Arguments (the optional extras are described in :class:`~sdi_widgets.ExplorerData`;
    :func:`~sdi_widgets.inputs.explorer_inputs` computes all of them for a LoopedGPT)::

        result:        an sdi.InfluenceResult (sdi (N, Q, T)) or the path of a saved one (.npz)
        train_texts:   N readable training examples; query_texts: Q readable queries
        k:             how many training examples each ranking shows (1 <= k <= N)
        train_labels, flipped, query_answers, query_truth: optional extras

    Controls (public, so notebooks and tests can drive them): ``filter`` (Text), ``query`` (Dropdown of
    query indices), ``step`` (IntSlider over iterations ``t = 1..T``), ``play`` (ToggleButton: while it is
    down a Python thread advances ``step`` every ``interval`` seconds and releases it at the last iteration),
    ``sign`` (ToggleButtons: "proponents"/"opponents") and ``checkpoint`` (Dropdown of views; hidden unless
    the result kept more than one checkpoint). Outputs (HTML): ``answers``, ``table``, ``plot`` (SVG), ``heatmap``.
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
        self.interval = 0.7  # seconds per iteration while playing
        T = data.n_steps
        self._labels = [data.query_label(q) for q in range(data.n_query)]
        self._widths = column_widths(data)
        self.filter = widgets.Text(placeholder="filter prompts…", description="prompt",
                                   layout=widgets.Layout(width="220px"))
        self.query = widgets.Dropdown(options=self._query_options(""), value=0,
                                      layout=widgets.Layout(width="440px"))
        self.checkpoint = widgets.Dropdown(options=[(n, v) for v, n in enumerate(data.view_names)], value=0,
                                           description="weights", layout=widgets.Layout(width="260px"))
        self.play = widgets.ToggleButton(value=False, description="▶ play", tooltip="play through the iterations",
                                         layout=widgets.Layout(width="90px"))
        self.step = widgets.IntSlider(value=1, min=1, max=T, description="iteration t", continuous_update=True,
                                      layout=widgets.Layout(width="420px"))
        self.sign = widgets.ToggleButtons(options=[("▲ proponents", "proponents"), ("▼ opponents", "opponents")],
                                          value="proponents", style={"button_width": "110px"})
        self.answers = widgets.HTML()
        self.note = widgets.HTML()   # shown only in a kernel-less snapshot (CSS)
        self.table = widgets.HTML(layout=widgets.Layout(width=f"{sum(self._widths) + 4}px"))
        self.plot = widgets.HTML(layout=widgets.Layout(width="480px"))
        self.heatmap = widgets.HTML(layout=widgets.Layout(width="480px"))
        # one stylesheet for the whole explorer: a <style> element inside an HTML widget applies in every front end
        style = widgets.HTML(f"<style>{explorer_css('.sdi-x', data.k)}</style>",
                             layout=widgets.Layout(height="0px", margin="0px", overflow="hidden"))

        picker = widgets.HBox([self.filter, self.query] + ([self.checkpoint] if data.n_views > 1 else []))
        scrubber = widgets.HBox([self.play, self.step, self.sign])
        for box in (picker, scrubber):
            box.add_class("sdi-live")
        plots = widgets.VBox([self.plot, self.heatmap], layout=widgets.Layout(margin="0 0 0 14px"))
        # the table has a fixed width: the plots stay beside it (or below, where the page is narrow) while scrubbing
        body = widgets.HBox([self.table, plots], layout=widgets.Layout(align_items="flex-start", flex_flow="row wrap"))
        super().__init__(children=[picker, self.answers, scrubber, self.note, body, style])
        self.add_class("sdi-x")

        self._lock = threading.RLock()   # the play thread and the kernel's own events both render
        self._player: threading.Thread | None = None
        self.filter.observe(self._on_filter, names="value")
        for control in (self.query, self.sign, self.checkpoint):
            control.observe(self._on_view, names="value")
        self.step.observe(self._on_step, names="value")
        self.play.observe(self._on_play, names="value")
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
            with self._lock:
                self._render_query()
                self._render_step()

    def _on_view(self, change) -> None:
        if change["new"] is None:
            return
        with self._lock:
            self._render_query()
            self._render_step()

    def _on_step(self, change) -> None:
        with self._lock:
            self._render_step()

    def _on_play(self, change) -> None:
        self.play.description = "❚❚ pause" if change["new"] else "▶ play"
        if not change["new"]:
            return  # the thread sees it and stops
        if self.step.value >= self.step.max:
            self.step.value = self.step.min
        if self._player is None or not self._player.is_alive():
            self._player = threading.Thread(target=self._play_loop, name="sdi-explorer-play", daemon=True)
            self._player.start()

    def _play_loop(self) -> None:
        """Advance one iteration every ``interval`` seconds while ``play`` is down; stop at the last one.

        A Python thread rather than the front end's ``Play`` + ``jslink``: widget updates from a thread are
        supported by every kernel front end (Colab's included), and the loop needs nothing from the browser.
        """
        while True:
            time.sleep(self.interval)
            with self._lock:
                if not self.play.value:
                    return
                if self.step.value < self.step.max:
                    self.step.value += 1
                if self.step.value >= self.step.max:
                    self.play.value = False
                    return

    # -- rendering -----------------------------------------------------------------------------------
    def _render_query(self) -> None:
        """Everything that depends on (view, query, sign) but not on the step: axis ranges, heat-map cells."""
        view, query, _, sign = self.current
        union = torch.unique(self.data.top_indices(view, query, sign)).tolist()
        scores = self.data.scores(view, query).numpy()
        tracin = self.data.tracin(view, query).numpy()
        self._ylim = padded(float(scores[union].min()), float(scores[union].max()), 0.06)
        self._tlim = padded(float(tracin[union].min()), float(tracin[union].max()), 0.08)
        rows = self.data.heat_rows(view, query, sign, self.max_heat_rows)
        self._heat = HeatRows(rows, scores[rows], self.data)

    def _render_step(self) -> None:
        view, query, step, sign = self.current
        ranking = self.data.ranking(view, query, step, sign)
        idx = ranking.indices
        scores = self.data.scores(view, query)
        tracin = self.data.tracin(view, query)
        k = len(idx)
        self.table.value = table_html(self.data, ranking, tracin[idx], sign, step, self._widths)
        self.answers.value = answers_html(self.data, query, step)
        self.note.value = ('<div class="sdi-snapshot muted">A snapshot of the live explorer at iteration '
                           f't = {step + 1}: without a running Python kernel its controls cannot update it. Run '
                           'the notebook to use it; the static explorer (<code>render_html</code>) works without '
                           'a kernel.</div>')
        self.heatmap.value = self._heat.html(step, set(idx.tolist()), sign)
        title = f'SDI<tspan baseline-shift="sub" font-size="7">t</tspan> of the current top-{k}, query {query}'
        self.plot.value = trajectory_svg(scores[idx].numpy(), tracin[idx].numpy(), idx.tolist(),
                                         [_short(self.data.train_text(i), 14) for i in idx.tolist()], step,
                                         rank_colors(k, sign), self._ylim, self._tlim, title)


# ---------------------------------------------------------------------------------------------- HTML

def table_html(data: ExplorerData, ranking: Ranking, tracin: torch.Tensor, sign: str, step: int,
               widths: Sequence[int] | None = None) -> str:
    """The top-k table: rank, movement, colour key, train index, text, label, SDI_t (with a bar), TracIn."""
    widths = widths or column_widths(data)
    colors = rank_colors(len(ranking.indices), sign)
    scale = float(ranking.scores.abs().max()) or 1.0
    bar = "var(--sdi-green)" if sign == "proponents" else "var(--sdi-red)"
    names = (("#", "num"), ("move", ""), ("", ""), ("train", "num"), ("prompt", ""), ("answer", ""),
             (f"SDI<sub>{step + 1}</sub>", "num"), ("TracIn", "num"))
    cols = "".join(f'<col style="width:{w}px">' for w in widths)
    head = "".join(f'<th class="{c}">{h}</th>' for h, c in names)
    ranks = ranking.ranks.tolist()
    rows = []
    for r, (i, score, rank, prev, move, total) in enumerate(zip(
            ranking.indices.tolist(), ranking.scores.tolist(), ranks, ranking.prev_ranks.tolist(),
            ranking.movement.tolist(), tracin.tolist())):
        label = html.escape(data.train_labels[i]) if data.train_labels is not None else ""
        flag = (' <span class="flip" title="label flipped (corrupted) on purpose">⚑ flipped</span>'
                if i in data.flipped else "")
        tied = ' title="tied"' if ranks.count(rank) > 1 else ""
        text = html.escape(data.train_texts[i])
        n = int(data.copies[i])
        copies = f' <span class="copies" title="{n} identical copies in the training data">×{n}</span>' if n > 1 else ""
        rows.append(
            f'<tr class="sdi-r{r}" data-train-index="{i}" data-rank="{rank}" data-prev-rank="{prev}">'
            f'<td class="num muted"{tied}>{rank}</td>'
            f'<td>{movement_html(prev, move, data.k)}</td>'
            f'<td><span class="swatch" style="background:{colors[r]}"></span></td>'
            f'<td class="num muted">{i}</td>'
            f'<td class="mono text" title="{text}">{text}{copies}</td>'
            f'<td class="mono"><b>{label}</b>{flag}</td>'
            f'<td class="num" data-role="score"><span class="sbar"><span style="width:{100 * abs(score) / scale:.0f}%;'
            f'background:{bar}"></span></span>{score:+.3g}</td>'
            f'<td class="num muted">{total:+.3g}</td></tr>')
    title = "proponents (push the query's loss down)" if sign == "proponents" else \
        "opponents (push the query's loss up)"
    return (f'<div class="caption" data-role="caption"><b>Top {data.k} {title}</b> at iteration t = {step + 1}</div>'
            f'<table class="sdi-top" style="width:{sum(widths)}px"><colgroup>{cols}</colgroup>'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def movement_html(prev: int, move: int, k: int) -> str:
    """Rank movement since the previous iteration: ▲n, ▼n, = or new (with the previous rank)."""
    if prev == 0:
        return '<span class="first">·</span>'
    if prev > k:
        return f'<span class="up" title="rank {prev} at the previous iteration">★ new <small>({prev})</small></span>'
    if move > 0:
        return f'<span class="up">▲{move}</span>'
    if move < 0:
        return f'<span class="down">▼{-move}</span>'
    return '<span class="same">=</span>'


def answers_html(data: ExplorerData, query: int, step: int) -> str:
    """The query, its right answer, and the model's answer after every iteration (current one outlined)."""
    parts = [f'<span class="query mono">{html.escape(data.query_texts[query])}</span>']
    if data.query_truth is not None:
        parts.append(f'<span class="muted">right answer <b class="mono">{html.escape(data.query_truth[query])}</b></span>')
    losses = data.result.query_losses
    if isinstance(losses, torch.Tensor) and losses.dim() == 2 and losses.shape[1] == data.n_query \
            and torch.isfinite(losses[-1, query]):
        parts.append(f'<span class="muted">loss {float(losses[-1, query]):.3g}</span>')
    cells = ""
    if data.query_answers is not None:
        for t in range(data.n_steps):
            right = data.is_right(query, t)
            cls = {True: " right", False: " wrong", None: ""}[right] + (" current" if t == step else "")
            mark = {True: "✓", False: "✗", None: ""}[right]
            cells += (f'<span class="cell mono{cls}" data-step="{t + 1}" title="iteration {t + 1}">'
                      f'<small>{t + 1}</small> {html.escape(data.query_answers[query][t])}{mark}</span>')
        cells = f'<div class="steps"><span class="muted">answer after each iteration:</span>{cells}</div>'
    return f'<div data-role="answers" style="margin:4px 0">{" · ".join(parts)}{cells}</div>'


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
        self.labels = [html.escape(_short(data.train_text(i), 16)) for i in self.rows]
        self.k, self.n_steps = data.k, data.n_steps

    def html(self, step: int, current: set[int], sign: str) -> str:
        width = max(8, min(24, 300 // self.n_steps))
        head = "".join(f'<th class="muted" style="font-weight:{"bold" if t == step else "normal"};font-size:9px;'
                       f'width:{width}px">{t + 1}</th>' for t in range(self.n_steps))
        body = []
        for i, label, cells in zip(self.rows, self.labels, self.cells):
            mark = "▸" if i in current else ""
            tds = "".join(f'<td class="cell{" cur" if t == step else ""}" style="{c}"></td>' for t, c in enumerate(cells))
            body.append(f'<tr data-train-index="{i}"><td class="mono" style="font-size:10px;text-align:right;'
                        f'padding:0 4px;white-space:pre;line-height:10px">{label}</td>'
                        f'<td style="width:8px;padding:0;font-size:10px;line-height:10px">{mark}</td>{tds}</tr>')
        return (f'<div class="heat" style="margin-top:4px"><div class="caption">SDI<sub>t</sub> of the examples '
                f'that reach the top-{self.k} ({sign}); ▸ = in the top-{self.k} now</div>'
                f'<table style="border-collapse:collapse;margin-top:2px"><thead><tr><th></th><th></th>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>')


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
