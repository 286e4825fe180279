"""The learning-curve command on synthetic metrics.jsonl files."""

import json

import pytest
from PIL import Image

from pretrain.curves import CurvesError, main, plot_curves, read_metrics


def _run(tmp_path, name, terms, knn):
    d = tmp_path / name
    d.mkdir()
    rows = []
    for step in range(0, 101, 10):
        rows.append({"step": step, **{t: 1.0 / (step + 1) for t in terms}, "train_seconds": step})
        if step % 50 == 0:
            rows.append({"step": step, "knn/top1_k20": knn + step / 10, "train_seconds": step})
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def test_curves_figure_from_synthetic_runs(tmp_path):
    a = _run(tmp_path, "imsvd", ["loss", "loss_ti", "loss_dia", "loss_off"], 70.0)
    b = _run(tmp_path, "vicreg", ["loss", "loss_inv", "loss_var", "loss_cov"], 72.0)
    out = tmp_path / "fig.png"
    rc = main([str(a), str(b), "--out", str(out), "--ref", "raw pixels=83.1", "--dpi", "60"])
    assert rc == 0
    with Image.open(out) as img:
        w, h = img.size
        assert w > 300 and h > 300
        # not a blank canvas: the curves and text put many colours on it
        assert len(img.convert("RGB").getcolors(1 << 20)) > 50
    for fmt in ("pdf", "svg"):
        assert main([str(a), "--out", str(tmp_path / "f.png"), "--format", fmt]) == 0
        assert (tmp_path / f"f.{fmt}").stat().st_size > 1000
    assert plot_curves([a], tmp_path / "sec.png", x="seconds").is_file()


def test_curves_errors_name_the_problem(tmp_path, capsys):
    a = _run(tmp_path, "run", ["loss"], 50.0)
    with pytest.raises(CurvesError, match="labels for"):
        plot_curves([a], tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(CurvesError, match="suffix"):
        plot_curves([a], tmp_path / "x.jpg")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(CurvesError, match="line 2"):
        read_metrics(bad)
    noprobe = tmp_path / "noprobe"
    noprobe.mkdir()
    (noprobe / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert main([str(noprobe), "--out", str(tmp_path / "y.png")]) == 2
    assert "eval.every_steps" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "y.png")]) == 2
