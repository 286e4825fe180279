"""pretrain/log.py and pretrain/progress.py: progress on and off a terminal, metrics rows to JSON
lines and W&B."""

from __future__ import annotations

import io
import json
import logging
import sys
import types

import pytest
from helpers import REPO

from pretrain import log as plog
from pretrain import progress as pprog
from pretrain.config import load_config


class _FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured():
    logger = plog.get_logger()
    handler = _Capture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(sys, "stdout", _Terminal())
    bar = pprog.progress(range(5), total=5, desc="x")
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3, 4]
    forced = pprog.progress(range(3), enabled=True)
    assert isinstance(forced, tqdm) and list(forced) == [0, 1, 2]
    forced.close()
    # other ranks and enabled=False: the iterable itself
    items = [1, 2]
    assert pprog.progress(items, rank=1) is items
    assert pprog.progress(items, enabled=False) is items


def test_progress_without_terminal_logs_lines(monkeypatch, captured):
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # not a TTY (nohup, SLURM)
    bar = pprog.progress(range(20), desc="extract", interval=0.0)
    assert isinstance(bar, pprog.LogProgress)
    assert list(bar) == list(range(20))
    assert len(captured) == 20  # interval 0: a line per item
    assert captured[-1].startswith("extract: 20/20 (100%) ")
    assert "it/s, ETA 00:00" in captured[-1]
    # not rank 0: nothing
    assert pprog.progress([1], rank=2) == [1]


def test_log_progress_every_tenth_and_interval(captured):
    clock = _FakeClock()
    bar = pprog.LogProgress(total=200, desc="pretrain", interval=30.0, clock=clock)
    for _ in range(19):  # 1 s per item, below 10% and 30 s: no line yet
        clock.t += 1.0
        bar.update()
    assert captured == []
    clock.t += 1.0
    bar.update()  # 20/200: the 10% mark
    assert captured == ["pretrain: 20/200 (10%) 1.00 it/s, ETA 03:00"]
    clock.t += 31.0  # slow item: the interval passed
    bar.update()
    assert captured[-1] == "pretrain: 21/200 (10%) 0.41 it/s, ETA 07:15"
    bar.close()
    assert len(captured) == 2  # the last count is already logged
    bar.update(5)  # 26/200 within the interval and the same tenth: no line
    assert len(captured) == 2


def test_log_progress_resumed_counts_rate_from_initial_and_close(captured):
    clock = _FakeClock()
    items = range(100, 400)
    bar = pprog.LogProgress(
        items, total=400, initial=100, desc="pretrain", clock=clock, interval=1e9
    )
    it = iter(bar)
    for _ in range(3):  # an item counts when handed out: 3 requests, 103 done
        clock.t += 10.0
        next(it)
    bar.close()  # stopped early (preempted): the final count is logged once
    assert captured == ["pretrain: 103/400 (26%) 0.10 it/s, ETA 49:30"]
    bar.close()
    assert len(captured) == 1


def test_log_progress_without_total(captured):
    clock = _FakeClock()
    bar = pprog.LogProgress(iter([1, 2, 3]), desc="read", interval=5.0, clock=clock)
    for _ in bar:
        clock.t += 6.0
    # an item counts when handed out: the 2nd and 3rd come 6 s after the previous line
    assert captured == ["read: 2 0.33 it/s, elapsed 00:06", "read: 3 0.25 it/s, elapsed 00:12"]


def test_clock_format():
    assert pprog._clock(0) == "00:00"
    assert pprog._clock(61.4) == "01:01"
    assert pprog._clock(3 * 3600 + 5) == "3:00:05"


class _FakeRun:
    def __init__(self, **kwargs) -> None:
        self.init_kwargs = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, row: dict, step: int) -> None:
        self.logged.append((dict(row), step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = _FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_metric_writer_sends_rows_to_wandb(tmp_path, fake_wandb):
    cfg = {"log": {"wandb": True, "wandb_project": "proj", "wandb_mode": "offline"}, "x": 1}
    opts = plog.wandb_options(cfg)
    out = tmp_path / "run1"
    writer = plog.MetricWriter(out, tensorboard=False, wandb=opts)
    writer.write(10, {"loss": 1.5, "lr": 0.1})
    writer.write(20, {"loss": float("nan")})
    writer.close()
    (run,) = fake_wandb.runs
    kw = run.init_kwargs
    assert kw["project"] == "proj" and kw["mode"] == "offline"
    assert kw["dir"] == str(out) and kw["name"] == "run1" and kw["resume"] == "allow"
    assert kw["config"] == cfg
    assert run.logged == [({"loss": 1.5, "lr": 0.1}, 10), ({"loss": "nan"}, 20)]
    assert run.finished
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 10, "loss": 1.5, "lr": 0.1}, {"step": 20, "loss": "nan"}]
    # a resumed run in the same folder continues the same W&B run
    plog.MetricWriter(out, tensorboard=False, wandb=opts).close()
    assert fake_wandb.runs[1].init_kwargs["id"] == kw["id"]
    assert (out / "wandb_run_id.txt").read_text().strip() == kw["id"]


def test_metric_writer_wandb_only_on_rank0_and_off_by_default(tmp_path, fake_wandb):
    opts = {"project": "p", "mode": "offline", "config": {}}
    w = plog.MetricWriter(tmp_path / "r1", rank=1, tensorboard=False, wandb=opts)
    w.write(1, {"loss": 1.0})
    w.close()
    assert fake_wandb.runs == [] and not (tmp_path / "r1").exists()
    assert plog.wandb_options({"log": {"wandb": False}}) is None


def test_wandb_missing_or_bad_mode_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"log.wandb is true .*pip install 'imsvd\[wandb\]'"):
        plog.MetricWriter(tmp_path, tensorboard=False, wandb={"mode": "offline"})
    with pytest.raises(ValueError, match="log.wandb_mode: 'cloud'"):
        plog.MetricWriter(tmp_path, tensorboard=False, wandb={"mode": "cloud"})


def test_base_config_declares_wandb_keys_off():
    base = REPO / "configs" / "pretrain" / "base.yaml"
    cfg = load_config(base)
    assert cfg["log"]["wandb"] is False
    assert cfg["log"]["wandb_project"] == "imsvd" and cfg["log"]["wandb_mode"] == "offline"
    assert plog.wandb_options(cfg) is None
    on = load_config(base, ["log.wandb=true", "log.wandb_mode=online"])
    assert plog.wandb_options(on)["mode"] == "online"


def test_metric_writer_from_config(tmp_path, fake_wandb):
    cfg = {
        "log": {"tensorboard": False, "wandb": True, "wandb_project": "p", "wandb_mode": "offline"}
    }
    w = plog.MetricWriter.from_config(tmp_path / "run", cfg)
    w.write(3, {"loss": 2.0})
    w.close()
    assert fake_wandb.runs[0].logged == [({"loss": 2.0}, 3)]
    assert not (tmp_path / "run" / "tb").exists()
    off = plog.MetricWriter.from_config(tmp_path / "r2", {"log": {"tensorboard": False}})
    assert off._wandb is None and len(fake_wandb.runs) == 1
    off.close()
