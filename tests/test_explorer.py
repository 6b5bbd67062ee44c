"""InfluenceExplorer and its data: the displayed rankings are exactly those of the result; bad input is refused.

The expected rankings come straight from the result with ``torch.topk`` (and, for rank movement, from a full
sort), never from the explorer's own precomputation.
"""

import json
import re

import numpy as np
import pytest
import torch

from sdi import InfluenceResult, LoopedGPT, LoopedGPTConfig
from sdi.tasks import parity
from sdi_widgets import ExplorerData, InfluenceExplorer, explorer_inputs, render_html, write_html
from sdi_widgets.static import page_data

N, Q, T, K, TOP = 40, 5, 6, 3, 7


def make_result(n=N, q=Q, t=T, k=K, seed=0) -> InfluenceResult:
    """Random scores (no ties) with per-checkpoint shares that sum to ``sdi`` and TracIn = sum over steps."""
    gen = torch.Generator().manual_seed(seed)
    per_ckpt = torch.randn(k, n, q, t, generator=gen)
    sdi_ = per_ckpt.sum(0)
    return InfluenceResult(sdi=sdi_, train_sdi=torch.randn(n, q, 4, generator=gen), tracin=sdi_.sum(-1),
                           etas=torch.linspace(1e-3, 1e-4, k), train_losses=torch.rand(k, n, generator=gen),
                           query_losses=torch.rand(k, q, generator=gen), checkpoint_sdi=per_ckpt)


TRAIN_TEXTS = [f"{i:06b}=" for i in range(N)]
QUERY_TEXTS = [f"q{j}:{j * 7 % 10}1{j}" for j in range(Q)]
ANSWERS = [[str((j + t) % 2) for t in range(T)] for j in range(Q)]
TRUTH = ["1"] * Q
FLIPPED = [3, 17]


@pytest.fixture(scope="module")
def result() -> InfluenceResult:
    return make_result()


@pytest.fixture(scope="module")
def shared_explorer(result) -> InfluenceExplorer:
    return InfluenceExplorer(result, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP,
                             train_labels=[str(i % 2) for i in range(N)], flipped=FLIPPED,
                             query_answers=ANSWERS, query_truth=TRUTH)


@pytest.fixture()
def explorer(shared_explorer) -> InfluenceExplorer:
    """One explorer for the module (building one draws a figure), put back in its initial state per test."""
    ex = shared_explorer
    ex.filter.value = ""
    ex.query.value, ex.step.value, ex.sign.value, ex.checkpoint.value = 0, 1, "proponents", 0
    return ex


def shown(explorer) -> list[int]:
    """Training indices in the displayed table, top to bottom."""
    return [int(i) for i in re.findall(r'data-train-index="(\d+)"', explorer.table.value)]


def shown_prev_ranks(explorer) -> list[int]:
    return [int(i) for i in re.findall(r'data-prev-rank="(\d+)"', explorer.table.value)]


def expected(scores: torch.Tensor, opponents: bool = False, k: int = TOP) -> list[int]:
    """Top-k of a (N,) score vector, computed directly with torch.topk."""
    return torch.topk(-scores if opponents else scores, k).indices.tolist()


def oracle_rank(scores: torch.Tensor, i: int, opponents: bool) -> int:
    """1-based position of ``i`` in a full sort of ``scores`` (strongest first)."""
    order = torch.argsort(scores, descending=not opponents, stable=True).tolist()
    return order.index(i) + 1


# ------------------------------------------------------------------------------------- the widget

def test_initial_display_is_first_iteration_proponents(explorer, result):
    assert explorer.current == (0, 0, 0, "proponents")
    assert shown(explorer) == expected(result.sdi[:, 0, 0])
    assert shown_prev_ranks(explorer) == [0] * TOP  # no previous iteration at t = 1


@pytest.mark.parametrize("t", range(1, T + 1))
def test_slider_shows_topk_of_that_iteration(explorer, result, t):
    explorer.query.value = 2
    explorer.step.value = t
    assert shown(explorer) == expected(result.sdi[:, 2, t - 1])
    assert explorer.ranking().indices.tolist() == shown(explorer)
    assert re.search(rf"at iteration t = {t}\b", explorer.table.value)


@pytest.mark.parametrize("q", range(Q))
def test_picker_shows_topk_of_that_query(explorer, result, q):
    explorer.step.value = 4
    explorer.query.value = q
    assert shown(explorer) == expected(result.sdi[:, q, 3])
    assert QUERY_TEXTS[q] in explorer.answers.value


def test_sign_switch_shows_opponents(explorer, result):
    explorer.query.value, explorer.step.value = 1, 3
    explorer.sign.value = "opponents"
    assert shown(explorer) == expected(result.sdi[:, 1, 2], opponents=True)
    scores = [float(s) for s in re.findall(r"([+-]\d[\d.e+-]*)</td><td", explorer.table.value)]
    assert scores and all(s < 0 for s in scores)
    explorer.sign.value = "proponents"
    assert shown(explorer) == expected(result.sdi[:, 1, 2])


def test_checkpoint_selector_ranks_one_checkpoint(explorer, result):
    assert explorer.checkpoint in explorer.children[0].children  # shown: the result kept K = 3 checkpoints
    assert [v for _, v in explorer.checkpoint.options] == list(range(K + 1))
    explorer.query.value, explorer.step.value = 3, 5
    for c in range(K):
        explorer.checkpoint.value = c + 1
        assert shown(explorer) == expected(result.checkpoint_sdi[c, :, 3, 4])
        tracin_cells = re.findall(r'<td class="num muted">([+-][^<]+)</td></tr>', explorer.table.value)
        want = result.checkpoint_sdi[c, shown(explorer), 3].sum(-1)
        assert np.allclose([float(x) for x in tracin_cells], want.numpy(), rtol=6e-3, atol=1e-6)  # shown with 3 digits
    explorer.checkpoint.value = 0
    assert shown(explorer) == expected(result.sdi[:, 3, 4])


def test_no_checkpoint_selector_for_one_checkpoint():
    res = make_result(k=1)
    ex = InfluenceExplorer(res, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=3)
    assert ex.data.n_views == 1
    assert ex.checkpoint not in ex.children[0].children


def test_rank_movement_matches_full_sort(result):
    data = ExplorerData(result, TRAIN_TEXTS, QUERY_TEXTS, k=TOP)
    for view, per_view in enumerate([result.sdi] + list(result.checkpoint_sdi)):
        for q in range(Q):
            for t in range(1, T):
                for sign in ("proponents", "opponents"):
                    r = data.ranking(view, q, t, sign)
                    before = per_view[:, q, t - 1]
                    want = [oracle_rank(before, i, sign == "opponents") for i in r.indices.tolist()]
                    assert r.prev_ranks.tolist() == want
                    assert r.movement.tolist() == [w - (p + 1) for p, w in enumerate(want)]


def test_rank_movement_arrows(explorer, result):
    explorer.query.value, explorer.step.value = 0, 2
    cells = re.findall(r'data-prev-rank="(\d+)"><td[^>]*>\d+</td><td[^>]*>(.*?)</td>', explorer.table.value)
    assert len(cells) == TOP
    for rank, (prev, cell) in enumerate(cells, start=1):
        prev = int(prev)
        assert prev == oracle_rank(result.sdi[:, 0, 0], shown(explorer)[rank - 1], False)
        if prev > TOP:
            assert "new" in cell and f"({prev})" in cell
        elif prev > rank:
            assert f"▲{prev - rank}" in cell
        elif prev < rank:
            assert f"▼{rank - prev}" in cell
        else:
            assert ">=<" in cell


def test_filter_narrows_the_picker(explorer):
    explorer.query.value = 0
    explorer.filter.value = "q3:"
    assert [q for _, q in explorer.query.options] == [3]
    assert explorer.query.value == 3  # the shown query no longer matched: the first match is shown
    explorer.filter.value = "no such prompt"
    assert [q for _, q in explorer.query.options] == [3] and explorer.filter.description == "no match"
    explorer.filter.value = ""
    assert len(explorer.query.options) == Q and explorer.query.value == 3


def test_answers_per_iteration_marked_right_or_wrong(explorer):
    explorer.query.value, explorer.step.value = 1, 2
    strip = explorer.answers.value
    cells = re.findall(r'class="cell mono( right| wrong)?( current)?" data-step="(\d+)"[^>]*>.*?</small> (\d)(✓|✗)</span>',
                       strip)
    assert [int(c[2]) for c in cells] == list(range(1, T + 1))
    for right, current, t, answer, mark in cells:
        assert answer == ANSWERS[1][int(t) - 1]
        assert mark == ("✓" if answer == TRUTH[1] else "✗")
        assert right == (" right" if answer == TRUTH[1] else " wrong")
        assert bool(current) == (int(t) == 2)  # the current iteration is outlined
    label = dict((q, l) for l, q in explorer.query.options)[1]
    assert label.endswith(f"→ {ANSWERS[1][-1]} {'✓' if ANSWERS[1][-1] == TRUTH[1] else '✗'}")


def test_flipped_examples_are_marked(result):
    flipped = expected(result.sdi[:, 0, 0])[:2]
    ex = InfluenceExplorer(result, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP, flipped=flipped)
    rows = re.findall(r'<tr [^>]*data-train-index="(\d+)".*?</tr>', ex.table.value)
    bodies = re.split(r"<tr ", ex.table.value)[1:]
    assert len(rows) == TOP
    for i, body in zip(rows, bodies):
        assert ("⚑ flipped" in body) == (int(i) in flipped)


def plotted(svg: str) -> list[int]:
    """Training indices of the plotted trajectories, strongest first (they are drawn weakest first)."""
    return [int(i) for i in re.findall(r'<polyline class="sdi-line sdi-r\d+" data-train-index="(\d+)"', svg)][::-1]


def test_plot_is_svg_with_legend_and_follows_the_step(explorer, result):
    import ipywidgets

    assert isinstance(explorer.plot, ipywidgets.HTML)  # vector, no binary Image message
    first = explorer.plot.value
    assert first.startswith("<svg") and plotted(first) == shown(explorer)
    legend = re.findall(r'data-role="legend"[^>]*>.*? #(\d+) ', first)
    assert [int(i) for i in legend] == shown(explorer)
    x_now = lambda svg: float(re.search(r'data-role="current-step" x1="([\d.]+)"', svg).group(1))
    explorer.step.value = 4
    svg = explorer.plot.value
    assert plotted(svg) == expected(result.sdi[:, 0, 3]) and x_now(svg) > x_now(first)
    # each line, its bar, its legend entry and its table row share one rank class: CSS links their hover
    for r, i in enumerate(shown(explorer)):
        assert f'<tr class="sdi-r{r}" data-train-index="{i}"' in explorer.table.value
        assert f'class="sdi-line sdi-r{r}" data-train-index="{i}"' in svg
    css = explorer.children[-1].value
    assert ".sdi-x:has(.sdi-r0:hover) tr.sdi-r0>td" in css and ".sdi-x:has(.sdi-r0:hover) polyline.sdi-r0" in css


def test_heat_rows_in_order_of_first_appearance(result):
    data = ExplorerData(result, TRAIN_TEXTS, QUERY_TEXTS, k=TOP)
    want = []
    for t in range(T):
        for i in expected(result.sdi[:, 2, t], opponents=True):
            if i not in want:
                want.append(i)
    assert data.heat_rows(0, 2, "opponents", max_rows=1000) == want
    assert data.heat_rows(0, 2, "opponents", max_rows=5) == want[:5]


def test_heatmap_shows_the_examples_that_reach_the_topk(explorer, result):
    explorer.query.value, explorer.sign.value, explorer.step.value = 2, "opponents", 3
    want = []
    for t in range(T):
        want += [i for i in expected(result.sdi[:, 2, t], opponents=True) if i not in want]
    rows = re.findall(r'<tr data-train-index="(\d+)">(.*?)</tr>', explorer.heatmap.value)
    assert [int(i) for i, _ in rows] == want[:24]
    now = set(expected(result.sdi[:, 2, 2], opponents=True))
    for i, body in rows:
        assert ("▸" in body) == (int(i) in now)
        assert body.count('class="cell cur"') == 1  # the current iteration's cell is outlined
        assert f'title="#{i} t=3: {float(result.sdi[int(i), 2, 2]):+.3g}"' in body


def test_is_a_displayable_widget(explorer):
    import ipywidgets

    assert isinstance(explorer, ipywidgets.VBox)
    if hasattr(explorer, "_repr_mimebundle_"):  # ipywidgets 8
        bundle = explorer._repr_mimebundle_()
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.model_id
    else:  # ipywidgets 7 displays through _ipython_display_
        assert callable(explorer._ipython_display_)


def test_accepts_a_saved_result(result, tmp_path):
    path = result.save(tmp_path / "res.npz")
    ex = InfluenceExplorer(str(path), train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP)
    ex.step.value = 3
    assert shown(ex) == expected(result.sdi[:, 0, 2])


# ------------------------------------------------------------------------------------ static export

def embedded_json(page: str) -> dict:
    payload = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', page, re.S).group(1)
    return json.loads(payload)


def test_save_html_carries_current_state_and_exact_rankings(explorer, result, tmp_path):
    explorer.query.value, explorer.step.value, explorer.sign.value, explorer.checkpoint.value = 4, 5, "opponents", 2
    path = explorer.save_html(tmp_path / "sub" / "explorer.html")
    page = path.read_text(encoding="utf-8")
    d = embedded_json(page)
    assert d["initial"] == {"view": 2, "query": 4, "step": 4, "sign": "opponents"}
    assert (d["k"], d["T"], d["N"]) == (TOP, T, N) and len(d["views"]) == K + 1
    for q in range(Q):
        for t in range(T):
            assert d["data"][0][q]["top"]["proponents"][t] == expected(result.sdi[:, q, t])
            assert d["data"][2][q]["top"]["opponents"][t] == expected(result.checkpoint_sdi[1, :, q, t], opponents=True)
    view = d["data"][0][1]
    for row, i in enumerate(view["rows"]):
        assert np.allclose(view["sdi"][row], result.sdi[i, 1].numpy(), rtol=1e-3)
        assert view["tracin"][row] == pytest.approx(float(result.tracin[i, 1]), rel=1e-3)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing is fetched
    assert not list(tmp_path.glob("sub/*.tmp"))
    assert path.stat().st_mode & 0o044  # readable by others (a web server), not private like a temp file


def test_page_data_is_compact():
    res = make_result(n=3000, q=2, t=4, k=1)
    texts = [f"example {i}" for i in range(3000)]
    d = page_data(ExplorerData(res, texts, ["a", "b"], k=5))
    assert len(d["train"]["index"]) <= 2 * 2 * 4 * 5  # only examples that reach some top-k
    assert all(len(f"{abs(x):e}".split("e")[0].rstrip("0").replace(".", "")) <= 4
               for x in d["data"][0][0]["sdi"][0] if x)


def test_html_escapes_texts_and_json(result, tmp_path):
    nasty = [f"</script><b>{i}&amp;" for i in range(N)]
    path = write_html(result, nasty, QUERY_TEXTS, tmp_path / "x.html", k=3)
    page = path.read_text(encoding="utf-8")
    assert "</script><b>" not in page
    assert embedded_json(page)["train"]["text"][0].startswith("</script><b>")
    fragment = render_html(ExplorerData(result, nasty, QUERY_TEXTS, k=3), full_page=False)
    assert not fragment.lstrip().startswith("<!DOCTYPE") and 'class="sdix"' in fragment


# -------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, error, match", [
    (dict(train_texts=TRAIN_TEXTS[:-1]), ValueError, r"train_texts has 39 entries but the result has N_train"),
    (dict(query_texts=QUERY_TEXTS + ["extra"]), ValueError, r"query_texts has 6 entries .* N_query"),
    (dict(train_texts="0101"), TypeError, r"train_texts must be a list of strings"),
    (dict(train_texts=list(range(N))), TypeError, r"train_texts\[0\] must be a str"),
    (dict(k=N + 1), ValueError, r"k must be an int in \[1, N_train=40\]"),
    (dict(k=0), ValueError, r"k must be an int in \[1, N_train=40\]"),
    (dict(k=2.0), TypeError, r"k must be an int .*got float"),
    (dict(k=True), TypeError, r"k must be an int .*got bool"),
    (dict(flipped=[N]), ValueError, r"flipped indices must lie in \[0, N_train=40\)"),
    (dict(flipped=[0.5]), TypeError, r"flipped must hold integer"),
    (dict(query_answers=[["1"] * T] * (Q - 1)), ValueError, r"query_answers must be N_query=5 lists of T=6"),
    (dict(query_answers=[["1"] * (T - 1)] * Q), ValueError, r"query_answers\[0\] is 5"),
    (dict(query_truth=["1"] * (Q + 1)), ValueError, r"query_truth has 6 entries"),
    (dict(train_labels=["1"] * 3), ValueError, r"train_labels has 3 entries"),
])
def test_bad_inputs_give_clear_errors(result, change, error, match):
    kwargs = dict(train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP, **{})
    kwargs.update(change)
    with pytest.raises(error, match=match):
        InfluenceExplorer(result, **kwargs)


@pytest.mark.parametrize("shape", [(0, Q, T), (N, 0, T), (N, Q, 0)])
def test_empty_result_is_refused(shape):
    n, q, t = shape
    res = InfluenceResult(sdi=torch.zeros(shape), train_sdi=torch.zeros(n, q, 1), tracin=torch.zeros(n, q),
                          etas=torch.ones(1), train_losses=torch.zeros(1, n), query_losses=torch.zeros(1, q))
    with pytest.raises(ValueError, match="the result is empty"):
        InfluenceExplorer(res, train_texts=["x"] * n, query_texts=["y"] * q, k=1)


def test_wrong_result_types_and_values(result, tmp_path):
    with pytest.raises(TypeError, match="result must be an sdi.InfluenceResult or the path"):
        InfluenceExplorer({"sdi": result.sdi}, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS)
    with pytest.raises(TypeError, match="result must be an sdi.InfluenceResult"):
        InfluenceExplorer(result.sdi, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS)
    with pytest.raises(FileNotFoundError, match="result file not found"):
        InfluenceExplorer(tmp_path / "missing.npz", train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS)
    bad = make_result()
    bad.sdi[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="result.sdi contains NaN"):
        InfluenceExplorer(bad, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS)
    bad = make_result()
    bad.tracin = bad.tracin[:-1]
    with pytest.raises(ValueError, match=r"result.tracin must be a tensor of shape \(40, 5\)"):
        InfluenceExplorer(bad, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS)
    with pytest.raises(ValueError, match="sign must be one of"):
        ExplorerData(result, TRAIN_TEXTS, QUERY_TEXTS, k=3).ranking(0, 0, 0, "positive")


# ------------------------------------------------------------------------------ explorer_inputs

def test_explorer_inputs_from_a_looped_model():
    train, queries = parity(12, n_bits=4, seed=0), parity(3, n_bits=4, seed=1)
    train = train.flip_labels(indices=[2, 5])
    model = LoopedGPT(LoopedGPTConfig(vocab_size=train.tokenizer.vocab_size, block_size=train.seq_len,
                                      d_model=16, n_heads=2, n_loops=2), seed=0)
    inputs = explorer_inputs(model, train, queries, n_loops=3)
    assert inputs["train_texts"] == [e.prompt for e in train.examples]
    assert inputs["train_labels"] == [e.answer for e in train.examples] and inputs["flipped"] == [2, 5]
    assert inputs["query_truth"] == [e.answer for e in queries.examples]
    # independent check: the logit-lens argmax at the answer position after every iteration
    with torch.no_grad():
        step_logits = model(queries.tokens, n_loops=3, return_steps=True).step_logits  # (3, Q, L, V)
    pos = queries.seq_len - 1  # parity's one-symbol answer is predicted at the last input position
    want = [[queries.tokenizer.symbols[int(step_logits[t, j, pos].argmax())] for t in range(3)] for j in range(3)]
    assert inputs["query_answers"] == want
    res = make_result(n=12, q=3, t=3, k=1)
    ex = InfluenceExplorer(res, k=4, **inputs)
    assert ex.data.query_answers == want
    with pytest.raises(ValueError, match=r"query_answers must be N_query=3 lists of T=5 .*query_answers\[0\] is 3"):
        InfluenceExplorer(make_result(n=12, q=3, t=5, k=1), k=4, **inputs)  # answers for 3 loops, result for 5
    with pytest.raises(TypeError, match="train_data must be an sdi.tasks.TaskDataset"):
        explorer_inputs(model, train.texts(), queries)


# ------------------------------------------------------------------------------ ties and copies

def tied_result():
    """Rows 0-3 tie at every step (distinct texts); rows 5-9 are copies of one example (same text and label)."""
    res = make_result(k=1)
    res.sdi[0:4] = res.sdi[:, :, :].abs().max() + 1.0   # the four strongest, equal, at every step
    res.sdi[6:10] = res.sdi[5]                            # copies: identical scores
    res.tracin = res.sdi.sum(-1)
    res.checkpoint_sdi = None
    texts = list(TRAIN_TEXTS)
    texts[6:10] = [texts[5]] * 4
    return res, texts


def test_ties_share_a_rank_and_show_no_movement_between_them():
    res, texts = tied_result()
    data = ExplorerData(res, texts, QUERY_TEXTS, k=TOP, train_labels=["1"] * N)
    for t in range(1, T):
        r = data.ranking(0, 0, t, "proponents")
        assert r.indices[:4].tolist() == [0, 1, 2, 3]          # ties in index order, as InfluenceResult.top_k
        assert r.ranks[:4].tolist() == [1, 1, 1, 1] and r.prev_ranks[:4].tolist() == [1, 1, 1, 1]
        assert r.movement[:4].tolist() == [0, 0, 0, 0]           # no false arrows among tied examples
        assert r.ranks[4:].tolist() == list(range(5, TOP + 1))   # after a 4-way tie the next rank is 5
        assert r.indices.tolist() == res.top_k(0, step=t, k=TOP).indices.tolist()[:4] + r.indices.tolist()[4:]
    ex = InfluenceExplorer(res, train_texts=texts, query_texts=QUERY_TEXTS, k=TOP, train_labels=["1"] * N)
    ex.step.value = 3
    cells = re.findall(r'data-rank="(\d+)" data-prev-rank="\d+"><td[^>]*>(\d+)</td><td>(.*?)</td>', ex.table.value)
    assert [c[1] for c in cells[:4]] == ["1"] * 4 and all(">=<" in c[2] for c in cells[:4])


def test_copies_of_one_example_are_one_row():
    res, texts = tied_result()
    data = ExplorerData(res, texts, QUERY_TEXTS, k=TOP, train_labels=["1"] * N)
    assert data.copies[5] == 5 and data.copies[6:10].tolist() == [0] * 4 and data.copies[10:].tolist() == [1] * 30
    distinct = [i for i in range(N) if i not in (6, 7, 8, 9)]
    for q in range(Q):
        for t in range(T):
            for opp in (False, True):
                s = res.sdi[distinct, q, t]
                want = [distinct[j] for j in torch.sort(-s if opp else s, descending=True, stable=True).indices[:TOP]]
                assert data.ranking(0, q, t, "opponents" if opp else "proponents").indices.tolist() == want
    ex = InfluenceExplorer(res, train_texts=texts, query_texts=QUERY_TEXTS, k=N, train_labels=["1"] * N)
    assert ex.data.k == N - 4 and sorted(shown(ex)) == distinct   # every distinct example once
    assert '×5</span>' in ex.table.value
    # the same text with different scores (texts that do not identify the inputs) stays separate
    other = make_result(k=1)
    assert ExplorerData(other, ["same"] * N, QUERY_TEXTS, k=TOP).copies.tolist() == [1] * N


# ------------------------------------------------------------------------------ front-end independence

def widget_tree(w):
    yield w
    for c in getattr(w, "children", ()):
        yield from widget_tree(c)


def test_no_jslink_play_or_image_widget(result, monkeypatch):
    import ipywidgets

    def refuse(*args, **kwargs):
        raise AssertionError("the explorer must not rely on jslink (Colab, ipywidgets 7)")

    monkeypatch.setattr(ipywidgets, "jslink", refuse)
    monkeypatch.setattr(ipywidgets, "jsdlink", refuse)
    ex = InfluenceExplorer(result, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP)
    kinds = {type(w).__name__ for w in widget_tree(ex)}
    assert not kinds & {"Image", "Play", "Link", "DirectionalLink", "Output"}, kinds
    assert isinstance(ex.play, ipywidgets.ToggleButton)


def test_play_runs_in_python_and_stops_at_the_last_iteration(explorer, result):
    import time

    seen = []
    explorer.step.observe(lambda change: seen.append(change["new"]), names="value")
    explorer.interval = 0.01
    explorer.step.value = 2
    seen.clear()
    explorer.play.value = True
    assert explorer.play.description == "❚❚ pause"
    deadline = time.monotonic() + 10
    while explorer.play.value and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not explorer.play.value and explorer.play.description == "▶ play"
    assert seen == list(range(3, T + 1)) and shown(explorer) == expected(result.sdi[:, 0, T - 1])
    seen.clear()
    explorer.play.value = True          # at the last iteration: play starts again from t = 1
    time.sleep(0.03)
    explorer.play.value = False         # pause
    time.sleep(0.05)
    stopped = explorer.step.value
    time.sleep(0.05)
    assert seen[0] == 1 and explorer.step.value == stopped < T
    explorer.interval = 0.7


def test_table_width_is_fixed_while_scrubbing(explorer):
    layouts = set()
    for q in range(Q):
        for sign in ("proponents", "opponents"):
            for t in range(1, T + 1):
                explorer.query.value, explorer.sign.value, explorer.step.value = q, sign, t
                layouts.add(re.search(r'<table class="sdi-top" style="width:(\d+)px"><colgroup>(.*?)</colgroup>',
                                      explorer.table.value).groups())
    assert len(layouts) == 1
    width = int(layouts.pop()[0])
    assert explorer.table.layout.width == f"{width + 4}px"


def test_outputs_take_colours_from_the_theme(explorer):
    css = explorer.children[-1].value
    for var in ("--jp-content-font-color1", "--vscode-editor-foreground", "--jp-ui-font-color2",
                '[data-jp-theme-light="false"]', ".vscode-dark"):
        assert var in css
    for out in (explorer.table, explorer.answers, explorer.plot, explorer.heatmap):
        # no fixed light backgrounds or dark text colours that would vanish in a dark theme
        assert not re.search(r"background:\s*(#f|#e|#d|white|rgb\(2)", out.value), out.value[:200]
        assert not re.search(r"(?<![-\w])color:\s*#[0-5]", out.value)
