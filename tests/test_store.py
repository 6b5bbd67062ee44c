"""The on-disk feature store: manifest, fingerprints, checksums, atomic writes, streaming influence, precision."""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import sdi
from sdi import store as S
from sdi import featurize as F
from sdi.featurize import query_features
from sdi.fingerprints import model_fingerprint, weights_digest
from sdi.results import StreamTopK
from sdi.storage import STORAGE_DTYPES, from_storage, to_storage
from sdi.tasks import loss_fn, parity

N_TRAIN, N_QUERY, CHUNK, BATCH = 40, 5, 16, 8   # 3 chunks, the last one short
SKETCH_DIM = 256                                  # TensorSketch width m (the default path); exact in one test


def tiny_model(d_model: int = 16) -> sdi.LoopedGPT:
    return sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=7, d_model=d_model, n_heads=2, n_loops=3))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny parity model with 2 checkpoints on disk, its data, and one float32 store of sketched features."""
    root = tmp_path_factory.mktemp("store")
    train, query = parity(N_TRAIN, n_bits=6, seed=0, distinct=True), parity(N_QUERY, n_bits=6, seed=1)
    model = tiny_model()
    run = sdi.train.train(model, train, sdi.TrainConfig(steps=20, n_checkpoints=2, warmup_steps=2, lr=1e-2),
                          checkpoint_dir=root / "ckpts", progress=False)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=SKETCH_DIM, progress=False)
    st = F.featurize(root / "f32", attr, train, run.checkpoints, chunk_size=CHUNK, batch_size=BATCH, progress=False)
    queries = query_features(attr, run.checkpoints, query.batches(N_QUERY), store=st)
    return {"root": root, "train": train, "query": query, "model": model, "attr": attr, "ckpts": run.checkpoints,
            "store": st, "queries": queries}


def featurize(setup, path, **kw):
    kw = {"chunk_size": CHUNK, "batch_size": BATCH, "progress": False, **kw}
    return F.featurize(path, setup["attr"], setup["train"], setup["ckpts"], **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ layout

def test_manifest_and_chunks(setup):
    st, attr, train = setup["store"], setup["attr"], setup["train"]
    m = json.loads((st.root / "manifest.json").read_text())
    assert m["format"] == "sdi-feature-store" and m["version"] == 1 and m["complete"]
    assert m["model"] == model_fingerprint(setup["model"])
    assert m["featurizer"] == json.loads(json.dumps(attr.fingerprint()))
    assert (m["n"], m["chunk_size"], m["n_chunks"], m["dtype"], m["n_steps"], m["batch_size"]) == \
        (N_TRAIN, CHUNK, 3, "float32", 3, BATCH)
    assert m["feature_shape"] == [SKETCH_DIM] and m["featurizer"]["sketch_dim"] == SKETCH_DIM
    for k, c in enumerate(setup["ckpts"]):
        assert m["checkpoints"][k]["eta"] == c.lr and m["checkpoints"][k]["step"] == c.step
        assert m["checkpoints"][k]["sha256"] == weights_digest(c.load_state_dict())
    rows = [S.chunk_rows(N_TRAIN, CHUNK, i) for i in range(3)]
    assert rows == [(0, 16), (16, 32), (32, 40)]
    for k, c in enumerate(setup["ckpts"]):
        # the oracle: features computed directly, in memory, with the same batches
        setup["model"].load_state_dict(c.load_state_dict())
        direct = attr.features(train.batches(BATCH))
        mapped = [st.memmap(k, i) for i in range(3)]
        assert all(isinstance(a, np.memmap) and a.dtype == np.float32 for a in mapped)
        assert torch.equal(torch.from_numpy(np.concatenate(mapped)), direct.features)
        assert torch.equal(st.losses(k), direct.losses)
        for i in range(3):
            rec = m["chunks"][k][i]
            assert rec["rows"] == list(rows[i]) and rec["shape"] == [rows[i][1] - rows[i][0], 3, SKETCH_DIM]
            assert rec["features_crc32"] == zlib.crc32(S.features_path(st.root, k, i).read_bytes())
    assert st.nbytes == 2 * N_TRAIN * 3 * SKETCH_DIM * 4
    assert st.verify() == []


def test_rerun_reuses_everything_and_leaves_bytes_alone(setup, tmp_path):
    path = tmp_path / "s"
    first = featurize(setup, path)
    before = tree_bytes(path)
    again = featurize(setup, path)
    assert (first.stats.computed, first.stats.reused) == (6, 0)
    assert (again.stats.computed, again.stats.reused) == (6 - 6, 6)
    assert tree_bytes(path) == before


# ------------------------------------------------------------------------------------------ influence

def test_store_influence_matches_in_memory_influence(setup):
    """Store path (chunks on disk, features per checkpoint) vs StepInfluence.influence (streams batches)."""
    st, attr = setup["store"], setup["attr"]
    res = st.influence(setup["queries"], step_matrix=True, progress=False)
    ref = attr.influence(setup["train"].batches(BATCH), setup["query"].batches(N_QUERY),
                         checkpoints=[(c.path, c.lr) for c in setup["ckpts"]], step_matrix=True)
    for name in ("sdi", "train_sdi", "tracin", "step_matrix", "checkpoint_sdi", "train_losses", "query_losses", "etas"):
        a, b = getattr(res, name), getattr(ref, name)
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=name)
    assert res.conservation_error() < 1e-5
    assert isinstance(res, sdi.InfluenceResult) and res.meta["fingerprint"] == st.fingerprint


def test_exact_features_store_just_as_well(setup, tmp_path):
    """The store does not care which featurizer made D: exact per-example gradients (D = P) go through unchanged."""
    model, ckpts = setup["model"], setup["ckpts"]
    exact = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    st = F.featurize(tmp_path / "exact", exact, setup["train"], ckpts, chunk_size=CHUNK, batch_size=BATCH,
                     progress=False)
    assert st.feature_shape == (exact.n_params,) and st.fingerprint["kind"] == "exact"
    res = st.influence(query_features(exact, ckpts, setup["query"].batches(N_QUERY), store=st), progress=False)
    ref = exact.influence(setup["train"].batches(BATCH), setup["query"].batches(N_QUERY),
                          checkpoints=[(c.path, c.lr) for c in ckpts])
    torch.testing.assert_close(res.sdi, ref.sdi, rtol=1e-5, atol=1e-6 * float(ref.sdi.abs().max()))
    with pytest.raises(S.StoreMismatchError, match="featurizer/sketch"):
        S.FeatureStore.open(setup["store"].root, attr=exact)


def _stable_top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis by (score descending, index ascending): a full stable sort."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return scores.gather(-1, order), order


@pytest.mark.parametrize("k", [1, 5, N_TRAIN])
def test_streaming_top_k_equals_full_sort(setup, k):
    st = setup["store"]
    res = st.influence(setup["queries"], progress=False)
    top = st.top_k(setup["queries"], k=k, progress=False)
    sdi_qtn = res.sdi.permute(1, 2, 0)                      # (Q, T, N)
    for scores, idx, val, sign in ((sdi_qtn, top.sdi_indices, top.sdi_scores, 1),
                                   (-sdi_qtn, top.sdi_opp_indices, top.sdi_opp_scores, -1),
                                   (res.tracin.T, top.tracin_indices, top.tracin_scores, 1),
                                   (-res.tracin.T, top.tracin_opp_indices, top.tracin_opp_scores, -1)):
        ref_val, ref_idx = _stable_top(scores, k)
        assert torch.equal(idx, ref_idx)
        assert torch.equal(val, sign * ref_val)
    # the same ranking as InfluenceResult.top_k (no ties in this data)
    for q in range(N_QUERY):
        for step in (0, 2, None):
            for opp in (False, True):
                assert torch.equal(top.top_k(q, step, opponents=opp).indices,
                                   res.top_k(q, step, k=k, opponents=opp).indices)


def test_store_scores_carry_the_same_standard_errors_as_in_memory(setup):
    """Every sketched score has an error bar at every scale: store.influence, store.top_k and influence(top_k=k)
    report the standard errors of the in-memory InfluenceResult, each kept score with its own."""
    st, attr = setup["store"], setup["attr"]
    ckpts = [(c.path, c.lr) for c in setup["ckpts"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # m = 256 on this model may warn "sketch too small"
        ref = attr.influence(setup["train"].batches(BATCH), setup["query"].batches(N_QUERY), checkpoints=ckpts)
        res = st.influence(setup["queries"], progress=False)
        top = st.top_k(setup["queries"], k=5, progress=False)
        small = attr.influence(setup["train"].batches(BATCH), setup["query"].batches(N_QUERY), checkpoints=ckpts,
                               top_k=5)
    assert st.sketch_dim == SKETCH_DIM and ref.sdi_se is not None
    for name in ("sdi_se", "train_sdi_se", "tracin_se"):
        a, b = getattr(res, name), getattr(ref, name)
        assert a.shape == b.shape and (b > 0).all(), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.max()), msg=name)
    assert res.meta["predicted_relative_error"] == pytest.approx(ref.meta["predicted_relative_error"], rel=1e-4)
    for t in (top, small):
        for q in range(N_QUERY):
            for step in (0, 2, None):
                for opp in (False, True):
                    got = t.top_k(q, step, k=4, opponents=opp, se=True)
                    want = ref.top_k(q, step, k=4, opponents=opp, se=True)
                    assert torch.equal(got.indices, want.indices)
                    torch.testing.assert_close(got.se, want.se, rtol=1e-5, atol=1e-6 * float(want.se.max()))
    assert top.predicted_relative_error() == pytest.approx(ref.predicted_relative_error(k=5), rel=1e-4)
    unsketched = StreamTopK.from_result(sdi.InfluenceResult(   # scores without errors, as exact features give
        sdi=res.sdi, train_sdi=res.train_sdi, tracin=res.tracin, etas=res.etas, train_losses=res.train_losses,
        query_losses=res.query_losses), k=3)
    assert unsketched.sdi_se is None and torch.equal(unsketched.top_k(0).indices, top.top_k(0, k=3).indices)
    with pytest.raises(ValueError, match="no standard errors"):
        unsketched.top_k(0, se=True)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_streaming_top_k_breaks_ties_like_a_stable_sort(tmp_path, chunk):
    """Small-integer features make exact ties everywhere, across chunk boundaries: the lower index must win."""
    g = torch.Generator().manual_seed(chunk)
    n = 50
    feats = torch.randint(-2, 3, (n, 2, 4), generator=g).float()
    fp = {"kind": "synthetic"}
    header = S.store_header({"sha256": "m"}, [{"name": "c", "step": 1, "eta": 0.5, "sha256": "w"}], fp, n, chunk,
                            "float32")
    root = S.init_store(tmp_path / "s", header)
    for i in range(header["n_chunks"]):
        a, b = S.chunk_rows(n, chunk, i)
        S.write_chunk(root, 0, i, (a, b), feats[a:b], torch.zeros(b - a), "float32", "d")
    st = S.finalize_store(root)
    q = sdi.StepFeatures(torch.randint(-1, 2, (3, 3, 4), generator=g).float(), torch.zeros(3), fp)
    res = st.influence([q], progress=False)
    sdi_qtn = res.sdi.permute(1, 2, 0)
    assert len(torch.unique(sdi_qtn[0, 0])) <= n // 2            # the data really is full of ties
    for k in (1, 3, 10, n):
        top = st.top_k([q], k=k, progress=False)
        for scores, idx, val in ((sdi_qtn, top.sdi_indices, top.sdi_scores),
                                 (-sdi_qtn, top.sdi_opp_indices, -top.sdi_opp_scores),
                                 (res.tracin.T, top.tracin_indices, top.tracin_scores),
                                 (-res.tracin.T, top.tracin_opp_indices, -top.tracin_opp_scores)):
            ref_val, ref_idx = _stable_top(scores, k)
            assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)


def test_top_k_result_file_round_trip(setup, tmp_path):
    top = setup["store"].top_k(setup["queries"], k=3, progress=False)
    back = StreamTopK.load(top.save(tmp_path / "top.npz"))
    for name in StreamTopK.ARRAYS + StreamTopK.ERRORS:
        assert torch.equal(getattr(back, name), getattr(top, name))
    assert back.meta["kind"] == "sdi-topk" and back.meta["fingerprint"] == top.meta["fingerprint"]


def test_full_result_refuses_huge_outputs(setup):
    with pytest.raises(S.StoreError, match="top_k"):
        setup["store"].influence(setup["queries"], max_elements=100, progress=False)


def test_query_list_must_match_checkpoints(setup):
    with pytest.raises(ValueError, match="one per checkpoint"):
        setup["store"].top_k(setup["queries"][:1], k=2)
    with pytest.raises(ValueError, match="k must be"):
        setup["store"].top_k(setup["queries"], k=0)


# ------------------------------------------------------------------------------------------ mismatches

def test_mismatched_model_checkpoint_eta_and_featurizer_are_named(setup):
    st, attr, ckpts = setup["store"], setup["attr"], setup["ckpts"]
    bigger = tiny_model(d_model=24)
    with pytest.raises(S.StoreMismatchError, match="model: the parameter names/shapes differ"):
        S.FeatureStore.open(st.root, attr=sdi.StepInfluence(bigger, bigger.block, loss_fn, progress=False))

    altered = {k: v.clone() for k, v in ckpts[1].load_state_dict().items()}
    altered["block.layers.0.mlp.up.bias"] += 1e-3
    with pytest.raises(S.StoreMismatchError, match=r"checkpoint 1 \(state_dict_1\): its weights differ"):
        S.FeatureStore.open(st.root, checkpoints=[(ckpts[0].path, ckpts[0].lr), (altered, ckpts[1].lr)])
    with pytest.raises(S.StoreMismatchError, match=r"checkpoint 0 .*eta differs"):
        S.FeatureStore.open(st.root, checkpoints=[(ckpts[0].path, 2 * ckpts[0].lr), (ckpts[1].path, ckpts[1].lr)])
    with pytest.raises(S.StoreMismatchError, match="checkpoints: the store has 2"):
        S.FeatureStore.open(st.root, checkpoints=ckpts[:1])

    model = setup["model"]
    for kw, differs in (({"seed": 1}, r"\['seed'\]"), ({"sketch_dim": 128}, r"\['sketch_dim'\]")):
        other = sdi.StepInfluence(model, model.block, loss_fn, **{"sketch_dim": SKETCH_DIM, **kw}, progress=False)
        with pytest.raises(S.StoreMismatchError, match="featurizer/sketch: differs in " + differs):
            S.FeatureStore.open(st.root, attr=other)
    model.block.layers[0].ln1.weight.requires_grad_(False)   # a different parameter set: a different featurizer
    try:
        other = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=SKETCH_DIM, progress=False)
        with pytest.raises(S.StoreMismatchError, match=r"featurizer/sketch: differs in \['params'\]"):
            S.FeatureStore.open(st.root, attr=other)
        with pytest.raises(S.StoreMismatchError, match="featurizer/sketch"):
            query_features(other, ckpts, setup["query"].batches(N_QUERY), store=st)
    finally:
        model.block.layers[0].ln1.weight.requires_grad_(True)
    S.FeatureStore.open(st.root, attr=attr, checkpoints=ckpts)  # the matching ones pass


def test_resume_with_other_settings_or_data_is_refused(setup, tmp_path):
    path = tmp_path / "s"
    featurize(setup, path)
    with pytest.raises(S.StoreMismatchError, match="chunk_size: store 16, now 8"):
        featurize(setup, path, chunk_size=8)
    with pytest.raises(S.StoreMismatchError, match="dtype"):
        featurize(setup, path, dtype="float16")
    with pytest.raises(S.StoreMismatchError, match="batch_size: store 8, now 4"):
        featurize(setup, path, batch_size=4)
    changed = setup["train"].flip_labels(indices=[20])
    with pytest.raises(S.StoreMismatchError, match=r"training data differs in chunk 1 \(rows 16:32\)"):
        F.featurize(path, setup["attr"], changed, setup["ckpts"], chunk_size=CHUNK, batch_size=BATCH, progress=False)


def test_bad_paths_and_incomplete_stores(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature store"):
        S.FeatureStore.open(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(S.StoreError, match="non-empty directory"):
        featurize(setup, tmp_path / "junk")
    path = tmp_path / "s"
    featurize(setup, path)
    m = json.loads((path / "manifest.json").read_text())
    m["complete"] = False
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(S.StoreError, match="incomplete"):
        S.FeatureStore.open(path)
    with pytest.raises(TypeError, match="data must have"):
        F.featurize(tmp_path / "t", setup["attr"], [1, 2, 3], setup["ckpts"])


# ------------------------------------------------------------------------------------------ integrity

def test_corrupted_and_truncated_chunks_are_detected_and_recomputed(setup, tmp_path):
    path = tmp_path / "s"
    featurize(setup, path)
    good = tree_bytes(path)
    flipped, truncated, unrecorded = S.features_path(path, 0, 1), S.features_path(path, 1, 2), S.record_path(path, 1, 0)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01                       # one bit in the middle of the data
    flipped.write_bytes(bytes(raw))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    st = S.FeatureStore.open(path)
    problems = st.verify()
    assert len(problems) == 2
    assert "checkpoint 0 chunk 1" in problems[0] and "CRC-32" in problems[0]
    assert "checkpoint 1 chunk 2" in problems[1] and "truncated" in problems[1]
    with pytest.raises(S.CorruptChunkError, match="features_000001.npy is corrupted"):
        st.read_chunk(0, 1)
    with pytest.raises(S.CorruptChunkError):
        st.top_k(setup["queries"], k=2, progress=False)   # never silently used
    unrecorded.unlink()                               # the manifest still vouches for this chunk
    with pytest.warns(UserWarning, match="recomputing"):
        repaired = featurize(setup, path)
    assert repaired.stats.computed == 2 and len(repaired.stats.repaired) == 2
    assert unrecorded.is_file()
    assert repaired.verify() == []
    assert tree_bytes(path) == good


def test_chunk_writes_are_atomic(setup, tmp_path, monkeypatch):
    path = tmp_path / "s"
    calls = {"n": 0}
    real = np.lib.format.write_array

    def dies_midway(f, array, **kw):
        calls["n"] += 1
        if calls["n"] == 3:                           # the third file: chunk 1's features
            f.write(b"\x93NUMPY partial bytes")
            raise KeyboardInterrupt("killed while writing")
        return real(f, array, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        featurize(setup, path)
    monkeypatch.setattr(np.lib.format, "write_array", real)
    ck = path / "ckpt_000"
    assert sorted(p.name for p in ck.iterdir()) == ["chunk_000000.json", "features_000000.npy", "losses_000000.npy"]
    (ck / ".features_000001.npy.999.tmp").write_bytes(b"stale temp file of a killed writer")
    resumed = featurize(setup, path)
    assert resumed.stats.reused == 1 and resumed.stats.computed == 5
    assert not list(path.rglob("*.tmp"))
    assert tree_bytes(path) == tree_bytes(setup["store"].root)


# ------------------------------------------------------------------------------------------ precision

def test_half_precision_storage_error_is_small(setup, tmp_path):
    ref = setup["store"].influence(setup["queries"], progress=False)
    # tolerance: the unit roundoff of the storage format (2^-11, 2^-8); measured errors are ~20x below it
    for dtype, tol in (("float16", 2.0**-11), ("bfloat16", 2.0**-8)):
        st = featurize(setup, tmp_path / dtype, dtype=dtype)
        assert st.memmap(0, 0).dtype == STORAGE_DTYPES[dtype]
        assert st.nbytes == setup["store"].nbytes // 2
        res = st.influence(setup["queries"], progress=False)
        err = float((res.sdi - ref.sdi).norm() / ref.sdi.norm())
        assert 0 < err < tol, (dtype, err)
        assert res.conservation_error() < 1e-5     # conservation holds whatever the storage precision


def test_storage_conversions():
    x = torch.tensor([[1.0, -2.5e-3, 3.14159, 1e30]])
    assert torch.equal(from_storage(to_storage(x, "bfloat16"), "bfloat16"), x.bfloat16().float())
    assert to_storage(x, "bfloat16").dtype == np.uint16
    small = x[:, :3]
    assert torch.equal(from_storage(to_storage(small, "float16"), "float16"), small.half().float())
    with pytest.raises(S.StoreError, match="float16's range"):
        to_storage(torch.tensor([7e4]), "float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        S.store_header({}, [], {}, 10, 4, "float64")
