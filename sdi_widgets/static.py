"""The explorer as one self-contained HTML file: inline CSS, JS and JSON data; no CDN, no fonts, no kernel.

    from sdi_widgets.static import write_html
    write_html(result, train_texts, query_texts, "explorer.html", k=10)

The page works from ``file://``, from any static web server, inside an ``<iframe>``, and as raw HTML in a
Jupyter Book page (``render_html(..., full_page=False)``; every id, class and style is scoped to one root
element). It carries only what it shows: for every (view, query) the SDI_t trajectories of the training
examples that ever reach the top-k (either sign), their TracIn, the per-iteration top-k lists and the
previous-iteration ranks, scores rounded to 4 significant digits, and the texts of those examples.

DOM for tests and embedding: the root ``div.sdix`` carries ``data-view``, ``data-query``, ``data-step``
(1-based iteration) and ``data-sign``; controls have ``data-role`` = filter, query, view, play, step, sign;
the top-k rows are ``tr[data-train-index][data-rank][data-prev-rank]`` inside ``[data-role=table]``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from sdi.files import atomic_write
from sdi.results import InfluenceResult

from .data import SIGNS, ExplorerData
from .figure import column_widths, explorer_css, rank_colors


def write_html(
    result: InfluenceResult | str | os.PathLike,
    train_texts: Sequence[str],
    query_texts: Sequence[str],
    path: str | os.PathLike,
    k: int = 10,
    *,
    title: str = "Step-resolved influence explorer",
    **extras: Any,
) -> Path:
    """Write the static explorer of ``result`` to ``path`` (atomically) and return the path.

    ``extras`` are :class:`~sdi_widgets.ExplorerData`'s optional keyword arguments: ``train_labels``, ``flipped``,
    ``query_answers`` (Q, T) and ``query_truth``. This is what ``sdi explore`` calls.
    """
    data = ExplorerData(result, train_texts, query_texts, k, **extras)
    return write_atomic(path, render_html(data, title=title))


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`sdi.files.atomic_write`)."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def page_data(data: ExplorerData, initial: dict | None = None) -> dict[str, Any]:
    """The JSON the page runs on (plain lists, numbers and strings)."""
    initial = {"view": 0, "query": 0, "step": 0, "sign": "proponents", **(initial or {})}
    needed: set[int] = set()
    views = []
    for v in range(data.n_views):
        per_query = []
        for q in range(data.n_query):
            tops = {s: data.top_indices(v, q, s) for s in SIGNS}                           # (T, k) each
            rows = list(dict.fromkeys(torch.cat([tops[s].reshape(-1) for s in SIGNS]).tolist()))
            needed.update(rows)
            scores, tracin = data.scores(v, q)[rows], data.tracin(v, q)[rows]
            per_query.append({
                "rows": rows,
                "sdi": [[_round(x) for x in r] for r in scores.tolist()],
                "tracin": [_round(x) for x in tracin.tolist()],
                "top": {s: tops[s].tolist() for s in SIGNS},
                "rank": {s: data.ranks(v, q, s).tolist() for s in SIGNS},
                "prev": {s: data.prev_ranks(v, q, s).tolist() for s in SIGNS},
            })
        views.append(per_query)
    train = sorted(needed)
    losses = data.result.query_losses
    has_loss = isinstance(losses, torch.Tensor) and losses.dim() == 2 and losses.shape[1] == data.n_query
    return {
        "version": 2,
        "k": data.k, "T": data.n_steps, "N": data.n_train,
        "widths": column_widths(data),
        "views": data.view_names,
        "colors": {s: rank_colors(data.k, s) for s in SIGNS},
        "train": {
            "index": train,
            "text": [data.train_texts[i] for i in train],
            "label": None if data.train_labels is None else [data.train_labels[i] for i in train],
            "copies": [int(data.copies[i]) for i in train],
            "flipped": sorted(i for i in data.flipped if i in needed),
        },
        "queries": {
            "text": data.query_texts,
            "label": [data.query_label(q) for q in range(data.n_query)],
            "answers": data.query_answers,
            "truth": data.query_truth,
            "loss": [_round(x) if x == x else None for x in losses[-1].tolist()] if has_loss else None,
        },
        "data": views,
        "initial": initial,
    }


def render_html(data: ExplorerData, title: str = "Step-resolved influence explorer", initial: dict | None = None,
                full_page: bool = True) -> str:
    """The static explorer as an HTML string: a whole page, or (``full_page=False``) a fragment to embed."""
    payload = json.dumps(page_data(data, initial), separators=(",", ":"), ensure_ascii=False)
    # The JSON sits in a <script> element: no "<", ">" or "&" may end it early; \\u escapes keep it valid JSON.
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    root = "sdix-" + hashlib.sha1(payload.encode()).hexdigest()[:10]
    fragment = (
        f"<style>{explorer_css('#' + root, data.k)}{CSS.replace('ROOT', root)}</style>\n"
        f'<div class="sdix" id="{root}"><noscript>This explorer needs JavaScript.</noscript></div>\n'
        f'<script type="application/json" id="{root}-data">{payload}</script>\n'
        f"<script>{JS.replace('ROOT_ID', root)}</script>\n"
    )
    if not full_page:
        return fragment
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="color-scheme" content="light dark">\n'
            f"<title>{html.escape(title)}</title>\n</head>\n<body style=\"margin:12px\">\n"
            f"{fragment}</body>\n</html>\n")


def _round(x: float) -> float:
    """4 significant digits: the page shows 3."""
    return float(f"{x:.4g}")


CSS = r"""
#ROOT { max-width: 1120px; }
#ROOT * { box-sizing: border-box; }
#ROOT select, #ROOT input[type=search] { font-family: inherit; color: inherit; background: transparent;
  padding: 3px 4px; border: 1px solid var(--sdi-line); border-radius: 4px; font-size: 12px; }
#ROOT select { max-width: 520px; }
#ROOT option { color: CanvasText; background: Canvas; }
#ROOT input[type=search] { width: 170px; }
#ROOT .bar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; margin: 4px 0; }
#ROOT button { font: inherit; font-size: 12px; padding: 3px 10px; border: 1px solid var(--sdi-line);
  border-radius: 4px; background: transparent; color: inherit; cursor: pointer; }
#ROOT button:hover { background: var(--sdi-hover); }
#ROOT .switch button { border-radius: 0; margin: 0 -1px 0 0; }
#ROOT .switch button:first-child { border-radius: 4px 0 0 4px; }
#ROOT .switch button:last-child { border-radius: 0 4px 4px 0; }
#ROOT .switch button[aria-pressed=true][data-sign=proponents] { background: var(--sdi-green); color: #fff; border-color: var(--sdi-green); }
#ROOT .switch button[aria-pressed=true][data-sign=opponents] { background: var(--sdi-red); color: #fff; border-color: var(--sdi-red); }
#ROOT input[type=range] { width: 280px; vertical-align: middle; }
#ROOT .body { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin-top: 6px; }
#ROOT .tablebox { flex: 0 0 auto; }
#ROOT .plots { flex: 0 0 480px; }
"""

JS = r"""
(function () {
  "use strict";
  const root = document.getElementById("ROOT_ID");
  const D = JSON.parse(document.getElementById("ROOT_ID-data").textContent);
  const SIGNS = ["proponents", "opponents"];
  const SVGNS = "http://www.w3.org/2000/svg";
  const trainPos = new Map(D.train.index.map((i, p) => [i, p]));
  const flipped = new Set(D.train.flipped);
  const S = { view: D.initial.view, query: D.initial.query, step: D.initial.step, sign: D.initial.sign, timer: null };

  function el(tag, attrs, children) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return node;
  }
  function fmt(v) {  // like Python's "{:+.3g}"
    const a = Math.abs(v);
    const s = (a !== 0 && (a < 1e-4 || a >= 1e4)) ? a.toExponential(2) : String(Number(a.toPrecision(3)));
    return (v < 0 ? "−" : "+") + s;
  }
  function sub(text) { return el("svg:tspan", { "baseline-shift": "sub", "font-size": "7px", text: text }); }
  function short(t, n) { return t.length <= n ? t : t.slice(0, n - 1) + "…"; }
  function trainText(i) { return D.train.text[trainPos.get(i)]; }
  function trainCopies(i) { return D.train.copies[trainPos.get(i)]; }
  function trainLabel(i) { return D.train.label ? D.train.label[trainPos.get(i)] : ""; }
  function cur() { return D.data[S.view][S.query]; }
  function isRight(q, t) {
    if (!D.queries.answers || !D.queries.truth) return null;
    return D.queries.answers[q][t] === D.queries.truth[q];
  }

  // ---- layout -------------------------------------------------------------------------------------
  root.textContent = "";
  root.classList.add("sdi-x");
  const filter = el("input", { type: "search", placeholder: "filter prompts…", "data-role": "filter", "aria-label": "filter prompts" });
  const picker = el("select", { "data-role": "query", "aria-label": "test prompt" });
  const matches = el("span", { class: "muted", "data-role": "matches" });
  const viewSel = el("select", { "data-role": "view", "aria-label": "checkpoint" });
  D.views.forEach((name, v) => viewSel.appendChild(el("option", { value: v, text: name })));
  const viewBox = el("label", { class: "muted" }, ["weights ", viewSel]);
  if (D.views.length < 2) viewBox.style.display = "none";
  const answers = el("div", { "data-role": "answers" });
  const play = el("button", { type: "button", "data-role": "play", text: "▶ play" });
  const slider = el("input", { type: "range", min: 1, max: D.T, step: 1, value: S.step + 1, "data-role": "step", "aria-label": "iteration" });
  const stepLabel = el("output", { "data-role": "step-label", class: "mono" });
  const signButtons = SIGNS.map(s => el("button", { type: "button", "data-role": "sign", "data-sign": s,
    text: s === "proponents" ? "▲ proponents" : "▼ opponents" }));
  const caption = el("div", { class: "caption", "data-role": "caption" });
  const table = el("div", { "data-role": "table" });
  const traj = el("svg:svg", { "data-role": "trajectory", width: 480, height: 220, viewBox: "0 0 480 220" });
  const heatCaption = el("div", { class: "caption", "data-role": "heat-caption" });
  const heat = el("svg:svg", { "data-role": "heatmap", width: 480, height: 230, viewBox: "0 0 480 230" });
  root.append(
    el("div", { class: "bar" }, [filter, picker, matches, viewBox]),
    answers,
    el("div", { class: "bar" }, [play, el("label", { class: "muted" }, ["iteration t ", slider]), stepLabel,
                                 el("span", { class: "switch" }, signButtons)]),
    el("div", { class: "body" }, [el("div", { class: "tablebox" }, [caption, table]),
                                  el("div", { class: "plots" }, [traj, heatCaption, heat])]));

  // ---- prompt picker ------------------------------------------------------------------------------
  function fillPicker() {
    const needle = filter.value.trim().toLowerCase();
    picker.textContent = "";
    let n = 0;
    D.queries.label.forEach((label, q) => {
      if (needle && !label.toLowerCase().includes(needle)) return;
      picker.appendChild(el("option", { value: q, text: label }));
      n += 1;
    });
    matches.textContent = n === D.queries.label.length ? `${n} prompts` : `${n} of ${D.queries.label.length}`;
    if (n === 0) { picker.appendChild(el("option", { value: "", text: "no prompt matches", disabled: "" })); return; }
    if ([...picker.options].some(o => Number(o.value) === S.query)) picker.value = String(S.query);
    else { picker.selectedIndex = 0; S.query = Number(picker.value); render(); }
  }

  // ---- rendering ----------------------------------------------------------------------------------
  function renderAnswers() {
    const q = S.query;
    const parts = [el("span", { class: "query mono", text: D.queries.text[q] })];
    if (D.queries.truth) parts.push(el("span", { class: "muted" }, [" · right answer ", el("b", { class: "mono", text: D.queries.truth[q] })]));
    if (D.queries.loss && D.queries.loss[q] !== null) parts.push(el("span", { class: "muted", text: ` · loss ${Number(D.queries.loss[q].toPrecision(3))}` }));
    answers.textContent = "";
    answers.append(...parts);
    if (!D.queries.answers) return;
    const cells = D.queries.answers[q].map((a, t) => {
      const r = isRight(q, t);
      const cls = "cell mono" + (r === true ? " right" : r === false ? " wrong" : "") + (t === S.step ? " current" : "");
      return el("span", { class: cls, "data-step": t + 1, title: `iteration ${t + 1}` },
                [el("small", { text: String(t + 1) }), " " + a + (r === true ? "✓" : r === false ? "✗" : "")]);
    });
    answers.appendChild(el("div", { class: "steps" }, [el("span", { class: "muted", text: "answer after each iteration:" }), ...cells]));
  }

  function movement(prev, rank) {
    if (prev === 0) return el("span", { class: "first", text: "·" });
    if (prev > D.k) return el("span", { class: "up", title: `rank ${prev} at the previous iteration` }, ["★ new ", el("small", { text: `(${prev})` })]);
    if (prev > rank) return el("span", { class: "up", text: "▲" + (prev - rank) });
    if (prev < rank) return el("span", { class: "down", text: "▼" + (rank - prev) });
    return el("span", { class: "same", text: "=" });
  }

  function renderTable() {
    const v = cur(), t = S.step, sign = S.sign;
    const top = v.top[sign][t], prev = v.prev[sign][t], rank = v.rank[sign][t];
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const scores = top.map(i => v.sdi[rowOf.get(i)][t]);
    const scale = Math.max(...scores.map(Math.abs)) || 1;
    const color = sign === "proponents" ? "var(--sdi-green)" : "var(--sdi-red)";
    caption.textContent = "";
    caption.append(el("b", { text: `Top ${D.k} ${sign}` }),
      ` (${sign === "proponents" ? "push the query's loss down" : "push the query's loss up"}) at iteration t = ${t + 1}`);
    const head = el("tr", {}, [["#", "num"], ["move", ""], ["", ""], ["train", "num"], ["prompt", ""], ["answer", ""],
      [["SDI", el("sub", { text: String(t + 1) })], "num"], ["TracIn", "num"]].map(([h, c]) =>
        el("th", { class: c }, Array.isArray(h) ? h : [h])));
    const body = top.map((i, r) => {
      const label = el("td", { class: "mono" }, [el("b", { text: trainLabel(i) })]);
      if (flipped.has(i)) label.append(" ", el("span", { class: "flip", title: "label flipped (corrupted) on purpose", text: "⚑ flipped" }));
      const n = trainCopies(i);
      const text = el("td", { class: "mono text", title: trainText(i), text: trainText(i) });
      if (n > 1) text.append(" ", el("span", { class: "copies", title: `${n} identical copies in the training data`, text: `×${n}` }));
      const tied = rank.filter(x => x === rank[r]).length > 1;
      return el("tr", { class: `sdi-r${r}`, "data-train-index": i, "data-rank": rank[r], "data-prev-rank": prev[r] }, [
        el("td", { class: "num muted", title: tied ? "tied" : null, text: String(rank[r]) }),
        el("td", {}, [movement(prev[r], rank[r])]),
        el("td", {}, [el("span", { class: "swatch", style: `background:${D.colors[sign][r]}` })]),
        el("td", { class: "num muted", text: String(i) }),
        text,
        label,
        el("td", { class: "num", "data-role": "score" }, [el("span", { class: "sbar" }, [el("span", { style:
          `width:${(100 * Math.abs(scores[r]) / scale).toFixed(0)}%;background:${color}` })]), fmt(scores[r])]),
        el("td", { class: "num muted", text: fmt(v.tracin[rowOf.get(i)]) }),
      ]);
    });
    const cols = el("colgroup", {}, D.widths.map(w => el("col", { style: `width:${w}px` })));
    const width = D.widths.reduce((a, b) => a + b, 0);
    table.textContent = "";
    table.appendChild(el("table", { class: "sdi-top", style: `width:${width}px` }, [cols, el("thead", {}, [head]), el("tbody", {}, body)]));
  }

  function unionRows(sign) {  // examples that reach the top-k at some iteration, in order of first appearance
    const seen = new Set();
    for (const row of cur().top[sign]) for (const i of row) seen.add(i);
    return [...seen];
  }

  function padded(lo, hi, frac) {
    lo = Math.min(0, lo); hi = Math.max(0, hi);
    const pad = frac * ((hi - lo) || 1);
    return [lo - pad, hi + pad];
  }

  function renderTrajectory() {  // the same picture as the widget's figure.trajectory_svg
    const v = cur(), t = S.step, sign = S.sign;
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const union = unionRows(sign).map(i => rowOf.get(i));
    let lo = Infinity, hi = -Infinity, tlo = Infinity, thi = -Infinity;
    for (const r of union) {
      for (const x of v.sdi[r]) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
      tlo = Math.min(tlo, v.tracin[r]); thi = Math.max(thi, v.tracin[r]);
    }
    [lo, hi] = padded(lo, hi, 0.06); [tlo, thi] = padded(tlo, thi, 0.08);
    const L = 46, R = 270, TOP = 22, B = 186, BL = 282, BR = 352;
    const x = s => L + (R - L) * (D.T === 1 ? 0.5 : s / (D.T - 1));
    const y = val => B - (B - TOP) * (val - lo) / ((hi - lo) || 1);
    const bx = val => BL + (BR - BL) * (val - tlo) / ((thi - tlo) || 1);
    const top = v.top[sign][t], k = top.length;
    traj.textContent = "";
    traj.append(el("svg:text", { x: L, y: 11 }, ["SDI", sub("t"), ` of the current top-${k}, query ${S.query}`]),
                el("svg:text", { x: BL, y: 11 }, ["TracIn = Σ", sub("t")]),
                el("svg:line", { class: "zero", x1: L, x2: R, y1: y(0), y2: y(0) }),
                el("svg:path", { class: "axis", d: `M${L},${TOP}V${B}H${R}` }),
                el("svg:text", { x: L - 4, y: y(hi) + 3, "text-anchor": "end", text: fmt(hi) }),
                el("svg:text", { x: L - 4, y: y(lo) + 3, "text-anchor": "end", text: fmt(lo) }),
                el("svg:text", { x: L - 4, y: y(0) + 3, "text-anchor": "end",
                                 text: Math.min(y(0) - y(hi), y(lo) - y(0)) > 12 ? "0" : "" }),
                el("svg:text", { x: (L + R) / 2, y: B + 26, "text-anchor": "middle", text: "iteration t" }));
    const every = Math.ceil(D.T / 12);
    for (let s = 0; s < D.T; s += every) traj.append(el("svg:text", { x: x(s), y: B + 12, "text-anchor": "middle", text: String(s + 1) }));
    traj.append(el("svg:line", { class: "now", "data-role": "current-step", x1: x(t), x2: x(t), y1: TOP, y2: B }));
    const tip = (i, r) => `#${i} ${trainText(i)}  SDI_${t + 1} ${fmt(v.sdi[rowOf.get(i)][t])}  TracIn ${fmt(v.tracin[rowOf.get(i)])}`;
    for (let r = k - 1; r >= 0; r--) {  // the strongest drawn last, on top
      const i = top[r], vals = v.sdi[rowOf.get(i)];
      const pts = vals.map((val, s) => `${x(s).toFixed(1)},${y(val).toFixed(1)}`).join(" ");
      traj.append(el("svg:polyline", { class: `sdi-line sdi-r${r}`, points: pts, fill: "none", stroke: D.colors[sign][r],
                                       "stroke-width": 1.6, "data-train-index": i }, [el("svg:title", { text: tip(i, r) })]),
                  el("svg:circle", { class: `sdi-line sdi-r${r} dot`, cx: x(t), cy: y(vals[t]), r: 2.4 }));
    }
    traj.append(el("svg:line", { class: "zero", x1: bx(0), x2: bx(0), y1: TOP, y2: B }));
    const bh = (B - TOP) / k;
    top.forEach((i, r) => {
      const val = v.tracin[rowOf.get(i)], ytop = TOP + r * bh;
      traj.append(el("svg:rect", { class: `sdi-line sdi-r${r}`, x: Math.min(bx(0), bx(val)), y: ytop + 1,
                                   width: Math.abs(bx(val) - bx(0)), height: bh * 0.72, fill: D.colors[sign][r] },
                     [el("svg:title", { text: tip(i, r) })]),
                  el("svg:text", { class: `sdi-r${r} mono`, "data-role": "legend", x: BR + 6, y: ytop + bh * 0.36 + 3 },
                     [el("svg:tspan", { fill: D.colors[sign][r], text: "■" }), ` #${i} ${short(trainText(i) + (trainCopies(i) > 1 ? " ×" + trainCopies(i) : ""), 14)}`,
                      el("svg:title", { text: tip(i, r) })]));
    });
    traj.append(el("svg:text", { x: BL, y: B + 12, text: fmt(tlo) }),
                el("svg:text", { x: BR, y: B + 12, "text-anchor": "end", text: fmt(thi) }));
  }

  function heatColor(val, vmax) {  // green (+) or red (-), opacity = |value| / vmax, like the widget's
    const u = Math.max(-1, Math.min(1, val / vmax));
    return `rgba(${u >= 0 ? "46,160,67" : "218,54,51"},${Math.abs(u).toFixed(2)})`;
  }

  function renderHeat() {
    const v = cur(), t = S.step, sign = S.sign;
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const rows = unionRows(sign).slice(0, 24);
    const L = 110, R = 470, TOP = 4, B = 200;
    const cw = (R - L) / D.T, rh = Math.min(14, (B - TOP) / rows.length);
    let vmax = 0;
    for (const i of rows) for (const x of v.sdi[rowOf.get(i)]) vmax = Math.max(vmax, Math.abs(x));
    vmax = vmax || 1;
    heatCaption.textContent = "";
    heatCaption.append("SDI", el("sub", { text: "t" }), ` of the examples that reach the top-${D.k} (${sign}); ▸ = in the top-${D.k} now`);
    heat.textContent = "";
    const current = new Set(v.top[sign][t]);
    rows.forEach((i, r) => {
      const vals = v.sdi[rowOf.get(i)];
      vals.forEach((val, s) => heat.append(el("svg:rect", { x: L + s * cw, y: TOP + r * rh, width: cw + 0.3, height: rh + 0.3, fill: heatColor(val, vmax) },
                                              [el("svg:title", { text: `#${i} t=${s + 1}: ${fmt(val)}` })])));
      heat.append(el("svg:text", { x: L - 11, y: TOP + r * rh + rh / 2 + 3, "text-anchor": "end", class: "mono", text: short(trainText(i), 16) }));
      if (current.has(i)) heat.append(el("svg:text", { x: L - 9, y: TOP + r * rh + rh / 2 + 3, "data-role": "in-top", text: "▸" }));
    });
    heat.append(el("svg:rect", { "data-role": "current-step", x: L + t * cw, y: TOP, width: cw, height: rows.length * rh, fill: "none", stroke: "currentColor", "stroke-width": 1.4 }));
    const every = Math.ceil(D.T / 12), yb = TOP + rows.length * rh + 11;
    for (let s = 0; s < D.T; s += every) heat.append(el("svg:text", { x: L + (s + 0.5) * cw, y: yb, "text-anchor": "middle", text: String(s + 1) }));
    heat.append(el("svg:text", { x: (L + R) / 2, y: yb + 12, "text-anchor": "middle", text: "iteration t" }));
    const height = Math.ceil(yb + 16);
    heat.setAttribute("height", height); heat.setAttribute("viewBox", `0 0 480 ${height}`);
  }

  function render() {
    root.dataset.view = S.view; root.dataset.query = S.query; root.dataset.step = S.step + 1; root.dataset.sign = S.sign;
    slider.value = S.step + 1;
    stepLabel.textContent = `t = ${S.step + 1} / ${D.T}`;
    signButtons.forEach(b => b.setAttribute("aria-pressed", String(b.dataset.sign === S.sign)));
    viewSel.value = String(S.view);
    renderAnswers(); renderTable(); renderTrajectory(); renderHeat();
  }

  // ---- controls -----------------------------------------------------------------------------------
  function stop() { if (S.timer !== null) { clearInterval(S.timer); S.timer = null; } play.textContent = "▶ play"; }
  play.addEventListener("click", () => {
    if (S.timer !== null) { stop(); return; }
    if (S.step >= D.T - 1) { S.step = 0; render(); }
    play.textContent = "❚❚ pause";
    S.timer = setInterval(() => { if (S.step >= D.T - 1) { stop(); return; } S.step += 1; render(); }, 700);
  });
  slider.addEventListener("input", () => { S.step = Number(slider.value) - 1; render(); });
  signButtons.forEach(b => b.addEventListener("click", () => { S.sign = b.dataset.sign; render(); }));
  viewSel.addEventListener("change", () => { S.view = Number(viewSel.value); render(); });
  picker.addEventListener("change", () => { if (picker.value !== "") { S.query = Number(picker.value); render(); } });
  filter.addEventListener("input", fillPicker);
  fillPicker();
  render();
})();
"""
