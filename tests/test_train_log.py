"""The training log's console line and its ETA, with a fake clock."""

import json

import pytest
import torch
from accelerate import Accelerator

from tokenizer.config import load_config
from tokenizer.training.log import EtaClock, MetricWindow, TrainLog, console_line, format_duration
from tokenizer.training.task import StepOutput


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


METRICS = {
    "loss": 0.12345,
    "loss/reconstruction": 0.1,
    "loss/commitment": 0.02,
    "psnr": 21.456,
    "codebook/usage": 0.5,
    "codebook/perplexity": 200.04,
    "images_per_s": 123.45,
    "lr": 2e-4,
    "data/bad_samples": 3.0,
}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.4, "59s"),
        (83, "1m23s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (7500, "2h05m"),
        (86400 + 4 * 3600 + 59, "1d04h"),
    ],  # fmt: skip
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_console_line_ends_with_the_eta():
    line = console_line(40, 1000, {**METRICS, "eta_s": 83.0})
    assert line == (
        "step 40/1000 loss 0.1235 recon 0.1000 commit 0.0200 psnr 21.46 usage 50.0% "
        "ppl 200.0 img/s 123.5 lr 2.00e-04 bad 3 eta 1m23s"
    )
    assert console_line(40, 1000, METRICS).endswith(" bad 3 eta ?")


def test_eta_uses_the_rate_of_this_process_not_the_resume_jump():
    clock = FakeClock()
    eta = EtaClock(start_step=500, end_step=1000, clock=clock)  # resumed at step 500
    assert eta.seconds_left(500) is None  # no step run yet: no rate
    clock.now += 20.0
    # 10 steps in 20 s: 2 s per step, 490 steps to go. Counting the 500 resumed steps
    # would claim 510 steps in 20 s and an ETA of about 19 s.
    assert eta.seconds_left(510) == pytest.approx(980.0)
    clock.now += 60.0
    assert eta.seconds_left(540) == pytest.approx(2.0 * 460)
    assert eta.seconds_left(1000) == 0.0


def test_train_log_writes_eta_to_the_console_and_metrics_jsonl(tmp_path, caplog):
    cfg = load_config(overrides=[f"run.dir={tmp_path}", "logging.tensorboard=false",
                                 "train.max_steps=100", "quantizer.codebook_size=4"])  # fmt: skip
    accelerator = Accelerator(cpu=True)
    log = TrainLog(cfg, accelerator, start_step=20, end_step=60)
    clock = FakeClock()
    log.eta = EtaClock(20, 60, clock=clock)  # the same bounds, on a clock the test moves
    log.window.add(_step_output(loss=0.3, psnr=[20.0, 22.0], counts={"tokens": [1, 1, 0, 0]}))
    clock.now += 30.0  # 10 steps in 30 s; 30 steps to go
    extra = {"lr": 1e-3, "data/bad_samples": 0.0}
    with caplog.at_level("INFO", logger="tokenizer.training.loop"):
        metrics = log.metrics(30, extra)
    log.close()
    assert metrics["eta_s"] == pytest.approx(90.0)
    assert caplog.records[-1].getMessage().startswith("step 30/100 loss ")
    assert caplog.records[-1].getMessage().endswith(" eta 1m30s")
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["step"] == 30 and written["eta_s"] == pytest.approx(90.0)


def _step_output(psnr, counts, **scalars) -> StepOutput:
    return StepOutput(
        scalars={k.replace("__", "/"): torch.tensor(v) for k, v in scalars.items()},
        per_image={"psnr": torch.tensor(psnr)},
        code_counts={g: torch.tensor(c, dtype=torch.float32) for g, c in counts.items()},
        num_samples=len(psnr),
    )


def test_window_averages_whatever_is_reported_by_name():
    window = MetricWindow(torch.device("cpu"))
    window.add(_step_output([20.0, 22.0], {"top": [2, 0], "bottom": [1, 1, 0, 0]},
                            loss=0.5, loss__generator=0.1))  # fmt: skip
    window.add(_step_output([30.0], {"top": [0, 2], "bottom": [0, 0, 2, 0]},
                            loss=0.3, loss__generator=0.3))  # fmt: skip
    metrics = window.read(Accelerator(cpu=True))
    assert metrics["loss"] == pytest.approx(0.4)  # mean over micro-steps
    assert metrics["loss/generator"] == pytest.approx(0.2)
    assert metrics["psnr"] == pytest.approx(24.0)  # mean over the 3 images, not the steps
    # Per grid: top used both codes evenly; bottom used 3 of 4 codes, 1, 1 and 2 times.
    assert metrics["codebook/top/usage"] == 1.0
    assert metrics["codebook/top/perplexity"] == pytest.approx(2.0)
    assert metrics["codebook/bottom/usage"] == 0.75
    bottom = torch.tensor([0.25, 0.25, 0.5])
    expected = torch.exp(-(bottom * bottom.log()).sum()).item()
    assert metrics["codebook/bottom/perplexity"] == pytest.approx(expected)
    assert "codebook/usage" not in metrics  # the single-grid names are for one grid only
    line = console_line(7, 10, {**metrics, "lr": 1e-4})
    assert "loss/generator 0.2000" in line and "codebook/top/usage 100.0%" in line
    assert line.startswith("step 7/10 loss 0.4000 psnr 24.00 ") and line.endswith(" eta ?")


def test_a_window_starts_empty_after_a_read():
    window = MetricWindow(torch.device("cpu"))
    window.add(_step_output([20.0], {"tokens": [1, 0]}, loss=1.0))
    window.read(Accelerator(cpu=True))
    window.reset()
    window.add(_step_output([10.0], {"tokens": [0, 1]}, loss=3.0))
    metrics = window.read(Accelerator(cpu=True))
    assert (metrics["loss"], metrics["psnr"], metrics["codebook/usage"]) == (3.0, 10.0, 0.5)


def test_a_scalar_reported_on_some_steps_averages_over_those():
    window = MetricWindow(torch.device("cpu"))
    window.add(_step_output([20.0], {"tokens": [1, 0]}, loss=1.0))  # discriminator idle
    window.add(_step_output([20.0], {"tokens": [1, 0]}, loss=3.0, disc__loss=0.6))
    metrics = window.read(Accelerator(cpu=True))
    assert metrics["loss"] == 2.0 and metrics["disc/loss"] == pytest.approx(0.6)


def test_previews_reach_tensorboard_as_images(tmp_path):
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(overrides=[f"run.dir={tmp_path}", "train.max_steps=10"])
    project = ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs"))
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_config=project)
    log = TrainLog(cfg, accelerator)
    originals = torch.linspace(-1, 1, 2 * 3 * 16 * 16).reshape(2, 3, 16, 16)
    log.preview([originals, -originals], step=7)
    log.close()
    assert (tmp_path / "images" / "step_00000007.png").is_file()
    # Accelerate writes under logs/<project name>, "tensorboard" as TrainLog names it.
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("preview")
    # Two rows of two 16x16 images with 2-pixel gaps: the PNG's own size.
    assert (image.step, image.width, image.height) == (7, 2 * 18 + 2, 2 * 18 + 2)
