"""The explorer's matplotlib panel: SDI_t trajectories of the current top-k, and their TracIn as bars.

Scrubbing redraws only what moves. Axes, ticks and titles are drawn once per (query, sign, view) and kept
as a background bitmap (the last ``cache_size`` of them, so switching back is instant); a slider move
restores that bitmap, draws the k lines, the k bars and the current-iteration marker on top (matplotlib's
"blitting", done on the Agg canvas without a GUI) and encodes the frame as a PNG for an ``ipywidgets.Image``.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

GREEN, RED = "#1b7837", "#b2182b"   # proponents, opponents
UP, DOWN = "#2166ac", "#8c8c8c"      # rank movement: blue up, grey down (green/red already mean the sign)


def rank_colors(k: int, sign: str) -> list[str]:
    """k hex colours, strongest first: dark to light green for proponents, red for opponents."""
    if sign == "proponents":
        dark, light = np.array([0.106, 0.471, 0.216]), np.array([0.62, 0.85, 0.62])
    else:
        dark, light = np.array([0.698, 0.094, 0.169]), np.array([0.96, 0.63, 0.60])
    return [to_hex(dark + (light - dark) * (r / max(1, k - 1))) for r in range(k)]


def diverging_colors(values: np.ndarray, vmax: float) -> np.ndarray:
    """Hex colours on a red - white - green scale for ``values`` in [-vmax, vmax] (any shape)."""
    u = np.clip(np.asarray(values, dtype=np.float64) / (vmax or 1.0), -1, 1)[..., None]
    white = np.array([247, 247, 247])
    end = np.where(u >= 0, np.array([27, 120, 55]), np.array([178, 24, 43]))
    rgb = np.rint(white + (end - white) * np.abs(u)).astype(int)
    return np.vectorize(lambda r, g, b: f"#{r:02x}{g:02x}{b:02x}")(rgb[..., 0], rgb[..., 1], rgb[..., 2])


class StepFigure:
    """Trajectory and TracIn axes; :meth:`set_query` draws the static part, :meth:`frame` one iteration."""

    def __init__(self, k: int, n_steps: int, width_px: int = 470, height_px: int = 230, dpi: int = 100,
                 cache_size: int = 24) -> None:
        self.k, self.n_steps = k, n_steps
        self.fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        grid = self.fig.add_gridspec(1, 2, width_ratios=[3.4, 1], left=0.12, right=0.97, top=0.88, bottom=0.17,
                                     wspace=0.1)
        self.ax_traj = self.fig.add_subplot(grid[0, 0])
        self.ax_total = self.fig.add_subplot(grid[0, 1])
        steps = np.arange(1, n_steps + 1)
        self.lines = [self.ax_traj.plot(steps, np.zeros(n_steps), lw=1.4, animated=True)[0] for _ in range(k)]
        self.now = self.ax_traj.plot([], [], "o", ms=3.5, color="black", animated=True)[0]
        self.step_line = self.ax_traj.axvline(1, color="#444444", lw=0.9, ls="--", animated=True)
        self.bars = list(self.ax_total.barh(np.arange(k), np.zeros(k), height=0.75, animated=True))
        self._style_static_axes()
        self.background = None
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, dict] = OrderedDict()  # key -> background and axis state

    def _style_static_axes(self) -> None:
        self.ax_traj.set_xlim(0.5, self.n_steps + 0.5)
        self.ax_traj.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(self.n_steps, 12)))
        self.ax_traj.yaxis.set_major_locator(MaxNLocator(nbins=4))
        self.ax_traj.axhline(0, color="#999999", lw=0.6)
        self.ax_traj.set_xlabel("iteration t", fontsize=7, labelpad=1)
        self.ax_total.axvline(0, color="#999999", lw=0.6)
        self.ax_total.set_ylim(self.k - 0.5, -0.5)
        self.ax_total.set_yticks([])
        self.ax_total.xaxis.set_major_locator(MaxNLocator(nbins=2))
        self.ax_total.set_title(r"TracIn = $\Sigma_t$", fontsize=8)
        for ax in (self.ax_traj, self.ax_total):
            ax.tick_params(labelsize=7)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)

    def set_query(self, scores: np.ndarray, tracin: np.ndarray, union: Sequence[int], sign: str, title: str,
                  key: Hashable | None = None) -> None:
        """Draw everything that stays fixed while scrubbing and keep it as the background.

        scores: (N, T) SDI_t of every training example on this query; tracin: (N,);
        union:  every training example that reaches the top-k at some iteration (fixes the axis ranges);
        key:    identifies (view, query, sign); a background drawn for the same key is reused, not redrawn.
        """
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            self._restore(self._cache[key])
            return
        union = list(union)
        lo, hi = min(0.0, float(scores[union].min())), max(0.0, float(scores[union].max()))
        pad = 0.06 * (hi - lo or 1.0)
        self.ax_traj.set_ylim(lo - pad, hi + pad)
        t_lo, t_hi = min(0.0, float(tracin[union].min())), max(0.0, float(tracin[union].max()))
        t_pad = 0.08 * (t_hi - t_lo or 1.0)
        self.ax_total.set_xlim(t_lo - t_pad, t_hi + t_pad)
        self.ax_traj.set_title(title, fontsize=8)
        self._set_colors(rank_colors(self.k, sign))
        self.canvas.draw()  # animated artists are skipped: they are drawn per frame
        self.background = self.canvas.copy_from_bbox(self.fig.bbox)
        if key is not None:
            self._cache[key] = {"background": self.background, "ylim": self.ax_traj.get_ylim(),
                                "xlim": self.ax_total.get_xlim(), "colors": self.colors}
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _restore(self, state: dict) -> None:
        self.ax_traj.set_ylim(state["ylim"])
        self.ax_total.set_xlim(state["xlim"])
        self._set_colors(state["colors"])
        self.background = state["background"]

    def _set_colors(self, colors: list[str]) -> None:
        self.colors = colors
        for line, bar, color in zip(self.lines, self.bars, colors):
            line.set_color(color)
            bar.set_color(color)

    def frame(self, step: int, top_scores: np.ndarray, top_tracin: np.ndarray) -> bytes:
        """PNG of iteration ``step`` (0-based): top_scores (k, T) trajectories and top_tracin (k,) of the top-k."""
        if self.background is None:
            raise RuntimeError("call set_query before frame")
        self.canvas.restore_region(self.background)
        t = step + 1
        for line, ys in zip(self.lines, top_scores):
            line.set_ydata(ys)
            self.ax_traj.draw_artist(line)
        self.step_line.set_xdata([t, t])
        self.now.set_data(np.full(len(top_scores), t), top_scores[:, step])
        self.ax_traj.draw_artist(self.step_line)
        self.ax_traj.draw_artist(self.now)
        for bar, value in zip(self.bars, top_tracin):
            bar.set_width(float(value))
            self.ax_total.draw_artist(bar)
        return self.png()

    def png(self) -> bytes:
        width, height = self.canvas.get_width_height()
        rgba = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
        out = io.BytesIO()
        rgba.convert("RGB").save(out, format="png", compress_level=1)
        return out.getvalue()
