"""What a person at the terminal sees: quiet infrastructure, progress, closing summaries.

- ``setup`` (the CLI, once per driver) and ``quiet_process`` (every Ray worker process,
  from ``ray_cluster.setup_worker``, the runtime_env's ``worker_process_setup_hook``)
  keep mint-ray's own INFO lines and every library's warnings and errors, and drop the
  INFO chatter of Ray, DeepSpeed, torch and the clients, plus a short list of
  known-harmless warnings (each with its reason below). ``--verbose`` or
  ``MINT_RAY_LOG_LEVEL=DEBUG`` brings everything back.
  Errors are never filtered.
- ``Progress`` is one stage's progress: a bar when the driver's stdout is a terminal
  (from a Ray worker too, through Ray's driver-side tqdm), otherwise a line every
  ``every_n`` updates or every ``seconds``, whichever comes first.
- ``summary_lines`` turns a stage's result into a few readable lines; the whole result
  is still written as JSON by the CLI.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal

LOG_LEVEL_ENV = "MINT_RAY_LOG_LEVEL"
# MLflow sets its own loggers' level from this when it is imported (after setup runs).
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"
# "bar" or "lines", decided once on the driver and passed to the workers (their stdout
# is a pipe to the driver, so they cannot tell by themselves).
PROGRESS_ENV = "MINT_RAY_PROGRESS"
RAY_TRAIN_PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# mint-ray's own INFO lines name their stage in their text ("compare: ..."): no logger name,
# so they fit a terminal's line.
OWN_INFO_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATEFMT = "%H:%M:%S"
# Ray Data's progress line when stdout is not a terminal (its default is every 10 s).
RAY_DATA_LOG_INTERVAL_S = "30"

# Their INFO lines describe the machinery (checkpoint uploads, op builds, HTTP calls).
CHATTY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "torch", "mlflow", "alembic", "urllib3", "botocore",
                  "boto3", "s3transfer", "filelock", "httpx", "transformers", "peft", "accelerate", "gguf")
# Known-harmless warnings, silenced at their source with the reason.
SILENCED_LOGGERS = {
    # It polls the State API, which needs the dashboard that local clusters do not start;
    # each failed poll is a warning, and the placement group is still removed.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # It warns that the operator bars are off: off a terminal, that is this module's choice.
    "ray.data._internal.progress": logging.ERROR,
}
# Modules that log under their file path (logging.getLogger(__file__)), not a dotted name:
# Ray Train's per-report INFO line ("Reporting training result ...") from every rank.
FILE_NAMED_LOGGERS = ("ray.train.v2._internal.execution.context",)
SILENCED_WARNINGS = (
    # DeepSpeed's ZeRO-3 calls the old names on every step (49 times a run); nothing to do.
    (FutureWarning, r".*reduce_scatter_tensor`? is deprecated"),
    (FutureWarning, r".*all_gather_into_tensor`? is deprecated"),
    # transformers asks DeepSpeed's engine through a renamed property.
    (FutureWarning, r".*`is_gradient_checkpointing` is deprecated"),
    # torch's ZeRO-3 hooks and transformers' generation defaults: advice for library authors.
    (UserWarning, r".*TypedStorage is deprecated"),
    (UserWarning, r".*`torch_dtype` is deprecated"),
    # A small input makes fewer blocks than a pool has actors; the spare actors idle.
    (UserWarning, r".*The minimum number of concurrent actors for"),
)
# Known-harmless log lines of a logger that also says things that matter: (logger, message).
SILENCED_LOG_LINES = (
    # DeepSpeed's warmup schedulers ask for their own rate while being built, before step 0.
    ("DeepSpeed", r"Attempting to get learning rate from scheduler before it has started"),
)
# Known-harmless lines that Ray's workers print (their C++ core worker, at its error level,
# so no logger level reaches them), dropped where the driver shows the workers' output:
# Ray Train's own PreemptionWatcher actor, once per training (ray-project/ray#53727).
SILENCED_WORKER_LINES = ("has constructor arguments in the object store and max_restarts > 0",)
# Ray's driver-side handler of the workers' output (ray._private.worker; no public hook).
RAY_WORKER_OUTPUT_HANDLER = "ray_print_logs"
# Ray Data's own progress: its non-terminal lines come from this logger at INFO.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress.logging_progress"
RAY_DATA_PROGRESS_LINE = "Total Progress"

ProgressMode = Literal["bar", "lines"]


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").upper() == "DEBUG"


def quiet_process() -> None:
    """Apply the logging rules in this process (the driver, or a Ray worker at start-up)."""
    _pin_cluster_address()
    if verbose():
        logging.getLogger().setLevel(logging.DEBUG)
        return
    logging.getLogger("mint_ray").setLevel(logging.INFO)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, level in SILENCED_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, pattern in SILENCED_LOG_LINES:
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) and f.pattern.pattern == pattern for f in target.filters):
            target.addFilter(_DropLines(pattern))
    for module in FILE_NAMED_LOGGERS:
        logging.getLogger(_module_file(module)).setLevel(logging.WARNING)
    # transformers' and the Hub's download/load/save bars (read when they are imported).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.INFO)
    _filter_worker_output()
    if "ray.data" in sys.modules:
        from ray._private.log import PlainRayHandler

        # Ray Data's own console handler, by its class: its file handlers keep every level,
        # and handlers others put on the logger (a test's log capture) stay as they are.
        for handler in logging.getLogger("ray.data").handlers:
            if isinstance(handler, PlainRayHandler) and not any(
                    isinstance(f, _RayDataConsole) for f in handler.filters):
                handler.addFilter(_RayDataConsole())
        if progress_mode() == "lines":
            from ray.data import DataContext

            # Off a terminal: one "Total Progress" line every 30 s, not a block per operator.
            DataContext.get_current().enable_operator_progress_bars = False


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Drop what a library ``print``s to the console inside the block (no logger to turn
    down): DeepSpeed announces its op builds so, once per worker per training.
    ``builtins.print`` is swapped, not only ``sys.stdout``: in a Ray Train worker, print
    is Ray's, which sends the text to the root logger. Prints to a file still go there.
    ``--verbose`` keeps everything; errors are exceptions, which pass through."""
    if verbose():
        yield
        return
    shown = builtins.print

    def dropped(*objects: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None,
                flush: bool = False) -> None:
        if file not in (None, sys.stdout, sys.stderr):
            shown(*objects, sep=sep, end=end, file=file, flush=flush)

    builtins.print = dropped
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = shown


def _pin_cluster_address() -> None:
    """A Ray worker's own cluster as ``RAY_ADDRESS``. Ray code that looks its cluster up
    by itself (Ray Train's placement-group cleaner) fails with a traceback, and stops
    cleaning, when another local cluster runs on the machine (two runs at once)."""
    if _in_ray_worker():
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _filter_worker_output() -> None:
    """In a driver connected to Ray: drop ``SILENCED_WORKER_LINES`` from the workers' output
    it prints (once; the workers' log files keep them)."""
    if "ray" not in sys.modules or _in_ray_worker():
        return
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    for name, handler in list(dispatcher.handlers):
        if name == RAY_WORKER_OUTPUT_HANDLER and not isinstance(handler, _WithoutSilencedLines):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _WithoutSilencedLines(handler))


class _WithoutSilencedLines:
    """Ray's handler of a batch of worker output lines, without ``SILENCED_WORKER_LINES``."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", ()) if not any(s in line for s in SILENCED_WORKER_LINES)]
        if lines:
            self.handler({**data, "lines": lines})


class ConsoleFormatter(logging.Formatter):
    """``LOG_FORMAT``, but mint-ray's own INFO lines without the logger name (unless
    ``--verbose``): a library's line, a warning or an error keeps it."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT, LOG_DATEFMT)
        self.own_info = logging.Formatter(OWN_INFO_FORMAT, LOG_DATEFMT)

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.split(".")[0] == "mint_ray" and not verbose():
            return self.own_info.format(record)
        return super().format(record)


class _DropLines(logging.Filter):
    """One known line of a logger, dropped; the logger's other lines stay."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _RayDataConsole(logging.Filter):
    """Ray Data on the console: its warnings and errors, and of its 4-line progress block
    (a header, the total, the resources, a rule) the total alone; not its INFO notes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return record.name == RAY_DATA_PROGRESS_LOGGER and record.getMessage().startswith(RAY_DATA_PROGRESS_LINE)


def _module_file(module: str) -> str:
    """A module's file path without importing it (the hook runs in every worker at start)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    root = os.path.dirname(spec.origin) if spec is not None and spec.origin else top
    return os.path.join(root, *rest) + ".py"


def setup(verbose_flag: bool = False) -> None:
    """The driver's console: log format, the quiet rules, and what workers should do."""
    if verbose_flag:
        os.environ[LOG_LEVEL_ENV] = "DEBUG"
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.DEBUG if verbose() else logging.INFO, handlers=[handler])
    os.environ.setdefault(PROGRESS_ENV, "bar" if sys.stdout.isatty() else "lines")
    if progress_mode() == "bar":
        # Ray Train sends a worker's prints to its logger, which adds a line to each of
        # Ray's bar updates (an empty line a second). Ray Train passes this to its workers.
        os.environ.setdefault(RAY_TRAIN_PRINT_PATCH_ENV, "0")
    os.environ.setdefault(MLFLOW_LEVEL_ENV, "DEBUG" if verbose() else "WARNING")
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", RAY_DATA_LOG_INTERVAL_S)
    quiet_process()


def ray_log_level() -> int:
    """The ``ray`` logger's level for ``ray.init`` (which resets it when Ray starts)."""
    return logging.DEBUG if verbose() else logging.WARNING


def ray_train_log_level() -> str:
    """Ray Train's console level (``RunConfig.logging_config``); its log files keep every level."""
    return "DEBUG" if verbose() else "WARNING"


def serve_log_level() -> str:
    """Ray Serve's level where a run serves a few requests and reports them itself (the demo):
    its start-up, replica and access lines stay in its log files."""
    return "DEBUG" if verbose() else "WARNING"


def progress_mode() -> ProgressMode:
    return "bar" if os.environ.get(PROGRESS_ENV) == "bar" else "lines"


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class Progress:
    """Progress of ``total`` units: a bar on a terminal, throttled lines elsewhere.

    ``update(n, **fields)`` adds ``n`` done units; ``fields`` (loss, tok/s...) are shown
    on the bar, or in the line. Lines go to ``logger`` at INFO: one every ``every_n``
    units or ``seconds`` seconds, whichever comes first, and one at the end.
    """

    def __init__(self, desc: str, total: int, *, logger: logging.Logger, every_n: int = 50,
                 seconds: float = 30.0, mode: ProgressMode | None = None, start: int = 0) -> None:
        self.desc, self.total, self.logger = desc, total, logger
        self.every_n, self.seconds = max(1, every_n), seconds
        self.done, self.fields = start, {}
        self.t0 = self.last_line = time.monotonic()
        self.start = start
        self.mode = mode or progress_mode()
        self.bar: Any = None
        if self.mode == "bar":
            if _in_ray_worker():
                from ray.experimental.tqdm_ray import tqdm as ray_tqdm

                self.bar = ray_tqdm(desc=desc, total=total)
                self.bar.n = start
            else:
                from tqdm import tqdm

                self.bar = tqdm(desc=desc, total=total, initial=start, dynamic_ncols=True, file=sys.stdout)

    def update(self, n: int = 1, **fields: float | str) -> None:
        self.done += n
        self.fields = fields
        if self.bar is not None:
            # Ray's bar shows only a description: the fields go there.
            self.bar.set_description(f"{self.desc} {format_fields(fields)}".strip())
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.done % self.every_n == 0 or now - self.last_line >= self.seconds or self.done >= self.total:
            self.last_line = now
            self.logger.info("%s", self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        return (f"{self.desc} {self.done}/{self.total} {format_fields(self.fields)} "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s").replace("  ", " ")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_fields(fields: Mapping[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def every_n_for(total: int, lines: int = 20) -> int:
    """A line interval that prints about ``lines`` lines over ``total`` units."""
    return max(1, total // lines)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def summary_lines(result: Mapping[str, Any], max_lines: int = 25) -> list[str]:
    """A stage's result as ``key: value`` lines: scalars, short lists and one level of
    nesting; what does not fit is left to the JSON file."""
    lines: list[str] = []
    for key, value in result.items():
        if _scalar(value):
            lines.append(f"  {key}: {value}")
        elif isinstance(value, list | tuple) and len(value) <= 6 and all(_scalar(v) for v in value):
            lines.append(f"  {key}: {', '.join(str(v) for v in value)}")
        elif isinstance(value, Mapping):
            inner = [f"{k}={v}" for k, v in value.items() if _scalar(v)]
            if inner:
                text = ", ".join(inner)
                lines.append(f"  {key}: {text if len(text) <= 160 else text[:157] + '...'}")
    return lines[:max_lines]
