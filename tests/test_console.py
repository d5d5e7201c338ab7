"""The console rules: throttled progress lines, quiet loggers, closing summaries.

A whole stage's captured output is checked in tests/test_training.py
(test_multi_node_two_raylets_on_s3) and the CLI's summary in tests/test_cli.py.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mint_ray import console


@pytest.fixture
def restore_logging():
    names = ["", "mint_ray", "ray", "DeepSpeed", *console.SILENCED_LOGGERS]
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_lines_every_n_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("mint_ray.test")
    progress = console.Progress("[train] orpo", 95, logger=log, every_n=20, seconds=3600, mode="lines")
    with caplog.at_level(logging.INFO, logger="mint_ray.test"):
        for step in range(95):
            progress.update(1, loss=1.0 / (step + 1), **{"tok/s": 100})
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[2] for line in lines] == ["20/95", "40/95", "60/95", "80/95", "95/95"]
    assert "loss 0.01053" in lines[-1] and "tok/s 100" in lines[-1] and "eta 0s" in lines[-1]


def test_lines_every_few_seconds_when_steps_are_slow(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 20))  # each update 20 s after the last
    monkeypatch.setattr(console.time, "monotonic", lambda: float(next(clock)))
    progress = console.Progress("[eval]", 1000, logger=logging.getLogger("mint_ray.test"), every_n=500,
                                seconds=30, mode="lines")
    with caplog.at_level(logging.INFO, logger="mint_ray.test"):
        for _ in range(6):
            progress.update(1)
    # updates at 20, 40 (a line: 40 s since the start), 60, 80 (a line), 100, 120 (a line) s
    assert [r.getMessage().split()[1] for r in caplog.records] == ["2/1000", "4/1000", "6/1000"]


def test_resumed_progress_counts_from_the_resume_step(caplog: pytest.LogCaptureFixture) -> None:
    progress = console.Progress("[train]", 10, logger=logging.getLogger("mint_ray.test"), every_n=5,
                                start=5, mode="lines")
    with caplog.at_level(logging.INFO, logger="mint_ray.test"):
        for _ in range(5):
            progress.update(1)
    assert [r.getMessage().split()[1] for r in caplog.records] == ["10/10"]


def test_every_n_for_gives_about_twenty_lines() -> None:
    assert console.every_n_for(240) == 12
    assert console.every_n_for(5) == 1


def test_quiet_process_keeps_warnings_and_our_info(restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    console.quiet_process()
    assert logging.getLogger("ray.train").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("DeepSpeed").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("mint_ray.training.worker").getEffectiveLevel() == logging.INFO
    assert logging.getLogger(console.RAY_DATA_PROGRESS_LOGGER).getEffectiveLevel() == logging.INFO
    # Ray Train's report line logs under its file's path: the same path the module has.
    import ray.train.v2._internal.execution.context as train_context

    assert not logging.getLogger(train_context.__file__).isEnabledFor(logging.INFO)
    cleaner = logging.getLogger(next(iter(console.SILENCED_LOGGERS)))
    assert not cleaner.isEnabledFor(logging.WARNING) and cleaner.isEnabledFor(logging.ERROR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        console.quiet_process()  # filters go in front of "default"
        warnings.warn("torch.distributed.reduce_scatter_tensor is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("a row was truncated", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert "a row was truncated" in messages and not any("reduce_scatter" in m for m in messages)


def test_ray_data_console_keeps_progress_and_warnings_only(restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.data  # noqa: F401  (its import configures its console handler)

    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    console.quiet_process()
    console.quiet_process()  # idempotent: one filter per handler
    from ray._private.log import PlainRayHandler

    handlers = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, PlainRayHandler)]
    assert handlers and all(sum(isinstance(f, console._RayDataConsole) for f in h.filters) == 1 for h in handlers)

    def passes(name: str, level: int, message: str = "x") -> bool:
        return all(h.filter(logging.LogRecord(name, level, __file__, 1, message, None, None)) for h in handlers)

    # Of Ray Data's progress block (its lines as it logs them off a terminal), the total alone.
    block = ["======= Running Dataset: dataset_1_0 =======", "Total Progress: 120/200",
             "Active & requested resources: 1/2 CPU, 0.0B/256.0MiB object store", "=" * 65]
    assert [line for line in block if passes(console.RAY_DATA_PROGRESS_LOGGER, logging.INFO, line)] == \
        ["Total Progress: 120/200"]
    assert passes("ray.data._internal.execution.streaming_executor", logging.WARNING)
    assert not passes("ray.data._internal.execution.streaming_executor", logging.INFO)
    # Nobody else's handler gets the filter (pytest's capture sits on the root logger).
    assert not any(isinstance(f, console._RayDataConsole) for h in logging.getLogger().handlers for f in h.filters)


def test_verbose_brings_everything_back(restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "DEBUG")
    console.quiet_process()
    assert logging.getLogger().level == logging.DEBUG
    assert console.ray_train_log_level() == "DEBUG"
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "")
    assert console.ray_train_log_level() == "WARNING"


def test_a_known_harmless_deepspeed_line_is_dropped_and_its_other_warnings_kept(
        restore_logging, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    monkeypatch.setenv(console.LOG_LEVEL_ENV, "")
    console.quiet_process()
    console.quiet_process()  # idempotent
    ds = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, console._DropLines) for f in ds.filters) == len(console.SILENCED_LOG_LINES)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # DeepSpeed's logger does not propagate
    ds.addHandler(handler)
    try:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        # DeepSpeed's own scheduler, built as deepspeed.initialize builds it; too few steps warn.
        WarmupCosineLR(optimizer, total_num_steps=2, warmup_num_steps=10)
    finally:
        ds.removeHandler(handler)
    assert not [m for m in seen if "before it has started" in m]
    assert [m for m in seen if "total_num_steps 2 is less than warmup_num_steps 10" in m]


def test_deepspeed_op_build_print_is_dropped_unless_verbose(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # DeepSpeed's own print, from the op build that every CPU training worker runs.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op

    monkeypatch.setenv(console.LOG_LEVEL_ENV, "")
    with console.quiet_prints():
        build_shm_op()
    assert "built successfully" not in capsys.readouterr().out
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "DEBUG")
    with console.quiet_prints():
        build_shm_op()
    assert "built successfully" in capsys.readouterr().out
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "")
    with pytest.raises(RuntimeError, match="kept"), console.quiet_prints():
        raise RuntimeError("kept")


def test_quiet_prints_also_drops_prints_that_ray_train_sends_to_the_logger(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    # A Ray Train worker's print is Ray's own: it logs the text on the root logger.
    import builtins

    from ray.train.v2._internal.logging.patch_print import redirected_print

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "")
    monkeypatch.setattr(builtins, "print", redirected_print)
    from deepspeed.comm.torch import build_shm_op

    with caplog.at_level(logging.INFO), console.quiet_prints():
        build_shm_op()
        print("to a file", file=(tmp_path / "kept.txt").open("w"), flush=True)
    assert builtins.print is redirected_print
    assert "built successfully" not in caplog.text
    assert (tmp_path / "kept.txt").read_text() == "to a file\n"


def test_summary_lines_show_scalars_short_lists_and_one_level() -> None:
    lines = console.summary_lines({
        "model_uri": "s3://b/student/model", "steps": 240, "registered": {"name": "m", "version": "3"},
        "node_ids": ["a", "b"], "rows": list(range(100)), "nested": {"deep": {"x": 1}}, "none": None})
    assert lines == ["  model_uri: s3://b/student/model", "  steps: 240", "  registered: name=m, version=3",
                     "  node_ids: a, b", "  none: None"]


BAR_RUN = """
import logging
import time

import ray
import ray.train
from ray.train.torch import TorchTrainer

from mint_ray import console
from mint_ray.ray_cluster import WORKER_SETUP_HOOK

console.setup()


def loop(_):
    progress = console.Progress("[train] sft", 40, logger=logging.getLogger("mint_ray.test"))
    for _ in range(40):
        time.sleep(0.05)
        progress.update(1, loss=0.5)
    progress.close()


ray.init(num_cpus=1, logging_level=console.ray_log_level(),
         runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
console.quiet_process()  # as init_ray does once Ray is up
TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=1),
             run_config=ray.train.RunConfig(storage_path=%r)).fit()
"""


def test_a_bar_in_a_ray_train_worker_adds_no_lines_to_the_console(tmp_path) -> None:
    """In a terminal the workers' bars are drawn by Ray's driver; no empty worker line comes
    with each update (Ray Train's print patch added one a second), and no known-harmless
    line of Ray's own actors."""
    env = {**os.environ, console.PROGRESS_ENV: "bar", "RAY_AUTH_MODE": "disabled"}
    env.pop(console.RAY_TRAIN_PRINT_PATCH_ENV, None)  # console.setup decides
    out = subprocess.run([sys.executable, "-c", BAR_RUN % str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    console_text = out.stdout + out.stderr
    assert "[train] sft" in console_text  # the bar, drawn by the driver
    empty = [line for line in console_text.splitlines() if re.fullmatch(r".*\(RayTrainWorker pid=\d+\)\S*\s*", line)]
    assert empty == [], empty[:3]
    # Ray Train's controller logs, at its C++ error level, a line per training about its own
    # PreemptionWatcher actor (ray-project/ray#53727): dropped where the driver prints it.
    assert "has constructor arguments in the object store" not in console_text, console_text[-3000:]


def test_a_worker_knows_its_own_cluster_when_another_runs_beside_it(tmp_path) -> None:
    """Two local clusters on one machine: Ray Train's placement-group cleaner looks its
    cluster up without an address, which fails (a traceback per training) unless the
    worker's environment names it."""
    other = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--port=0",
                              "--num-cpus=0", "--block", f"--temp-dir={tmp_path}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        out = subprocess.run([sys.executable, "-c", PIN_RUN], env={**os.environ, "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "same cluster" in out.stdout, out.stdout[-2000:]
    finally:
        other.terminate()
        other.wait(60)


PIN_RUN = """
import time

import ray
from ray._private.services import canonicalize_bootstrap_address_or_die, find_gcs_addresses

from mint_ray.ray_cluster import WORKER_SETUP_HOOK

ray.init(num_cpus=1, runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})


@ray.remote
def lookup():
    return canonicalize_bootstrap_address_or_die(None)  # as the cleaner does


for _ in range(60):  # until the other cluster's GCS is up: then the lookup is ambiguous
    if len(find_gcs_addresses()) > 1:
        break
    time.sleep(1)
assert ray.get(lookup.remote()) == ray.get_runtime_context().gcs_address
print("same cluster")
"""


def test_own_info_lines_drop_the_logger_name_and_others_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.LOG_LEVEL_ENV, raising=False)
    formatter = console.ConsoleFormatter()

    def line(name: str, level: int) -> str:
        return formatter.format(logging.LogRecord(name, level, __file__, 1, "compare: training arm sft", None, None))

    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO compare: training arm sft", line("mint_ray.evaluation.compare",
                                                                                     logging.INFO))
    assert " WARNING mint_ray.evaluation.compare: compare" in line("mint_ray.evaluation.compare", logging.WARNING)
    assert " INFO DeepSpeed: compare" in line("DeepSpeed", logging.INFO)
    monkeypatch.setenv(console.LOG_LEVEL_ENV, "DEBUG")  # --verbose: every line names its logger
    assert " INFO mint_ray.evaluation.compare: compare" in line("mint_ray.evaluation.compare", logging.INFO)
