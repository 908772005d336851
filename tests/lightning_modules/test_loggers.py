"""Logs that survive a resume: metrics.csv keeps the rows before the resumed step and appends."""

from __future__ import annotations

import csv
import importlib.util

import pytest

from llm4gen.lightning_modules.loggers import ResumableCSVLogger, build_logger, keep_rows_before


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def log_steps(logger, steps, value):
    for step in steps:
        logger.log_metrics({"train/loss": value + step}, step=step)
    logger.save()


def test_a_resumed_csv_log_keeps_earlier_rows_replaces_retrained_ones_and_appends(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="logs", version="")
    log_steps(first, range(6), 0.0)  # the first start got to step 5, its checkpoint is at step 4
    resumed = ResumableCSVLogger(tmp_path, name="logs", version="", resume_step=4)
    log_steps(resumed, range(4, 8), 100.0)
    table = rows(tmp_path / "logs" / "metrics.csv")
    assert [int(r["step"]) for r in table] == list(range(8))  # every step exactly once
    assert [float(r["train/loss"]) for r in table] == [0, 1, 2, 3, 104, 105, 106, 107]


def test_a_new_metric_after_resume_keeps_the_old_columns(tmp_path):
    log_steps(ResumableCSVLogger(tmp_path, name="logs", version=""), range(3), 0.0)
    resumed = ResumableCSVLogger(tmp_path, name="logs", version="", resume_step=3)
    resumed.log_metrics({"train/loss": 9.0, "train/entity": 1.0}, step=3)
    resumed.save()
    table = rows(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in table] == ["0", "1", "2", "3"] and table[3]["train/entity"] == "1.0"


def test_a_fresh_run_in_the_same_folder_starts_a_new_log(tmp_path):
    log_steps(ResumableCSVLogger(tmp_path, name="logs", version=""), range(3), 0.0)
    log_steps(ResumableCSVLogger(tmp_path, name="logs", version=""), range(2), 50.0)  # resume=never
    assert [float(r["train/loss"]) for r in rows(tmp_path / "logs" / "metrics.csv")] == [50.0, 51.0]


def test_keep_rows_before_returns_the_header(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("loss,step\n1.0,0\n2.0,1\n3.0,2\n")
    assert keep_rows_before(path, 2) == ["loss", "step"]
    assert path.read_text().splitlines() == ["loss,step", "1.0,0", "2.0,1"]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed (extra)")
def test_tensorboard_resume_purges_the_steps_trained_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = build_logger("tensorboard", tmp_path, None)
    log_steps(first, range(6), 0.0)
    first.finalize("success")
    resumed = build_logger("tensorboard", tmp_path, 4)
    log_steps(resumed, range(4, 8), 100.0)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "logs")).Reload().Scalars("train/loss")
    assert [e.step for e in events] == list(range(8))
    assert [e.value for e in events] == [0, 1, 2, 3, 104, 105, 106, 107]


@pytest.mark.slow
def test_wandb_offline_resumes_its_run_id_and_logs_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = build_logger("wandb", tmp_path, None)
    log_steps(first, range(6), 0.0)
    run_id = first.experiment.id
    first.experiment.finish()
    resumed = build_logger("wandb", tmp_path, 4)
    logged = []
    monkeypatch.setattr(type(resumed.experiment), "log", lambda run, data, step=None, **kw: logged.append(step),
                        raising=False)
    monkeypatch.setattr(type(resumed.experiment), "step", property(lambda run: 6))  # a resumed run's next step
    log_steps(resumed, range(4, 8), 100.0)
    assert resumed.experiment.id == run_id == (tmp_path / "logs" / "wandb_run_id").read_text().strip()
    assert logged == [6, 7]  # steps 4 and 5 are already in the run: not logged twice
    resumed.experiment.finish()


def test_metrics_of_one_step_logged_by_separate_calls_share_one_row(tmp_path):
    """The training step, the throughput monitor and the validation scorer each log for a step; the CSV
    keeps one row per step, also when that step's row was flushed before the next call came."""
    logger = build_logger("csv", tmp_path, None)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_metrics({"throughput": 5.0}, step=0)  # flushed each call (flush_logs_every_n_steps=1)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.log_metrics({"val/score": 0.25}, step=1)  # a new column: the file is rewritten with it
    logger.log_metrics({"train/loss": 0.25}, step=2)
    logger.finalize("success")
    with open(tmp_path / "logs" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert (rows[0]["train/loss"], rows[0]["throughput"]) == ("1.0", "5.0")
    assert (rows[1]["train/loss"], rows[1]["val/score"], rows[1]["throughput"]) == ("0.5", "0.25", "")
