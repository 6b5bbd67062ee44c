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
from .figure import DOWN, GREEN, RED, UP, rank_colors


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
                "prev": {s: data.prev_ranks(v, q, s).tolist() for s in SIGNS},
            })
        views.append(per_query)
    train = sorted(needed)
    losses = data.result.query_losses
    has_loss = isinstance(losses, torch.Tensor) and losses.dim() == 2 and losses.shape[1] == data.n_query
    return {
        "version": 1,
        "k": data.k, "T": data.n_steps, "N": data.n_train,
        "views": data.view_names,
        "colors": {s: rank_colors(data.k, s) for s in SIGNS},
        "train": {
            "index": train,
            "text": [data.train_texts[i] for i in train],
            "label": None if data.train_labels is None else [data.train_labels[i] for i in train],
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
        f"<style>{CSS.replace('ROOT', root)}</style>\n"
        f'<div class="sdix" id="{root}"><noscript>This explorer needs JavaScript.</noscript></div>\n'
        f'<script type="application/json" id="{root}-data">{payload}</script>\n'
        f"<script>{JS.replace('ROOT_ID', root)}</script>\n"
    )
    if not full_page:
        return fragment
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n</head>\n<body style=\"margin:12px;background:#fff\">\n"
            f"{fragment}</body>\n</html>\n")


def _round(x: float) -> float:
    """4 significant digits: the page shows 3."""
    return float(f"{x:.4g}")


CSS = r"""
#ROOT { font: 13px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: #222; max-width: 1080px; }
#ROOT * { box-sizing: border-box; }
#ROOT .mono, #ROOT select, #ROOT input[type=search] {
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; }
#ROOT .bar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; margin: 4px 0; }
#ROOT input[type=search] { width: 170px; padding: 3px 6px; border: 1px solid #bbb; border-radius: 4px; font-size: 12px; }
#ROOT select { padding: 3px 4px; border: 1px solid #bbb; border-radius: 4px; font-size: 12px; max-width: 520px; }
#ROOT .muted { color: #666; font-size: 12px; }
#ROOT button { font: inherit; font-size: 12px; padding: 3px 10px; border: 1px solid #bbb; border-radius: 4px;
  background: #f6f6f6; cursor: pointer; }
#ROOT button:hover { background: #ececec; }
#ROOT .switch button { border-radius: 0; margin: 0 -1px 0 0; }
#ROOT .switch button:first-child { border-radius: 4px 0 0 4px; }
#ROOT .switch button:last-child { border-radius: 0 4px 4px 0; }
#ROOT .switch button[aria-pressed=true][data-sign=proponents] { background: GREEN; color: #fff; border-color: GREEN; }
#ROOT .switch button[aria-pressed=true][data-sign=opponents] { background: RED; color: #fff; border-color: RED; }
#ROOT input[type=range] { width: 280px; vertical-align: middle; }
#ROOT .query { font-weight: 600; font-size: 13px; }
#ROOT .steps { margin-top: 3px; display: flex; flex-wrap: wrap; gap: 2px; align-items: center; }
#ROOT .steps span.cell { display: inline-block; min-width: 28px; text-align: center; padding: 0 3px;
  border: 1px solid #ccc; background: #eee; font-size: 11px; }
#ROOT .steps span.cell.right { background: #d9f0d3; }
#ROOT .steps span.cell.wrong { background: #f4cccc; }
#ROOT .steps span.cell.current { border: 2px solid #222; }
#ROOT .steps small { color: #777; }
#ROOT .body { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin-top: 6px; }
#ROOT .tablebox { flex: 0 1 auto; min-width: 0; overflow-x: auto; }
#ROOT table { border-collapse: collapse; font-size: 12px; }
#ROOT th { text-align: left; font-weight: 600; padding: 2px 6px; border-bottom: 1px solid #ccc; white-space: nowrap; }
#ROOT td { padding: 1px 6px; white-space: nowrap; }
#ROOT td.num, #ROOT th.num { text-align: right; }
#ROOT td.text { white-space: pre; }
#ROOT tr:hover td { background: #f5f5f5; }
#ROOT .up { color: UP; } #ROOT .down { color: DOWN; } #ROOT .same, #ROOT .first { color: #999; }
#ROOT .flip { color: #b35806; font-weight: 600; font-family: system-ui, sans-serif; }
#ROOT .swatch { display: inline-block; width: 10px; height: 10px; }
#ROOT .sbar { display: inline-block; width: 48px; height: 8px; background: #eee; margin-right: 4px; vertical-align: middle; }
#ROOT .sbar > span { display: block; height: 8px; }
#ROOT .plots { flex: 0 0 460px; }
#ROOT svg { display: block; font-family: system-ui, sans-serif; }
#ROOT svg text { font-size: 9px; fill: #333; }
#ROOT svg text.mono { font-size: 8px; }
#ROOT .caption { font-size: 12px; margin: 2px 0 4px 0; }
""".replace("GREEN", GREEN).replace("RED", RED).replace("UP", UP).replace("DOWN", DOWN)

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
  function trainLabel(i) { return D.train.label ? D.train.label[trainPos.get(i)] : ""; }
  function cur() { return D.data[S.view][S.query]; }
  function isRight(q, t) {
    if (!D.queries.answers || !D.queries.truth) return null;
    return D.queries.answers[q][t] === D.queries.truth[q];
  }

  // ---- layout -------------------------------------------------------------------------------------
  root.textContent = "";
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
  const traj = el("svg:svg", { "data-role": "trajectory", width: 460, height: 200, viewBox: "0 0 460 200" });
  const heat = el("svg:svg", { "data-role": "heatmap", width: 460, height: 240, viewBox: "0 0 460 240" });
  root.append(
    el("div", { class: "bar" }, [filter, picker, matches, viewBox]),
    answers,
    el("div", { class: "bar" }, [play, el("label", { class: "muted" }, ["iteration t ", slider]), stepLabel,
                                 el("span", { class: "switch" }, signButtons)]),
    el("div", { class: "body" }, [el("div", { class: "tablebox" }, [caption, table]),
                                  el("div", { class: "plots" }, [traj, heat])]));

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
    const top = v.top[sign][t], prev = v.prev[sign][t];
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const scores = top.map(i => v.sdi[rowOf.get(i)][t]);
    const scale = Math.max(...scores.map(Math.abs)) || 1;
    const color = sign === "proponents" ? "GREEN" : "RED";
    caption.textContent = "";
    caption.append(el("b", { text: `Top ${D.k} ${sign}` }),
      ` (${sign === "proponents" ? "push the query's loss down" : "push the query's loss up"}) at iteration t = ${t + 1}`);
    const head = el("tr", {}, [["#", "num"], ["move", ""], ["", ""], ["train", "num"], ["prompt", ""], ["answer", ""],
      [["SDI", el("sub", { text: String(t + 1) })], "num"], ["TracIn", "num"]].map(([h, c]) =>
        el("th", { class: c }, Array.isArray(h) ? h : [h])));
    const body = top.map((i, r) => {
      const label = el("td", { class: "mono" }, [el("b", { text: trainLabel(i) })]);
      if (flipped.has(i)) label.append(" ", el("span", { class: "flip", title: "label flipped (corrupted) on purpose", text: "⚑ flipped" }));
      return el("tr", { "data-train-index": i, "data-rank": r + 1, "data-prev-rank": prev[r] }, [
        el("td", { class: "num muted", text: String(r + 1) }),
        el("td", {}, [movement(prev[r], r + 1)]),
        el("td", {}, [el("span", { class: "swatch", style: `background:${D.colors[sign][r]}` })]),
        el("td", { class: "num muted", text: String(i) }),
        el("td", { class: "mono text", text: trainText(i) }),
        label,
        el("td", { class: "num", "data-role": "score" }, [el("span", { class: "sbar" }, [el("span", { style:
          `width:${(100 * Math.abs(scores[r]) / scale).toFixed(0)}%;background:${color}` })]), fmt(scores[r])]),
        el("td", { class: "num muted", text: fmt(v.tracin[rowOf.get(i)]) }),
      ]);
    });
    body.forEach(tr => {  // hovering a row thickens its trajectory
      const line = () => traj.querySelector(`polyline[data-train-index="${tr.dataset.trainIndex}"]`);
      tr.addEventListener("mouseenter", () => { const l = line(); if (l) l.setAttribute("stroke-width", 3.2); });
      tr.addEventListener("mouseleave", () => { const l = line(); if (l) l.setAttribute("stroke-width", 1.6); });
    });
    table.textContent = "";
    table.appendChild(el("table", {}, [el("thead", {}, [head]), el("tbody", {}, body)]));
  }

  function unionRows(sign) {  // examples that reach the top-k at some iteration, in order of first appearance
    const seen = new Set();
    for (const row of cur().top[sign]) for (const i of row) seen.add(i);
    return [...seen];
  }

  function renderTrajectory() {
    const v = cur(), t = S.step, sign = S.sign;
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const union = unionRows(sign).map(i => rowOf.get(i));
    let lo = 0, hi = 0;
    for (const r of union) for (const x of v.sdi[r]) { lo = Math.min(lo, x); hi = Math.max(hi, x); }
    const pad = 0.06 * ((hi - lo) || 1); lo -= pad; hi += pad;
    let tlo = 0, thi = 0;
    for (const r of union) { tlo = Math.min(tlo, v.tracin[r]); thi = Math.max(thi, v.tracin[r]); }
    const tpad = 0.08 * ((thi - tlo) || 1); tlo -= tpad; thi += tpad;
    const L = 58, R = 334, TOP = 18, B = 170, BL = 352, BR = 452;
    const x = s => L + (R - L) * (D.T === 1 ? 0.5 : s / (D.T - 1));
    const y = val => B - (B - TOP) * (val - lo) / (hi - lo);
    const bx = val => BL + (BR - BL) * (val - tlo) / (thi - tlo);
    traj.textContent = "";
    traj.append(el("svg:text", { x: L, y: 11 }, ["SDI", sub("t"), ` of the current top-${D.k}, query ${S.query}`]),
                el("svg:text", { x: BL, y: 11 }, ["TracIn = Σ", sub("t")]),
                el("svg:line", { x1: L, x2: R, y1: y(0), y2: y(0), stroke: "#999", "stroke-width": 0.6 }),
                el("svg:line", { x1: L, x2: L, y1: TOP, y2: B, stroke: "#333", "stroke-width": 0.8 }),
                el("svg:line", { x1: L, x2: R, y1: B, y2: B, stroke: "#333", "stroke-width": 0.8 }),
                el("svg:text", { x: L - 4, y: y(hi - pad) + 3, "text-anchor": "end", text: fmt(hi - pad) }),
                el("svg:text", { x: L - 4, y: y(lo + pad) + 3, "text-anchor": "end", text: fmt(lo + pad) }),
                el("svg:text", { x: L - 4, y: y(0) + 3, "text-anchor": "end",
                                 text: Math.min(y(0) - y(hi - pad), y(lo + pad) - y(0)) > 12 ? "0" : "" }),
                el("svg:text", { x: (L + R) / 2, y: B + 26, "text-anchor": "middle", text: "iteration t" }));
    const every = Math.ceil(D.T / 12);
    for (let s = 0; s < D.T; s += every) traj.append(el("svg:text", { x: x(s), y: B + 12, "text-anchor": "middle", text: String(s + 1) }));
    traj.append(el("svg:line", { "data-role": "current-step", x1: x(t), x2: x(t), y1: TOP, y2: B, stroke: "#444", "stroke-dasharray": "4 3" }));
    const top = v.top[sign][t];
    top.forEach((i, r) => {
      const vals = v.sdi[rowOf.get(i)];
      const pts = vals.map((val, s) => `${x(s).toFixed(1)},${y(val).toFixed(1)}`).join(" ");
      traj.append(el("svg:polyline", { points: pts, fill: "none", stroke: D.colors[sign][r], "stroke-width": 1.6, "data-train-index": i },
                     [el("svg:title", { text: `#${i} ${trainText(i)}  TracIn ${fmt(v.tracin[rowOf.get(i)])}` })]));
    });
    top.forEach((i, r) => traj.append(el("svg:circle", { cx: x(t), cy: y(v.sdi[rowOf.get(i)][t]), r: 2.4, fill: "#111" })));
    traj.append(el("svg:line", { x1: bx(0), x2: bx(0), y1: TOP, y2: B, stroke: "#999", "stroke-width": 0.6 }));
    const bh = (B - TOP) / D.k;
    top.forEach((i, r) => {
      const val = v.tracin[rowOf.get(i)];
      traj.append(el("svg:rect", { x: Math.min(bx(0), bx(val)), y: TOP + r * bh + 1, width: Math.abs(bx(val) - bx(0)),
                                   height: bh * 0.75, fill: D.colors[sign][r] }, [el("svg:title", { text: `#${i} TracIn ${fmt(val)}` })]));
    });
    traj.append(el("svg:text", { x: BL, y: B + 12, text: fmt(tlo + tpad) }),
                el("svg:text", { x: BR, y: B + 12, "text-anchor": "end", text: fmt(thi - tpad) }));
  }

  function heatColor(val, vmax) {  // red - white - green, like the widget's colormap
    const u = Math.max(-1, Math.min(1, val / vmax));
    const end = u >= 0 ? [27, 120, 55] : [178, 24, 43], w = [247, 247, 247], a = Math.abs(u);
    return `rgb(${end.map((c, j) => Math.round(w[j] + (c - w[j]) * a)).join(",")})`;
  }

  function renderHeat() {
    const v = cur(), t = S.step, sign = S.sign;
    const rowOf = new Map(v.rows.map((i, r) => [i, r]));
    const rows = unionRows(sign).slice(0, 24);
    const L = 110, R = 452, TOP = 18, B = 214;
    const cw = (R - L) / D.T, rh = Math.min(14, (B - TOP) / rows.length);
    let vmax = 0;
    for (const i of rows) for (const x of v.sdi[rowOf.get(i)]) vmax = Math.max(vmax, Math.abs(x));
    vmax = vmax || 1;
    heat.textContent = "";
    heat.append(el("svg:text", { x: L, y: 11 }, ["SDI", sub("t"), ` of the examples that reach the top-${D.k} (${sign}); ▸ = in the top-${D.k} now`]));
    const current = new Set(v.top[sign][t]);
    rows.forEach((i, r) => {
      const vals = v.sdi[rowOf.get(i)];
      vals.forEach((val, s) => heat.append(el("svg:rect", { x: L + s * cw, y: TOP + r * rh, width: cw + 0.3, height: rh + 0.3, fill: heatColor(val, vmax) },
                                              [el("svg:title", { text: `#${i} t=${s + 1}: ${fmt(val)}` })])));
      heat.append(el("svg:text", { x: L - 11, y: TOP + r * rh + rh / 2 + 3, "text-anchor": "end", class: "mono", text: short(trainText(i), 16) }));
      if (current.has(i)) heat.append(el("svg:text", { x: L - 9, y: TOP + r * rh + rh / 2 + 3, "data-role": "in-top", text: "▸" }));
    });
    heat.append(el("svg:rect", { "data-role": "current-step", x: L + t * cw, y: TOP, width: cw, height: rows.length * rh, fill: "none", stroke: "#111", "stroke-width": 1.4 }));
    const every = Math.ceil(D.T / 12), yb = TOP + rows.length * rh + 11;
    for (let s = 0; s < D.T; s += every) heat.append(el("svg:text", { x: L + (s + 0.5) * cw, y: yb, "text-anchor": "middle", text: String(s + 1) }));
    heat.append(el("svg:text", { x: (L + R) / 2, y: yb + 12, "text-anchor": "middle", text: "iteration t" }));
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
""".replace("GREEN", GREEN).replace("RED", RED)
