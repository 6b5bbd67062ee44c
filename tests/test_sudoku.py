"""The 4x4 Sudoku task: deterministic, every puzzle solvable with a unique solution, rounds as defined, and the
prompts round-trip through the tokenizer. The oracle for solutions is an independent backtracking solver."""

from __future__ import annotations

import random

import pytest
import torch

import sdi
from sdi import sudoku as S


def backtrack(grid: list[int], out: list[tuple[int, ...]]) -> None:
    """All completions of ``grid`` by plain backtracking (independent of sdi.sudoku's 288-grid table)."""
    if 0 not in grid:
        out.append(tuple(grid))
        return
    cell = grid.index(0)
    r, c = divmod(cell, 4)
    for d in range(1, 5):
        row = grid[r * 4:(r + 1) * 4]
        col = grid[c::4]
        br, bc = 2 * (r // 2), 2 * (c // 2)
        box = [grid[(br + i) * 4 + bc + j] for i in range(2) for j in range(2)]
        if d not in row and d not in col and d not in box:
            grid[cell] = d
            backtrack(grid, out)
            grid[cell] = 0


def test_all_solutions_are_the_288_valid_grids():
    found: list[tuple[int, ...]] = []
    backtrack([0] * 16, found)
    assert sorted(found) == list(S.all_solutions())
    assert len(found) == 288


def test_same_seed_same_data_other_seed_other_data():
    a, b = sdi.tasks.sudoku(50, seed=3), sdi.tasks.sudoku(50, seed=3)
    assert a.texts() == b.texts() and [e.hops for e in a.examples] == [e.hops for e in b.examples]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert sdi.tasks.sudoku(50, seed=4).texts() != a.texts()


@pytest.mark.parametrize("n_blanks", [6, 10, 12])
def test_every_puzzle_has_one_solution_and_the_answer_is_its_cell(n_blanks):
    ds = sdi.tasks.sudoku(40, n_blanks=n_blanks, seed=n_blanks)
    for e in ds.examples:
        grid, cell = S.parse_prompt(e.prompt), 15  # the asked cell is the bottom-right one
        assert grid.count(0) == n_blanks and grid[cell] == 0
        found: list[tuple[int, ...]] = []
        backtrack(list(grid), found)
        assert len(found) == 1, e.prompt
        assert e.answer == str(found[0][cell])


def test_round_is_the_first_propagation_round_that_forces_the_cell():
    ds = sdi.tasks.sudoku(60, n_blanks=10, seed=0)
    for e in ds.examples:
        grid, cell = S.parse_prompt(e.prompt), 15  # the asked cell is the bottom-right one
        known = list(grid)
        for r in range(1, e.hops + 1):          # independent re-run of the rounds, one at a time
            forced = {}
            for i in range(16):
                if not known[i]:
                    r_, c_ = divmod(i, 4)
                    seen = {known[j] for j in range(16) if j != i and (
                        j // 4 == r_ or j % 4 == c_ or (j // 8 == i // 8 and (j % 4) // 2 == c_ // 2))}
                    left = {1, 2, 3, 4} - seen
                    if len(left) == 1:
                        forced[i] = left.pop()
            assert (cell in forced) == (r == e.hops), (e.prompt, r)
            for i, d in forced.items():
                known[i] = d


def test_difficulty_knobs():
    fixed = sdi.tasks.sudoku(30, n_blanks=11, rounds=3, seed=1)
    assert {e.hops for e in fixed.examples} == {3}
    mixed = sdi.tasks.sudoku(90, n_blanks=10, max_rounds=3, seed=1)
    assert {e.hops for e in mixed.examples} == {1, 2, 3}
    rng = random.Random(0)
    deeper = [max(S.propagation_rounds(S.draw_puzzle(rng, n))[0]) for n in (6, 12) for _ in range(40)]
    assert sum(deeper[40:]) > sum(deeper[:40])  # more blanks, more rounds


def test_tokenizer_round_trip_and_answer_only_targets():
    ds = sdi.tasks.sudoku(20, seed=2)
    assert ds.seq_len == 20 and ds.tokenizer.symbols == sdi.tasks.SUDOKU_SYMBOLS
    for i, e in enumerate(ds.examples):
        assert ds.tokenizer.decode(ds.tokenizer.encode(e.text)) == e.text
        assert ds.tokenizer.decode(ds.tokens[i]) + ds.tokenizer.decode(ds.targets[i, -1:]) == e.text
        assert S.format_grid(S.parse_grid(e.prompt[:-1])) + "=" == e.prompt
    assert (ds.targets[:, :-1] == sdi.tasks.IGNORE).all()  # the loss counts the answer digit only


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_blanks"):
        sdi.tasks.sudoku(5, n_blanks=13)
    with pytest.raises(ValueError, match="rounds"):
        sdi.tasks.sudoku(5, n_blanks=4, rounds=5)
    with pytest.raises(ValueError, match="n_examples"):
        sdi.tasks.sudoku(0)
    with pytest.raises(ValueError, match="grid"):
        S.parse_grid("12345")
    with pytest.raises(ValueError, match="prompt"):
        S.parse_prompt("1234")


def test_preset_fits_its_data():
    train, test, model_config, train_config = sdi.presets.sudoku_setup(n_train=50)
    assert len(train) == 50 and len(test) == 600
    assert model_config.block_size == train.seq_len == test.seq_len
    assert model_config.vocab_size == train.tokenizer.vocab_size
    assert model_config.n_loops == 1 + max(e.hops for e in train.examples)
    model = sdi.LoopedGPT(model_config)
    assert sdi.tasks.loss_fn(model, train.batch(range(4))).shape == (4,)
