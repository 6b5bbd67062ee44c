"""The explorer's matplotlib panel: SDI_t trajectories, TracIn bars and a train-example x iteration heat map.

Scrubbing redraws only what moves. Axes, ticks and the heat map are drawn once per (query, sign, view)
and kept as a background bitmap; a slider move restores that bitmap, draws the k lines, the k bars and
the current-iteration markers on top (matplotlib's "blitting", done on the Agg canvas without a GUI),
and encodes the frame as a PNG for an ``ipywidgets.Image``.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

GREEN, RED = "#1b7837", "#b2182b"
DIVERGING = LinearSegmentedColormap.from_list("sdi_diverging", [RED, "#f7f7f7", GREEN])


def rank_colors(k: int, sign: str) -> list[str]:
    """k hex colours, strongest first: dark to light green for proponents, red for opponents."""
    dark, light = (np.array([0.106, 0.471, 0.216]), np.array([0.62, 0.85, 0.62])) if sign == "proponents" else \
                  (np.array([0.698, 0.094, 0.169]), np.array([0.96, 0.63, 0.60]))
    return [to_hex(dark + (light - dark) * (r / max(1, k - 1))) for r in range(k)]


class StepFigure:
    """One figure with three axes; :meth:`set_query` draws the static part, :meth:`frame` one iteration."""

    def __init__(self, k: int, n_steps: int, width_px: int = 480, height_px: int = 440, dpi: int = 100) -> None:
        self.k, self.n_steps = k, n_steps
        self.fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        grid = self.fig.add_gridspec(2, 2, width_ratios=[3.3, 1], height_ratios=[1, 1.1],
                                     left=0.2, right=0.97, top=0.93, bottom=0.1, wspace=0.08, hspace=0.42)
        self.ax_traj = self.fig.add_subplot(grid[0, 0])
        self.ax_total = self.fig.add_subplot(grid[0, 1])
        self.ax_heat = self.fig.add_subplot(grid[1, :])
        steps = np.arange(1, n_steps + 1)
        self.lines = [self.ax_traj.plot(steps, np.zeros(n_steps), lw=1.4, animated=True)[0] for _ in range(k)]
        self.now = self.ax_traj.plot([], [], "o", ms=3.5, color="black", animated=True)[0]
        self.step_line = self.ax_traj.axvline(1, color="#444444", lw=0.9, ls="--", animated=True)
        self.bars = list(self.ax_total.barh(np.arange(k), np.zeros(k), height=0.75, animated=True))
        self.heat = self.ax_heat.imshow(np.zeros((1, n_steps)), aspect="auto", cmap=DIVERGING,
                                        interpolation="nearest", extent=(0.5, n_steps + 0.5, 0.5, -0.5))
        self.heat_col = Rectangle((0.5, -0.5), 1, 1, fill=False, ec="black", lw=1.3, animated=True)
        self.ax_heat.add_patch(self.heat_col)
        self.heat_marks = self.ax_heat.plot([], [], ">", ms=4, color="black", clip_on=False, animated=True)[0]
        self._style_static_axes(steps)
        self.background = None

    def _style_static_axes(self, steps: np.ndarray) -> None:
        for ax in (self.ax_traj, self.ax_heat):
            ax.set_xlim(0.5, self.n_steps + 0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(self.n_steps, 12)))
            ax.tick_params(labelsize=7)
        self.ax_traj.axhline(0, color="#999999", lw=0.6)
        self.ax_traj.set_xlabel("iteration t", fontsize=7, labelpad=1)
        self.ax_total.axvline(0, color="#999999", lw=0.6)
        self.ax_total.set_ylim(self.k - 0.5, -0.5)
        self.ax_total.set_yticks([])
        self.ax_total.tick_params(labelsize=6)
        self.ax_total.xaxis.set_major_locator(MaxNLocator(nbins=2))
        self.ax_total.set_title("TracIn = Σ_t", fontsize=8)
        self.ax_heat.set_xlabel("iteration t", fontsize=7, labelpad=1)
        for ax in (self.ax_traj, self.ax_total, self.ax_heat):
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)

    def set_query(self, scores: np.ndarray, tracin: np.ndarray, union: Sequence[int], rows: Sequence[int],
                  row_labels: Sequence[str], sign: str, title: str) -> None:
        """Draw everything that stays fixed while scrubbing and keep it as the background.

        scores: (N, T) SDI_t of every training example on this query; tracin: (N,);
        union:  every training example that reaches the top-k at some iteration (fixes the axis ranges);
        rows:   the heat map's rows (a prefix of ``union`` in order of first appearance), ``row_labels`` theirs.
        """
        union, rows = list(union), list(rows)
        lo, hi = min(0.0, float(scores[union].min())), max(0.0, float(scores[union].max()))
        pad = 0.06 * (hi - lo or 1.0)
        self.ax_traj.set_ylim(lo - pad, hi + pad)
        shown = scores[rows]                                          # (R, T)
        t_lo, t_hi = min(0.0, float(tracin[union].min())), max(0.0, float(tracin[union].max()))
        t_pad = 0.08 * (t_hi - t_lo or 1.0)
        self.ax_total.set_xlim(t_lo - t_pad, t_hi + t_pad)
        self.ax_traj.set_title(title, fontsize=8)
        vmax = float(np.abs(shown).max()) or 1.0
        self.heat.set_data(shown)
        self.heat.set_clim(-vmax, vmax)
        self.heat.set_extent((0.5, self.n_steps + 0.5, len(rows) - 0.5, -0.5))
        self.ax_heat.set_ylim(len(rows) - 0.5, -0.5)
        self.ax_heat.set_yticks(np.arange(len(rows)))
        self.ax_heat.set_yticklabels(row_labels, fontsize=6, family="monospace")
        self.ax_heat.set_title(f"SDI_t of the examples that reach the top-{self.k} ({sign})", fontsize=8)
        self.colors = rank_colors(self.k, sign)
        for line, bar, color in zip(self.lines, self.bars, self.colors):
            line.set_color(color)
            bar.set_color(color)
        self.row_of = {i: r for r, i in enumerate(rows)}
        self.canvas.draw()  # animated artists are skipped: they are drawn per frame
        self.background = self.canvas.copy_from_bbox(self.fig.bbox)

    def frame(self, step: int, top_scores: np.ndarray, top_tracin: np.ndarray, top_indices: Sequence[int]) -> bytes:
        """PNG of iteration ``step`` (0-based): top_scores (k, T) trajectories, top_tracin (k,), top_indices (k,)."""
        if self.background is None:
            raise RuntimeError("call set_query before frame")
        self.canvas.restore_region(self.background)
        t = step + 1
        for line, ys in zip(self.lines, top_scores):
            line.set_ydata(ys)
            self.ax_traj.draw_artist(line)
        self.step_line.set_xdata([t, t])
        self.now.set_data(np.full(len(top_scores), t), top_scores[:, step])
        for artist in (self.step_line, self.now):
            self.ax_traj.draw_artist(artist)
        for bar, value in zip(self.bars, top_tracin):
            bar.set_width(float(value))
            self.ax_total.draw_artist(bar)
        self.heat_col.set_bounds(t - 0.5, -0.5, 1, len(self.row_of))
        marked = [self.row_of[i] for i in top_indices if i in self.row_of]
        self.heat_marks.set_data(np.full(len(marked), 0.5 - 0.012 * self.n_steps), marked)
        self.ax_heat.draw_artist(self.heat_col)
        self.ax_heat.draw_artist(self.heat_marks)
        return self.png()

    def png(self) -> bytes:
        width, height = self.canvas.get_width_height()
        rgba = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        out = io.BytesIO()
        rgba.convert("RGB").save(out, format="png", compress_level=1)
        return out.getvalue()
