"""4x4 Sudoku with a difficulty knob: how many rounds of constraint propagation a cell needs.

A puzzle is a 4x4 grid with digits ``1..4``, each once per row, column and 2x2 box, some cells blank. An
example asks for the bottom-right cell, which is always blank::

    prompt  "1.3./..2./.4../...."          the grid row by row ("/" between rows, "." blank), then "="
    answer  "3"                            the digit of the bottom-right cell in the (unique) solution

The difficulty of a cell is its **round**: fill every blank cell whose row, column and box leave a single
digit (a *naked single*), all at once, and repeat; the round in which the cell gets filled is its difficulty
(``Example.hops``).
Round 1 cells follow from the givens alone; a round-3 cell needs two layers of intermediate deductions first. A
looped model can do one round of propagation per iteration, so its difficulty is the number of iterations it
plausibly needs. Only puzzles that propagation solves completely (with a unique solution) are drawn.

Why always the last cell: :class:`sdi.LoopedGPT` attends causally, so a position sees only the cells before it.
Moving the asked cell to the end (by a symmetry of the grid: swapping the two row bands, two rows within a band,
the same for columns, and relabelling digits, none of which changes any cell's round) lets the answer position
see the whole puzzle, and keeps where to look fixed — which a small model learns in minutes.

    >>> ds = sudoku(4, seed=0)
    >>> ds.examples[0].prompt, ds.examples[0].answer, ds.examples[0].hops
"""

from __future__ import annotations

import itertools
import random
from functools import lru_cache

from .tasks import Example, TaskDataset, Tokenizer, _check_positive

SUDOKU_SYMBOLS = "1234./="
SIZE, BOX = 4, 2
CELLS = SIZE * SIZE
Grid = tuple[int, ...]  # 16 ints, row major; 0 = blank


def peers(cell: int) -> frozenset[int]:
    """The cells sharing a row, column or box with ``cell`` (0..15, row major), ``cell`` itself excluded."""
    r, c = divmod(cell, SIZE)
    return frozenset(i for i in range(CELLS) if i != cell and _same_unit(r, c, *divmod(i, SIZE)))


def _same_unit(r: int, c: int, r2: int, c2: int) -> bool:
    return r == r2 or c == c2 or (r // BOX == r2 // BOX and c // BOX == c2 // BOX)


FULL = frozenset(range(1, SIZE + 1))
UNITS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(r * SIZE + c for c in range(SIZE)) for r in range(SIZE))                       # rows
    + tuple(tuple(r * SIZE + c for r in range(SIZE)) for c in range(SIZE))                     # columns
    + tuple(tuple((br + i) * SIZE + bc + j for i in range(BOX) for j in range(BOX))            # boxes
            for br in range(0, SIZE, BOX) for bc in range(0, SIZE, BOX)))


@lru_cache(maxsize=1)
def all_solutions() -> tuple[Grid, ...]:
    """Every valid completed 4x4 grid (288 of them), in lexicographic order (rows added one at a time)."""
    grids: list[Grid] = [()]
    for _ in range(SIZE):
        grids = [g + row for g in grids for row in itertools.permutations(range(1, SIZE + 1))
                 if is_valid(g + row + (0,) * (CELLS - len(g) - SIZE))]
    return tuple(grids)


def is_valid(grid: Grid) -> bool:
    """True when no filled digit repeats in a row, column or box (blanks allowed)."""
    _check_grid(grid)
    for unit in UNITS:
        digits = [grid[i] for i in unit if grid[i]]
        if len(digits) != len(set(digits)):
            return False
    return True


def solutions(puzzle: Grid) -> list[Grid]:
    """All completions of ``puzzle`` (by checking it against the 288 grids: brute force is exact and fast)."""
    _check_grid(puzzle)
    return [s for s in all_solutions() if all(p in (0, v) for p, v in zip(puzzle, s))]


PEERS: tuple[frozenset[int], ...] = tuple(peers(i) for i in range(CELLS))


def candidates(grid: Grid, cell: int) -> set[int]:
    """Digits that ``cell`` may still take given the filled cells of ``grid`` (empty set if it is filled)."""
    if grid[cell]:
        return set()
    return set(range(1, SIZE + 1)) - {grid[p] for p in PEERS[cell]}


def propagation_rounds(puzzle: Grid) -> tuple[list[int], Grid]:
    """Rounds of constraint propagation: ``(round of every cell, grid after propagation)``.

    Round 0: given cells. In round ``r`` every blank cell that the grid of round ``r - 1`` forces — its row,
    column and box leave a single digit (a *naked single*) — is filled, all at once. Cells that propagation
    never fills get round ``-1`` (the puzzle then needs other techniques or search).
    """
    _check_grid(puzzle)
    grid = list(puzzle)
    rounds = [0 if v else -1 for v in grid]
    r = 0
    while True:
        r += 1
        forced = {}
        for cell in range(CELLS):
            if not grid[cell]:
                cand = FULL - {grid[p] for p in PEERS[cell]}
                if len(cand) == 1:
                    forced[cell] = next(iter(cand))
        if not forced:
            return rounds, tuple(grid)
        for cell, digit in forced.items():
            grid[cell], rounds[cell] = digit, r


def draw_puzzle(rng: random.Random, n_blanks: int) -> Grid:
    """A puzzle with ``n_blanks`` blank cells, a unique solution, solved by propagation alone.

    A random solution; cells are blanked in a random order, skipping any whose removal would break
    uniqueness or propagation; redrawn until ``n_blanks`` are blank.
    """
    while True:
        solution = rng.choice(all_solutions())
        grid = list(solution)
        order = list(range(CELLS))
        rng.shuffle(order)
        blanks = 0
        for cell in order:
            if blanks == n_blanks:
                break
            grid[cell] = 0
            if -1 in propagation_rounds(tuple(grid))[0]:  # propagation solves => the solution is unique
                grid[cell] = solution[cell]
            else:
                blanks += 1
        if blanks == n_blanks:
            return tuple(grid)


def format_grid(grid: Grid) -> str:
    """``(1, 0, 3, 0, ...)`` -> ``"1.3./..2./..../4..1"``."""
    _check_grid(grid)
    return "/".join("".join(str(v) if v else "." for v in grid[r * SIZE:(r + 1) * SIZE]) for r in range(SIZE))


def parse_grid(text: str) -> Grid:
    """The inverse of :func:`format_grid`."""
    rows = text.split("/")
    if len(rows) != SIZE or any(len(row) != SIZE or set(row) - set("1234.") for row in rows):
        raise ValueError(f"a grid is 4 rows of 4 symbols from '1234.' joined by '/', got {text!r}")
    return tuple(0 if ch == "." else int(ch) for row in rows for ch in row)


def parse_prompt(prompt: str) -> Grid:
    """``"1.3./..2./.4../....="`` -> the grid (its last cell, the asked one, is blank)."""
    if len(prompt) != 20 or prompt[-1] != "=":
        raise ValueError(f"a Sudoku prompt is a grid and '=', like '1.3./..2./.4../....=', got {prompt!r}")
    return parse_grid(prompt[:-1])


def to_last_cell(cell: int, rng: random.Random) -> list[int]:
    """A symmetry of the grid (as ``new[i] = old[perm[i]]``) that moves ``cell`` to the bottom-right corner.

    Rows: swap the bands if the cell is in the top one, swap the band's two rows if it is in the first; columns
    likewise; then transpose with probability 1/2 (the corner stays put). Every such map preserves the Sudoku
    rules and every cell's propagation round.
    """
    r, c = divmod(cell, SIZE)
    rows, cols = list(range(SIZE)), list(range(SIZE))
    for order, x in ((rows, r), (cols, c)):
        if x < BOX:
            order[:] = order[BOX:] + order[:BOX]
        if x % BOX == 0:
            order[SIZE - 2], order[SIZE - 1] = order[SIZE - 1], order[SIZE - 2]
    perm = [rows[i] * SIZE + cols[j] for i in range(SIZE) for j in range(SIZE)]
    if rng.random() < 0.5:
        perm = [perm[j * SIZE + i] for i in range(SIZE) for j in range(SIZE)]
    return perm


def permute(grid: Grid, perm: list[int]) -> Grid:
    return tuple(grid[p] for p in perm)


def sudoku(n_examples: int, n_blanks: int = 10, seed: int = 0, rounds: int | None = None,
           max_rounds: int = 3) -> TaskDataset:
    """4x4 Sudoku puzzles asking for the bottom-right cell; ``Example.hops`` is its propagation round.

    ``n_blanks`` (1..12): blank cells per puzzle — more blanks make deeper puzzles. The asked cell is a blank
    one whose round is ``rounds`` if given, else drawn uniformly from the rounds ``1..max_rounds`` (puzzles are
    redrawn until they hold a cell of the wanted round; rounds above 3 are rare in 4x4 grids). Deterministic in
    ``seed``.
    """
    _check_positive(n_examples=n_examples, n_blanks=n_blanks, max_rounds=max_rounds)
    if n_blanks > 12:
        raise ValueError(f"n_blanks must be <= 12 (a 4x4 Sudoku needs at least 4 givens), got {n_blanks}")
    if rounds is not None and not 1 <= rounds <= n_blanks:
        raise ValueError(f"rounds must lie in [1, n_blanks={n_blanks}], got {rounds}")
    rng = random.Random(seed)
    examples = []
    attempts = 0
    want = rounds if rounds is not None else rng.randint(1, max_rounds)
    while len(examples) < n_examples:
        puzzle = draw_puzzle(rng, n_blanks)
        cell_rounds, solution = propagation_rounds(puzzle)
        cells = [i for i, r in enumerate(cell_rounds) if r == want]
        attempts += 1
        if not cells:
            if attempts > 200 * n_examples + 1000:
                raise ValueError(f"no puzzles with {n_blanks} blanks hold a cell of round {want}; "
                                 f"use more blanks or fewer rounds")
            continue
        perm = to_last_cell(rng.choice(cells), rng)
        digits = [0] + rng.sample(range(1, SIZE + 1), SIZE)  # relabel digits (0, blank, stays)
        puzzle, solution = (tuple(digits[v] for v in permute(g, perm)) for g in (puzzle, solution))
        examples.append(Example(format_grid(puzzle) + "=", str(solution[-1]), hops=want))
        want = rounds if rounds is not None else rng.randint(1, max_rounds)
    return TaskDataset.from_examples("sudoku", Tokenizer(SUDOKU_SYMBOLS), examples)


def _check_grid(grid: Grid) -> None:
    if len(grid) != CELLS or any(not isinstance(v, int) or not 0 <= v <= SIZE for v in grid):
        raise ValueError(f"a grid is 16 ints in 0..4 (0 = blank), got {grid!r}")
