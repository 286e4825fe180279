"""VOC07 SVM: solver vs liblinear, cost choice vs scikit-learn, reading VOC trees, the whole path
and its errors, classes without positives, duplicate listings, low-shot modes, two processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from helpers import REPO, VOC_TINY_CLASSES, make_voc_tree, make_weights, run_module
from sklearn.model_selection import cross_val_score
from sklearn.svm import LinearSVC

from transfer.eval import svm as svm_mod
from transfer.eval.low_shot import low_shot_original
from transfer.eval.svm import (
    SVMError,
    augment,
    cross_validate_svms,
    fit_batched,
    fit_svms,
    l2_normalize,
)
from transfer.eval.voc07_data import VOCError, find_voc2007, read_split
from transfer.eval.voc07_svm import main, protocol_costs, train_and_test_svms

COSTS = protocol_costs()


def test_the_cost_list_is_read_when_needed_not_at_import():
    # an audit hook sees every file opened: importing the module opens no recipe
    code = """
import json, sys
opened = []
sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" else None)
import transfer.eval.voc07_svm as v
at_import = [p for p in opened if p.endswith(".yaml")]
costs = v.protocol_costs()
print(json.dumps([at_import, [p for p in opened if p.endswith(".yaml")], list(costs)]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    at_import, later, costs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert at_import == [] and any(p.endswith("voc07_svm.yaml") for p in later)
    assert costs == list(COSTS) and costs[0] == 0.01 and protocol_costs() is protocol_costs()


# ----------------------------------------------------------------------------- solver


def _features(n=150, d=24, k=3, seed=0, noise=0.5):
    rng = np.random.default_rng(seed)
    lat = rng.normal(size=(n, k))
    x = np.maximum(0.0, lat @ rng.normal(size=(k, d)) + noise * rng.normal(size=(n, d)))
    labels = np.where(lat + 0.8 * rng.normal(size=(n, k)) > 0.8, 1, -1)
    labels[(labels == 1) & (rng.random((n, k)) < 0.1)] = 0
    return l2_normalize(x), labels


def _ref_svc(cost):
    return LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, tol=1e-4,
                     max_iter=2000, dual=True, loss="squared_hinge", penalty="l2")  # fmt: skip


@pytest.mark.parametrize("cost", [0.1, 10.0])
def test_solver_reaches_the_liblinear_solution(cost):
    x, labels = _features()
    y = np.where(labels[:, 0] == 1, 1.0, -1.0)
    ref = _ref_svc(cost).fit(x, y)
    c = np.where(y > 0, 2.0, 1.0) * cost
    w, info = fit_batched(augment(x), y[:, None], c[:, None], tol=1e-8)
    assert info["converged"].all()
    w_ref = np.r_[ref.coef_.ravel(), ref.intercept_]
    assert np.linalg.norm(w[:, 0] - w_ref) <= 1e-3 * np.linalg.norm(w_ref)


def test_chosen_cost_matches_sklearn_cross_val_score():
    x, labels = _features()
    res = cross_validate_svms(x, labels, COSTS)
    for j in range(labels.shape[1]):
        yb = np.where(labels[:, j] == 1, 1, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            means = [
                cross_val_score(_ref_svc(c), x, yb, cv=3, scoring="average_precision").mean()
                for c in COSTS
            ]
        # liblinear stops at max_iter=2000 before the optimum for C >= 50 on this data; below
        # that both solvers reach the same SVM, hence the same held-out rankings
        np.testing.assert_allclose(res.cv_ap[j].mean(1)[:8], means[:8], atol=2e-3)
        assert res.best_cost_index[j] == int(np.argmax(means)), (j, means)
    assert sorted(set(res.best_cost_index.tolist())) == [1, 2]  # a non-trivial choice


def test_bad_labels_and_costs():
    x, labels = _features(n=30)
    with pytest.raises(SVMError, match="labels must be 1, -1 or 0"):
        cross_validate_svms(x, labels * 2, [1.0])
    with pytest.raises(SVMError, match="positive numbers"):
        cross_validate_svms(x, labels, [0.0, 1.0])


# ----------------------------------------------------------------------------- whole path


def test_voc_tree_reading_errors(tmp_path):
    with pytest.raises(VOCError, match="not a VOC2007 folder"):
        find_voc2007(tmp_path)
    voc = make_voc_tree(tmp_path, n_trainval=6, n_test=6)
    (voc / "ImageSets" / "Main" / "bird_test.txt").write_text("000006 2\n")
    with pytest.raises(VOCError, match=r"bird_test.txt:1: expected"):
        read_split(voc, "test", VOC_TINY_CLASSES)


def test_whole_svm_path_on_tiny_vocdevkit(tmp_path, capsys):
    voc = make_voc_tree(tmp_path / "data")
    ids, labels = read_split(voc, "trainval", VOC_TINY_CLASSES)
    assert len(ids) == 30 and set(np.unique(labels)) == {-1, 0, 1}
    weights = make_weights(tmp_path / "w.pth")
    out = tmp_path / "out"
    args = ["--config", "voc07_svm_tiny", f"data.voc_root={tmp_path / 'data' / 'VOCdevkit'}",
            "--weights", str(weights), "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "voc07_svm_results.json").read_text())
    assert list(res["classes"]) == list(VOC_TINY_CLASSES)
    assert res["num_train"] == 30 and res["num_test"] == 24
    for cls in VOC_TINY_CLASSES:
        entry = res["classes"][cls]
        assert entry["cost"] in COSTS
        assert len(entry["cv_ap"]) == len(COSTS)
        assert all(len(v["folds"]) == 3 for v in entry["cv_ap"].values())
        assert 0.0 <= entry["ap"] <= 100.0
    assert res["mAP"] == pytest.approx(np.mean([v["ap"] for v in res["classes"].values()]))
    # colour classes are easy even for random features
    assert res["mAP"] > 60.0
    assert "mAP" in capsys.readouterr().out
    for split in ("trainval", "test"):
        assert (out / "features" / f"{split}_pool5.feats.npy").is_file()
    # rerun: features come from the cache (same numbers), liblinear solver agrees on the costs
    stamp = (out / "features" / "test_pool5.feats.npy").stat().st_mtime_ns
    assert main(args + ["svm.solver=liblinear", "svm.n_jobs=1"]) == 0
    assert (out / "features" / "test_pool5.feats.npy").stat().st_mtime_ns == stamp
    res2 = json.loads((out / "voc07_svm_results.json").read_text())
    assert res2["solver"] == "liblinear"
    assert res2["mAP"] == pytest.approx(res["mAP"], abs=0.5)


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["--config", "voc07_svm_tiny", f"data.voc_root={tmp_path}",
                 "--weights", "x.pth", "--output-dir", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "error:" in capsys.readouterr().err
    assert main(["--config", "voc07_svm_tiny", "svm.costz=1"]) == 2
    assert "unknown config key 'svm.costz'" in capsys.readouterr().err


def test_row_mask_equals_training_on_the_subset():
    x, labels = _features(n=90)
    rng = np.random.default_rng(1)
    mask = rng.random(labels.shape) < 0.7
    costs = [0.1, 1.0, 10.0]
    res = cross_validate_svms(x, labels, costs, row_mask=mask)
    for j in range(labels.shape[1]):
        rows = np.nonzero(mask[:, j])[0]
        sub = cross_validate_svms(x[rows], labels[rows, j], costs)
        np.testing.assert_allclose(res.cv_ap[j], sub.cv_ap[0], atol=1e-9)
        np.testing.assert_allclose(res.weights[j], sub.weights[0], rtol=1e-5, atol=1e-7)


def test_low_shot_mode():
    from transfer.eval.low_shot import low_shot_svms

    x, labels = _features(n=150, seed=0)
    cfg = {"solver": "newton", "costs": [0.1, 1.0], "positive_weight": 2.0,
           "negative_weight": 1.0, "folds": 3, "intercept_scaling": 1.0,
           "newton_tol": 1e-6}  # fmt: skip
    out = low_shot_svms(x[:100], labels[:100], x[100:], labels[100:], cfg, [1, 8], 2, seed=0)
    assert set(out) == {"1", "8"} and all(len(v["mAPs"]) == 2 for v in out.values())
    assert all(0.0 <= m <= 100.0 for v in out.values() for m in v["mAPs"])
    assert out["8"]["mAP_mean"] > out["1"]["mAP_mean"] - 5.0  # more shots do not hurt much
    again = low_shot_svms(x[:100], labels[:100], x[100:], labels[100:], cfg, [1, 8], 2, seed=0)
    assert again == out


def _set_labels(voc, cls, split, mapping):
    path = voc / "ImageSets" / "Main" / f"{cls}_{split}.txt"
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(f"{i} {mapping(i, lab)}\n" for i, lab in rows))
    return path


@pytest.mark.parametrize("split", ["trainval", "test"])
@pytest.mark.parametrize("kind", ["all_negative", "only_difficult"])
def test_class_without_a_positive_is_an_error(tmp_path, split, kind):
    voc = make_voc_tree(tmp_path, n_trainval=12, n_test=12)
    new = "-1" if kind == "all_negative" else None
    _set_labels(voc, "bird", split, lambda i, lab: new or ("0" if lab == "1" else lab))
    with pytest.raises(VOCError, match=rf"bird_{split}.txt: class 'bird' has no positive"):
        read_split(voc, split, VOC_TINY_CLASSES)
    read_split(voc, "test" if split == "trainval" else "trainval", VOC_TINY_CLASSES)


def test_no_positive_after_reading_is_an_error_naming_the_class():
    x, labels = _features(n=60)
    labels[:, 1] = np.where(labels[:, 1] == 1, -1, labels[:, 1])
    cfg = {"solver": "newton", "costs": [1.0], "positive_weight": 2.0, "negative_weight": 1.0,
           "folds": 3, "intercept_scaling": 1.0, "newton_tol": 1e-6}  # fmt: skip
    names = ["cat", "dog", "cow"]
    with pytest.raises(VOCError, match=r"training labels: class\(es\) \['dog'\]"):
        train_and_test_svms(x, labels, x, labels, names, cfg)
    ok = _features(n=60)[1]
    with pytest.raises(VOCError, match=r"test labels: class\(es\) \['dog'\]"):
        train_and_test_svms(x, ok, x, labels, names, cfg)


def test_whole_path_refuses_a_class_without_training_positive(tmp_path, capsys):
    voc = make_voc_tree(tmp_path / "data", n_trainval=12, n_test=9)
    _set_labels(voc, "aeroplane", "trainval", lambda i, lab: "-1")
    weights = make_weights(tmp_path / "w.pth")
    assert main(["--config", "voc07_svm_tiny", f"data.voc_root={voc}", "--weights",
                 str(weights), "--output-dir", str(tmp_path / "o")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "aeroplane_trainval.txt: class 'aeroplane' has no positive" in err
    assert not (tmp_path / "o" / "voc07_svm_results.json").exists()  # no AP 100.00 report


@pytest.mark.parametrize("first, second", [("1", "-1"), ("-1", "0"), ("0", "1")])
def test_image_listed_twice_with_conflicting_labels(tmp_path, first, second):
    voc = make_voc_tree(tmp_path, n_trainval=12, n_test=6)
    path = _set_labels(voc, "bird", "trainval", lambda i, lab: lab)
    lines = path.read_text().splitlines()
    img = lines[4].split()[0]
    lines[4] = f"{img} {first}"
    lines.append(f"{img} {second}")
    path.write_text("\n".join(lines) + "\n")
    msg = rf"bird_trainval.txt:13: image {img} is listed again with label {second}; line 5 "
    with pytest.raises(VOCError, match=msg + f"gives it {first}"):
        read_split(voc, "trainval", VOC_TINY_CLASSES)


def test_image_listed_twice_with_the_same_label_is_kept_once(tmp_path, caplog):
    voc = make_voc_tree(tmp_path, n_trainval=12, n_test=6)
    path = voc / "ImageSets" / "Main" / "bird_trainval.txt"
    ref_ids, ref_labels = read_split(voc, "trainval", VOC_TINY_CLASSES)
    path.write_text(path.read_text() + path.read_text().splitlines()[2] + "\n")
    ids, labels = read_split(voc, "trainval", VOC_TINY_CLASSES)
    assert ids == ref_ids and np.array_equal(labels, ref_labels)
    assert "listed twice (same label)" in caplog.text


def test_unreadable_voc_images_strict_or_left_out(tmp_path, capsys):
    voc = make_voc_tree(tmp_path / "data", n_trainval=30, n_test=24)
    (voc / "JPEGImages" / "000004.jpg").write_bytes(b"")  # trainval
    (voc / "JPEGImages" / "000040.jpg").write_bytes(b"not a jpeg")  # test
    weights = make_weights(tmp_path / "w.pth")
    args = ["--config", "voc07_svm_tiny", f"data.voc_root={voc}", "--weights", str(weights),
            "--output-dir", str(tmp_path / "o")]  # fmt: skip
    assert main(args) == 2  # strict by default: the benchmark's image set is fixed
    assert "000004.jpg" in capsys.readouterr().err
    assert main(args + ["data.strict=false"]) == 0
    res = json.loads((tmp_path / "o" / "voc07_svm_results.json").read_text())
    assert res["unreadable_images"] == {"trainval": 1, "test": 1}
    assert res["unreadable_ids"] == {"trainval": ["000004"], "test": ["000040"]}
    assert res["num_train"] == 29 and res["num_test"] == 23


# ----------------------------------------------------------------------------- low-shot


def _svm_cfg(**kw):
    cfg = {"solver": "newton", "costs": [0.1, 1.0], "positive_weight": 2.0,
           "negative_weight": 1.0, "folds": 3, "intercept_scaling": 1.0, "newton_tol": 1e-8,
           "tol": 1e-4, "max_iter": 2000}  # fmt: skip
    cfg.update(kw)
    return cfg


def test_fit_svms_is_liblinear_on_the_masked_rows():
    x, labels = _features(n=120)
    rng = np.random.default_rng(3)
    mask = rng.random(labels.shape) < 0.6
    w = fit_svms(x, labels, 0.5, tol=1e-10, row_mask=mask)
    for j in range(labels.shape[1]):
        rows = mask[:, j]
        y = np.where(labels[rows, j] == 1, 1, -1)
        ref = _ref_svc(0.5).set_params(tol=1e-8, max_iter=100000).fit(x[rows], y)
        w_ref = np.r_[ref.coef_.ravel(), ref.intercept_]
        assert np.linalg.norm(w[j] - w_ref) <= 1e-3 * np.linalg.norm(w_ref)
    with pytest.raises(SVMError, match="class 1 has no positive row"):
        fit_svms(x, labels, 1.0, row_mask=mask & (labels != 1) | (np.arange(3) != 1))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_original_low_shot_draws_k_positives_and_k_times_others_negatives(k, monkeypatch):
    x, labels = _features(n=150, seed=1)
    seen = []
    real = svm_mod.fit_svms

    def spy(feats, lab, cost, *a, row_mask=None, **kw):
        seen.append((cost, row_mask.copy()))
        return real(feats, lab, cost, *a, row_mask=row_mask, **kw)

    monkeypatch.setattr(svm_mod, "fit_svms", spy)
    out = low_shot_original(x[:100], labels[:100], x[100:], labels[100:], ["a", "b", "c"],
                            _svm_cfg(), [k], 3, seed=0, cost=0.7)  # fmt: skip
    assert len(seen) == 3 and all(c == 0.7 for c, _ in seen)
    for _, mask in seen:
        for j in range(3):
            drawn = labels[:100][mask[:, j], j]
            assert (drawn == 1).sum() == k and (drawn == -1).sum() == 2 * k  # (K - 1) * k
            assert (drawn == 0).sum() == 0  # difficult images are never drawn
    assert not np.array_equal(seen[0][1], seen[1][1])  # independent draws
    assert len(out[str(k)]["mAPs"]) == 3 and 0.0 <= out[str(k)]["mAP_mean"] <= 100.0
    again = low_shot_original(x[:100], labels[:100], x[100:], labels[100:], ["a", "b", "c"],
                              _svm_cfg(), [k], 3, seed=0, cost=0.7)  # fmt: skip
    assert again == out
    lib = low_shot_original(x[:100], labels[:100], x[100:], labels[100:], ["a", "b", "c"],
                            _svm_cfg(solver="liblinear"), [k], 3, seed=0, cost=0.7)  # fmt: skip
    assert lib[str(k)]["mAP_mean"] == pytest.approx(out[str(k)]["mAP_mean"], abs=1.0)


def test_original_low_shot_needs_enough_images():
    x, labels = _features(n=60, seed=2)
    with pytest.raises(VOCError, match=r"k=40: class 'a' has \d+ positive / \d+ negative"):
        low_shot_original(x, labels, x, labels, ["a", "b", "c"], _svm_cfg(), [40], 1, 0, 1.0)


@pytest.mark.parametrize("protocol", ["original", "cv"])
def test_results_name_the_protocols(tmp_path, protocol, capsys):
    voc = make_voc_tree(tmp_path / "data", n_trainval=60, n_test=24)
    weights = make_weights(tmp_path / "w.pth")
    out = tmp_path / "o"
    assert main(["--config", "voc07_svm_tiny", f"data.voc_root={voc}", "--weights",
                 str(weights), "--output-dir", str(out), "low_shot.enabled=true",
                 f"low_shot.protocol={protocol}", "low_shot.ks=[1,2]", "low_shot.samples=2",
                 "svm.costs=[0.1,1.0]"]) == 0  # fmt: skip
    res = json.loads((out / "voc07_svm_results.json").read_text())
    assert res["protocol"]["name"] == "voc07_svm"
    assert "3-fold unshuffled stratified" in res["protocol"]["description"]
    low = res["low_shot"]
    assert low["protocol"]["name"] == protocol and set(low["ks"]) == {"1", "2"}
    if protocol == "original":
        assert "Goyal et al. 2019" in low["protocol"]["description"]
        assert "(3 - 1) * k negatives" in low["protocol"]["description"]
        assert "C=1.0" in low["protocol"]["description"]
    else:
        assert "cost chosen by 3-fold CV" in low["protocol"]["description"]
    # AP is reported in percent everywhere: the CV log lines too
    assert re.search(r"mean CV AP \d+\.\d\d%", capsys.readouterr().out)
    assert main(["--config", "voc07_svm_tiny", f"data.voc_root={voc}", "--weights",
                 str(weights), "--output-dir", str(out), "low_shot.enabled=true",
                 "low_shot.protocol=fewshot"]) == 2  # fmt: skip


@pytest.mark.dist
def test_two_processes_equal_one(tmp_path):
    """With 2 processes each extracts its shard and sends it to rank 0, which trains the SVMs:
    the same APs as one process (and nothing about unreadable images from rank 1)."""
    voc = make_voc_tree(tmp_path / "data", n_trainval=12, n_test=9)
    weights = make_weights(tmp_path / "w.pth")
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        args = ["--config", "voc07_svm_tiny", f"data.voc_root={voc}", "--weights", str(weights),
                "--output-dir", str(out)]  # fmt: skip
        run_module("transfer.eval.voc07_svm", args, nproc=nproc, timeout=240)
        logs = "".join(p.read_text() for p in out.glob("log*.txt"))
        assert "extracting trainval features" in logs and "unreadable" not in logs
        results.append(json.loads((out / "voc07_svm_results.json").read_text()))
    assert results[0]["mAP"] == pytest.approx(results[1]["mAP"], abs=1e-6)
    for name, row in results[0]["classes"].items():
        assert results[1]["classes"][name]["ap"] == pytest.approx(row["ap"], abs=1e-6)
