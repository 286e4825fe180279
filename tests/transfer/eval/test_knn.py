"""Weighted cosine kNN: hand-checked votes, chunking, entry point, val labels by train class
names, results file location, unreadable images, 2 processes == 1 process."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import act_as_launcher, free_port, run_module

from pretrain.config import ConfigError
from pretrain.probe.knn import knn_accuracy, knn_classify
from transfer.eval import knn as knn_eval
from transfer.eval.knn import main


def test_weighted_vote_hand_checked():
    # query along x; bank: one class-0 point very close, two class-1 points further away
    bank = np.array([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6], [-1.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    q = np.array([[1.0, 0.0]])
    sims = (bank / np.linalg.norm(bank, axis=1, keepdims=True)) @ np.array([1.0, 0.0])
    w = np.exp(sims / 0.07)
    # k=3: class 0 weight w0 vs class 1 weight w1 + w2; T=0.07 makes the close point win
    assert w[0] > w[1] + w[2]
    assert knn_classify(bank, labels, q, ks=(1, 3))[3][0] == 0
    # a hot temperature turns it into a near-majority vote: class 1 wins
    assert knn_classify(bank, labels, q, ks=(3,), temperature=100.0)[3][0] == 1
    # k larger than the bank is capped; the far class-2 point adds almost nothing
    assert knn_classify(bank, labels, q, ks=(200,))[200][0] == 0


def test_chunking_and_scale_invariance():
    rng = np.random.default_rng(0)
    bank, labels = rng.normal(size=(300, 16)), rng.integers(0, 5, 300)
    q = rng.normal(size=(77, 16))
    a = knn_classify(bank, labels, q, ks=(20, 200), chunk_size=8)
    b = knn_classify(bank * 3.0, labels, q * 0.5, ks=(20, 200), chunk_size=1000)
    for k in (20, 200):
        np.testing.assert_array_equal(a[k], b[k])
    # queries equal to bank rows with k=1 recover the bank labels
    acc = knn_accuracy(bank, labels, bank, labels, ks=(1,))
    assert acc["top1_k1"] == 100.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 2)), temperature=0)
    with pytest.raises(ValueError, match="differ"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 3)))


def _exact_votes(bank, labels, q, k, temperature):
    """float64 reference: exp(sim / T) summed per class over the k most similar rows."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    qq = q / np.linalg.norm(q, axis=1, keepdims=True)
    sim = qq @ b.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sim, idx, 1)
    w = np.exp((s - s[:, :1]) / temperature)  # scaled per row: same argmax as exp(sim / T)
    votes = np.zeros((q.shape[0], labels.max() + 1))
    for r in range(q.shape[0]):
        np.add.at(votes[r], labels[idx[r]], w[r])
    return votes.argmax(1)


def _two_cluster_problem(n_per_class=20):
    rng = np.random.default_rng(3)
    centres = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    bank = np.concatenate([c + 0.05 * rng.normal(size=(n_per_class, 4)) for c in centres])
    labels = np.repeat([0, 1], n_per_class)
    q = np.concatenate([c + 0.05 * rng.normal(size=(10, 4)) for c in centres])
    return bank, labels, q, np.repeat([0, 1], 10)


@pytest.mark.parametrize("temperature", [0.0113, 0.01, 0.005, 1e-3, 1e-5, 1e-40, 1e-300])
def test_small_temperature_does_not_overflow(temperature):
    # exp(sim / T) overflows float32 for T below ~0.0113: the vote is max-subtracted
    bank, labels, q, y = _two_cluster_problem()
    acc = knn_accuracy(bank, labels, q, y, ks=(1, 3, 20), temperature=temperature)
    assert acc == {"top1_k1": 100.0, "top1_k3": 100.0, "top1_k20": 100.0}


@pytest.mark.parametrize("temperature", [0.07, 0.02, 0.5, 10.0])
def test_max_subtracted_vote_matches_the_exact_vote(temperature):
    # where exp(sim / T) does not overflow, the predictions are those of the plain vote
    rng = np.random.default_rng(1)
    bank, labels = rng.normal(size=(200, 8)), rng.integers(0, 4, 200)
    q = rng.normal(size=(50, 8))
    for k in (1, 5, 20, 200):
        got = knn_classify(bank, labels, q, ks=(k,), temperature=temperature)[k]
        np.testing.assert_array_equal(got, _exact_votes(bank, labels, q, k, temperature))


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -float("inf"), 0.0, -0.07])
def test_non_finite_or_non_positive_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 2)), temperature=temperature)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_are_refused(bad):
    bank = np.ones((3, 2))
    bank[1, 0] = bad
    with pytest.raises(ValueError, match="bank features contain NaN"):
        knn_classify(bank, [0, 1, 1], np.ones((1, 2)))
    with pytest.raises(ValueError, match="query features contain NaN"):
        knn_classify(np.ones((3, 2)), [0, 1, 1], bank)


@pytest.mark.parametrize("chunk", [0, -1])
def test_non_positive_chunk_size_is_refused(chunk):
    with pytest.raises(ValueError, match="chunk_size"):
        knn_classify(np.ones((2, 2)), [0, 1], np.ones((1, 2)), chunk_size=chunk)


def test_evaluation_uses_the_shared_implementation():
    # one kNN for the online probe and the offline evaluation: no second copy in transfer/
    assert knn_eval.knn_classify is knn_classify and knn_eval.knn_accuracy is knn_accuracy


@pytest.fixture(scope="module")
def tiny(tiny_trees, tiny_backbone):
    return tiny_trees, tiny_backbone


def test_entry_point_on_tiny_tree(tiny, tmp_path):
    root, weights = tiny
    out = tmp_path / "out"
    assert main(["--config", "knn_tiny", "--weights", str(weights),
                 f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "knn_results.json").read_text())
    assert res["num_train"] == 24 and res["num_val"] == 12
    assert res["top1_k1"] > 60.0  # colour classes: well above the 33% chance level
    assert (out / "features" / "train_pool5.feats.npy").is_file()


@pytest.mark.dist
def test_two_processes_equal_one(tiny, tmp_path):
    root, weights = tiny
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        args = ["--config", "knn_tiny", "--weights", str(weights), "--output-dir", str(out),
                f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}"]  # fmt: skip
        run_module("transfer.eval.knn", args, nproc=nproc)
        results.append(json.loads((out / "knn_results.json").read_text()))
        feats = np.load(out / "features" / "train_pool5.feats.npy")
        if nproc == 1:
            ref = feats
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-6)
    for key in ("top1_k1", "top1_k3", "num_train"):
        assert results[0][key] == results[1][key]


def _subset_tree(src, dst, classes):
    """A copy of the ImageFolder tree ``src`` holding only ``classes``."""
    for c in classes:
        shutil.copytree(src / c, dst / c)
    return dst


@pytest.mark.parametrize("val_classes", [["c1", "c2"], ["c0", "c2"], ["c2"]])
def test_val_tree_missing_classes_keeps_the_train_labels(tiny, tmp_path, val_classes):
    root, weights = tiny
    full = tmp_path / "full"
    args = ["--config", "knn_tiny", "--weights", str(weights), f"data.train_root={root / 'train'}"]
    assert main(args + [f"data.val_root={root / 'val'}", "--output-dir", str(full)]) == 0
    bank = np.load(full / "features" / "train_pool5.feats.npy")
    bank_y = np.load(full / "features" / "train_pool5.labels.npy")
    queries = np.load(full / "features" / "val_pool5.feats.npy")
    query_y = np.load(full / "features" / "val_pool5.labels.npy")
    part = _subset_tree(root / "val", tmp_path / "val_part", val_classes)
    out = tmp_path / "part"
    assert main(args + [f"data.val_root={part}", "--output-dir", str(out)]) == 0
    res = json.loads((out / "knn_results.json").read_text())
    # the same images, judged against the same labels as in the full run
    keep = np.isin(query_y, [int(c[1:]) for c in val_classes])
    for k in (1, 3):
        pred = knn_classify(bank, bank_y, queries[keep], ks=(k,))[k]
        assert res[f"top1_k{k}"] == pytest.approx(100.0 * np.mean(pred == query_y[keep]))
    assert res["top1_k1"] > 60.0 and res["num_val"] == 4 * len(val_classes)


def test_val_class_unknown_to_train_is_an_error(tiny, tmp_path, capsys):
    root, weights = tiny
    val = _subset_tree(root / "val", tmp_path / "val", ["c0", "c1"])
    shutil.copytree(root / "val" / "c2", val / "zebra")
    assert main(["--config", "knn_tiny", "--weights", str(weights),
                 f"data.train_root={root / 'train'}", f"data.val_root={val}", "--output-dir",
                 str(tmp_path / "o")]) == 2  # fmt: skip
    assert "zebra" in capsys.readouterr().err


def test_results_written_without_output_dir(tiny, tmp_path, monkeypatch, capsys):
    root, weights = tiny
    monkeypatch.chdir(tmp_path)
    base = ["--config", "knn_tiny", "--weights", str(weights),
            f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}"]  # fmt: skip
    assert main(base) == 0
    written = tmp_path / "outputs" / "knn" / "knn_results.json"
    res = json.loads(written.read_text())
    assert res["top1_k1"] > 60.0 and res["unreadable_images"] == {"train": 0, "val": 0}
    out = capsys.readouterr().out
    assert "outputs/knn/knn_results.json" in out and "top1_k1" in out
    # an output_dir that cannot be a folder (a file is there): results printed, reason logged
    (tmp_path / "afile").write_text("x")
    assert main(base + ["--output-dir", str(tmp_path / "afile")]) == 0
    out = capsys.readouterr().out
    assert "top1_k1" in out and "cannot be written" in out
    # explicitly empty: nothing written, still printed
    assert main(base + ["output_dir="]) == 0
    assert "top1_k1" in capsys.readouterr().out


@pytest.mark.parametrize("split", ["train", "val"])
def test_unreadable_images_counted_in_results(tiny, tmp_path, split):
    root, weights = tiny
    tree = tmp_path / "data"
    shutil.copytree(root / "train", tree / "train")
    shutil.copytree(root / "val", tree / "val")
    (tree / split / "c1" / "img001.png").write_bytes(b"broken")
    (tree / split / "c2" / "zz_empty.png").write_bytes(b"")
    out = tmp_path / "out"
    assert main(["--config", "knn_tiny", "--weights", str(weights),
                 f"data.train_root={tree / 'train'}", f"data.val_root={tree / 'val'}",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "knn_results.json").read_text())
    other = "val" if split == "train" else "train"
    assert res["unreadable_images"] == {split: 2, other: 0}
    assert res["num_train"] == 24 - (split == "train")  # one replaced, one added
    assert res["num_val"] == 12 - (split == "val")
    assert main(["--config", "knn_tiny", "--weights", str(weights), "--output-dir",
                 str(tmp_path / "strict"), f"data.train_root={tree / 'train'}",
                 f"data.val_root={tree / 'val'}", "data.strict=true"]) == 2  # fmt: skip


@pytest.mark.parametrize(
    "override, needle",
    [
        ("knn.temperature=nan", "knn.temperature"),
        ("knn.temperature=.inf", "knn.temperature"),
        ("knn.temperature=0", "knn.temperature"),
        ("knn.temperature=-0.07", "knn.temperature"),
        ("knn.chunk_size=0", "knn.chunk_size"),
        ("knn.chunk_size=-4", "knn.chunk_size"),
    ],
)
def test_bad_knn_settings_are_refused_naming_the_key(tiny, tmp_path, capsys, override, needle):
    root, weights = tiny
    code = main(["--config", "knn_tiny", "--weights", str(weights), "--output-dir",
                 str(tmp_path / "o"), f"data.train_root={root / 'train'}",
                 f"data.val_root={root / 'val'}", override])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not (tmp_path / "o" / "knn_results.json").exists()


def test_order_keys_sort_by_similarity_then_lower_index():
    from pretrain.probe.knn import _decode_keys, _order_keys

    sims = torch.tensor([[0.5, -0.25, 1.0, -1.0, 0.0, -0.0, 0.5, 3e-39, -3e-39]])
    index = torch.tensor([7, 1, 4, 0, 2, 3, 5, 6, 8]) + (1 << 31)  # large indices too
    keys = _order_keys(sims, index)
    got_sim, got_idx = _decode_keys(keys)
    assert torch.equal(got_sim.view(torch.int32), sims.view(torch.int32))  # bit-exact, -0.0 too
    assert torch.equal(got_idx, index[None])
    order = keys.argsort(dim=1, descending=True)[0].tolist()
    expected = sorted(range(9), key=lambda j: (-sims[0, j].item(), index[j].item()))
    assert order == expected  # +0.0 (index 2) before -0.0 (index 3) here by index as well
    assert order[:3] == [2, 6, 0]  # 1.0, then the two 0.5s: the lower index (5 < 7) first


def test_tied_neighbours_are_taken_in_bank_order():
    # two identical bank rows with different labels: k = 1 takes the one listed first
    bank = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.0]])
    assert knn_classify(bank, [1, 0, 0], q, ks=(1,))[1][0] == 1
    assert knn_classify(bank, [0, 1, 0], q, ks=(1,))[1][0] == 0


def test_bank_blocks_do_not_change_predictions():
    rng = np.random.default_rng(5)
    bank, labels = rng.normal(size=(300, 6)), rng.integers(0, 5, 300)
    q = rng.normal(size=(40, 6))
    whole = knn_classify(bank, labels, q, ks=(1, 7, 50, 300), chunk_size=16)
    for block in (1, 7, 64, 299):
        got = knn_classify(bank, labels, q, ks=(1, 7, 50, 300), chunk_size=16, bank_block=block)
        for k in whole:
            np.testing.assert_array_equal(got[k], whole[k], err_msg=f"bank_block={block} k={k}")
    with pytest.raises(ValueError, match="bank_block"):
        knn_classify(bank, labels, q, bank_block=0)


def _sharded_worker(rank, world, port, out_dir, splits):
    import os

    import torch.distributed as tdist

    from pretrain.dist import cleanup, init_distributed

    act_as_launcher(rank, world, port)
    torch.set_num_threads(1)
    init_distributed("cpu")
    bank, labels, q = _sharded_problem()
    out = {}
    for name, cut in splits.items():
        lo, hi = (0, cut) if rank == 0 else (cut, len(bank))
        out[name] = knn_classify(bank[lo:hi], labels[lo:hi], q, ks=(1, 5, 40, 400),
                                 chunk_size=32, sharded=True, bank_block=50)  # fmt: skip
    shard = bank[rank * 200 : (rank + 1) * 200].copy()
    if rank == 1:
        shard[5, 0] = np.nan  # refused on rank 1: both ranks raise, neither waits alone
    try:
        knn_classify(shard, labels[rank * 200 : (rank + 1) * 200], q, sharded=True)
    except ValueError as exc:
        out["refused"] = str(exc)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    tdist.barrier()
    cleanup()


def _sharded_problem():
    rng = np.random.default_rng(11)
    bank = rng.normal(size=(400, 8)).astype(np.float32)
    bank[200:210] = bank[0]  # duplicates across the shards, some with other labels
    labels = rng.integers(0, 6, 400)
    q = np.concatenate([rng.normal(size=(70, 8)), bank[:5]]).astype(np.float32)
    return bank, labels, q


@pytest.mark.dist
def test_sharded_bank_on_two_ranks_equals_one_process(tmp_path):

    import torch.multiprocessing as mp

    port = free_port()
    # uneven shards, a shard smaller than k, and an empty shard on rank 0
    splits = {"even": 200, "uneven": 37, "tiny": 3, "empty": 0}
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path), splits), nprocs=2, join=True)
    bank, labels, q = _sharded_problem()
    one = knn_classify(bank, labels, q, ks=(1, 5, 40, 400), chunk_size=32)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name in splits:
            for k in one:
                np.testing.assert_array_equal(got[name][k], one[k], err_msg=f"{name} k={k}")
        expected = "NaN or infinite" if rank == 1 else "the inputs of rank 1 were refused"
        assert expected in got["refused"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_bank_is_normalised_and_votes_like_fp32(precision):
    from pretrain.probe.knn import bank_tensor

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(5, 32)) * 4
    labels = rng.integers(0, 5, 600)
    bank = (centres[labels] + rng.normal(size=(600, 32))).astype(np.float32) * 7.0
    q_y = rng.integers(0, 5, 120)
    q = (centres[q_y] + rng.normal(size=(120, 32))).astype(np.float32)
    half = bank_tensor(bank, precision, block=64)
    assert half.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.testing.assert_close(half.float().norm(dim=1), torch.ones(600), atol=1e-2, rtol=0)
    full = knn_classify(bank, labels, q, ks=(5, 50))
    got = knn_classify(half, labels, q, ks=(5, 50), bank_block=100)
    for k in full:  # well-separated classes: half-precision rounding changes no vote
        np.testing.assert_array_equal(got[k], full[k])
    assert bank_tensor(bank, "fp32").data_ptr() == bank.ctypes.data  # fp32: no copy
    with pytest.raises(ConfigError, match="bank_precision 'int8'"):
        bank_tensor(bank, "int8")


def test_entry_point_with_a_bf16_bank(tiny, tmp_path):
    root, weights = tiny
    res = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["--config", "knn_tiny", "--weights", str(weights),
                     f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}",
                     "--output-dir", str(out), f"knn.bank_precision={precision}"]) == 0  # fmt: skip
        res[precision] = json.loads((out / "knn_results.json").read_text())
    assert res["bf16"]["bank_precision"] == "bf16" and res["fp32"]["bank_precision"] == "fp32"
    assert res["bf16"]["num_train"] == res["fp32"]["num_train"] == 24
    assert abs(res["bf16"]["top1_k1"] - res["fp32"]["top1_k1"]) <= 100.0 / 12  # one query at most
    assert main(["--config", "knn_tiny", "--weights", str(weights),
                 f"data.train_root={root / 'train'}", f"data.val_root={root / 'val'}",
                 "knn.bank_precision=fp8"]) == 2  # fmt: skip
