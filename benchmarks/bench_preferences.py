"""Preference pipeline throughput and memory: whole pipeline vs the teacher alone, 1 vs 2
actors at each size, and streaming at two cohort sizes. Prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_preferences.py                  # 10k and 100k cases
    .venv/bin/python benchmarks/bench_preferences.py --sizes 2000     # a quick look
    # a teacher that costs more than the pipeline around it (6 ms/row), 10k and 100k:
    .venv/bin/python benchmarks/bench_preferences.py --teacher-hidden 256 --plot /tmp/preferences.png
    # PLIP's size and cost (CLIP ViT-B/32 on 224 px tiles, ~95 ms/row):
    .venv/bin/python benchmarks/bench_preferences.py --sizes 10000 --unique 2000 --image-size 224 \
        --teacher-image 224 --teacher-patch 32 --teacher-hidden 768 --teacher-layers 12 --object-store-mib 2048

The cohort: ``mint-ray data synth`` renders ``--unique`` tissue tiles (32x32 PNG); larger
cohorts repeat those rows under new sample ids, so every row is still fetched, decoded,
checked, scored, paired and written (the image files are shared; the pipeline caches
nothing). The teacher is an untrained CLIP of the ``--teacher-*`` size: throughput does
not depend on what it learned. Everything runs on local disk in one in-process Ray with
``--logical-cpus`` logical CPUs (the actor-pool stall guard on 2 cores).

Measured:
- teacher alone: the same teacher's model (``score_prepared``, what each actor runs) on the
  same images, prepared beforehand, in this process with one torch thread (what each actor
  gets), batches of ``--batch-size``; no I/O. Its CPU step (``prepare``: the image
  processor's resize and normalisation) runs in the pipeline's CPU tasks and is measured
  apart.
- pipeline: ``mint-ray preferences`` end to end (read, fetch, decode, validate, prepare,
  score, pair, write, commit). ``end to end`` = cases / wall seconds; ``steady`` = rows/s while
  the teacher streams (after its first batch: actor start and model load excluded).
- CPU: seconds used by this process and every process it started (Ray's GCS, raylet,
  workers), split into the teacher actors and everything else. The difference between
  two cohort sizes is the per-row cost without start-up.
- peak memory: the highest sum of PSS over the same processes, sampled every 5 s.

Projected (for a shared machine, where wall-clock rates follow the neighbours' load):
from the per-row CPU costs, on 2 dedicated cores, 1 actor runs at 1/max(actor, rest)
(the rest on the other core) and 2 actors at 2/(actor + rest).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from mint_ray import storage
from mint_ray.config import build_config
from mint_ray.data import synth
from mint_ray.images import ImageLimits, decode_rgb
from mint_ray.preferences import run as preferences
from mint_ray.preferences.config import Config as PreferencesConfig
from mint_ray.ray_cluster import worker_env
from mint_ray.tasks import TISSUE_TYPES
from mint_ray.teachers import Case, load_teacher, save_teacher_dir
from mint_ray.teachers.clip import ClipSettings, build_tiny_clip

ACTOR = "TeacherScorer"  # in the process title of the teacher actors


class ProcessTree:
    """Samples this process and everything it started: CPU seconds used meanwhile (every
    ``every_s``), for the teacher actors and for the rest, and the peak PSS sum (every
    ``pss_every`` samples: reading smaps is costly). The sampler's own CPU is left out."""

    def __init__(self, every_s: float = 0.5, pss_every: int = 10) -> None:
        self.every_s = every_s
        self.pss_every = pss_every
        self.peak_pss = 0
        self._start: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._actors: set[int] = set()
        self._own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _processes() -> list[psutil.Process]:
        me = psutil.Process()
        return [me, *me.children(recursive=True)]

    def _sample(self, pss: bool) -> None:
        total = 0
        for proc in self._processes():
            try:
                times = proc.cpu_times()
                if ACTOR in proc.name():
                    self._actors.add(proc.pid)
                total += proc.memory_full_info().pss if pss else 0
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self._last[proc.pid] = times.user + times.system
            self._start.setdefault(proc.pid, 0.0)
        self.peak_pss = max(self.peak_pss, total)

    def cpu_seconds(self, actors: bool) -> float:
        used = sum(last - self._start[pid] for pid, last in self._last.items() if (pid in self._actors) == actors)
        return used if actors else used - self._own_cpu

    def _loop(self) -> None:
        tick = 0
        while not self._stop.is_set():
            before = time.thread_time()
            self._sample(pss=tick % self.pss_every == 0)
            self._own_cpu += time.thread_time() - before
            tick += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> ProcessTree:
        for proc in self._processes():
            times = proc.cpu_times()
            self._start[proc.pid] = times.user + times.system
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(pss=True)


def make_cohort(work: Path, unique: int, size: int, image_size: int) -> str:
    """A cohort of ``size`` rows over ``unique`` rendered tiles."""
    base = str(work / f"base-{unique}-{image_size}")
    if storage.read_manifest(base) is None:
        synth.run(build_config(synth.Config, {
            "task": "tissue_type", "output_uri": base, "sizes": {"n_samples": unique},
            "image_size": image_size, "tracking": {"enabled": False}}))
    uri = str(work / f"cohort-{size}")
    manifest = storage.read_manifest(uri)
    if manifest is None or manifest.num_rows != size or manifest.meta.get("base") != base:
        rows = storage.read_dataset(base)
        index = pa.array(np.arange(size) % rows.num_rows)
        table = rows.take(index).set_column(
            0, "sample_id", pa.array([f"bench-{i:07d}" for i in range(size)], pa.string()))
        storage.write_dataset(uri, table, overwrite=True,
                              meta={**storage.read_manifest(base).meta, "base": base})
    return uri


def make_teacher(work: Path, args: argparse.Namespace) -> str:
    uri = str(work / f"teacher-h{args.teacher_hidden}-l{args.teacher_layers}-i{args.teacher_image}"
                     f"-p{args.teacher_patch}")
    if not (Path(uri) / "mint_teacher.json").exists():
        settings = ClipSettings(hidden_size=args.teacher_hidden, intermediate_size=4 * args.teacher_hidden,
                                layers=args.teacher_layers, heads=4, projection_dim=64,
                                image_size=args.teacher_image, patch_size=args.teacher_patch, vocab_size=400)
        save_teacher_dir(build_tiny_clip(settings, name="bench-clip", task="tissue_type",
                                         labels=TISSUE_TYPES), uri)
    return uri


def teacher_alone(teacher_uri: str, cohort: str, rows: int, batch_size: int) -> tuple[float, float, float]:
    """Rows/s and CPU-ms/row of the teacher's model (``score_prepared``) on prepared batches,
    one torch thread, no I/O; and the CPU-ms/row of its CPU step (``prepare``)."""
    import torch

    torch.set_num_threads(1)
    teacher = load_teacher(teacher_uri, device="cpu")
    uris = storage.read_dataset(cohort, columns=["image_uri"]).column("image_uri").to_pylist()[:rows]
    cases = [Case(image=decode_rgb(storage.read_bytes(u), ImageLimits())) for u in uris]
    cpu = time.process_time()
    batches = [teacher.prepare(cases[i:i + batch_size]) for i in range(0, len(cases), batch_size)]
    prepare_ms = 1000 * (time.process_time() - cpu) / len(cases)
    teacher.score_prepared(batches[0])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        teacher.score_prepared(batch)
    return len(cases) / (time.perf_counter() - start), 1000 * (time.process_time() - cpu) / len(cases), prepare_ms


def start_local_ray(num_cpus: int, object_store_mib: int) -> None:
    """A fresh in-process cluster. ``address="local"``: a bare ``ray.init()`` joins any Ray
    another user started on this machine (and then refuses ``num_cpus``)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_mib * 2**20,
             include_dashboard=False, runtime_env={"env_vars": worker_env()})


def run_pipeline(work: Path, cohort: str, teacher_uri: str, actors: int,
                 args: argparse.Namespace) -> dict[str, Any]:
    cfg = build_config(PreferencesConfig, {
        "task": "tissue_type", "cohort_uri": cohort, "output_uri": str(work / "out"),
        "image_root": str(work),  # the cohorts reuse the base cohort's images beside them
        "teacher": {"uri": teacher_uri, "num_actors": actors, "batch_size": args.batch_size},
        "storage": {"overwrite": True}, "tracking": {"enabled": False},
        "ray": {"num_cpus": args.logical_cpus}})
    load = os.getloadavg()[0]
    with ProcessTree() as tree:
        summary = preferences.run(cfg)
    return {**summary, "actors": actors, "peak_pss": tree.peak_pss, "load": (load + os.getloadavg()[0]) / 2,
            "cpu_actor": tree.cpu_seconds(actors=True), "cpu_rest": tree.cpu_seconds(actors=False)}


def plot(runs: dict[tuple[int, int], dict[str, Any]], alone: float, title: str, path: str) -> None:
    """Steady rows/s per cohort size, 1 and 2 actors, against the teacher alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = sorted({n for n, _ in runs})
    fig = Figure(figsize=(2.5 + 1.6 * len(sizes), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(sizes))
    for offset, actors in ((-0.2, 1), (0.2, 2)):
        rates = [runs[n, actors]["steady_rows_per_s"] for n in sizes]
        ax.bar(x + offset, rates, 0.4, label=f"{actors} actor{'s' * (actors > 1)}")
        if actors == 2:
            for xi, n, rate in zip(x + offset, sizes, rates, strict=True):
                ax.text(xi, rate, f"x{rate / runs[n, 1]['steady_rows_per_s']:.2f}", ha="center",
                        va="bottom", fontsize=8)
    ax.axhline(alone, color="grey", linestyle="--", label="teacher alone")
    ax.set_xticks(x, [f"{n:,} cases" for n in sizes])
    ax.set_ylabel("rows/s while the teacher streams")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--unique", type=int, default=10_000, help="distinct rendered tiles")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-image", type=int, default=64)
    parser.add_argument("--teacher-patch", type=int, default=8)
    parser.add_argument("--logical-cpus", type=int, default=4)
    parser.add_argument("--object-store-mib", type=int, default=512)
    parser.add_argument("--work", default="/tmp/mint-bench-preferences")
    parser.add_argument("--plot", help="write a PNG of the steady rates here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher_uri = make_teacher(work, args)
    sizes = sorted(args.sizes)
    first, warm = sizes[0], 4 * args.batch_size
    cohorts = {n: make_cohort(work, args.unique, n, args.image_size) for n in {warm, *sizes}}
    alone, alone_cpu, prepare_cpu = teacher_alone(teacher_uri, cohorts[first], min(first, 3000), args.batch_size)
    start_local_ray(args.logical_cpus, args.object_store_mib)
    run_pipeline(work, cohorts[warm], teacher_uri, 2, args)  # starts Ray's worker processes
    runs = {(n, actors): run_pipeline(work, cohorts[n], teacher_uri, actors, args)
            for n in sizes for actors in (1, 2)}

    setup = (f"teacher: CLIP hidden {args.teacher_hidden}, {args.teacher_layers} layers, {args.teacher_image}px "
             f"input, patch {args.teacher_patch}; tiles {args.image_size}px; batch {args.batch_size}; "
             f"{psutil.cpu_count()} cores, {args.logical_cpus} logical CPUs")
    print(f"\n{setup}")
    print(f"teacher alone (its model on prepared inputs), 1 thread, no I/O: {alone:.0f} rows/s measured, "
          f"{alone_cpu:.2f} CPU-ms/row; its CPU step (prepare, in the CPU tasks): {prepare_cpu:.2f} CPU-ms/row\n")
    print("| cases | actors | load avg | seconds | start-up s | rows/s end to end | rows/s steady | "
          "CPU-ms/row actors | CPU-ms/row rest | peak PSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs.values():
        n = r["rows_in"]
        print(f"| {n} | {r['actors']} | {r['load']:.1f} | {r['seconds']:.1f} | {r['startup_s']:.1f} | "
              f"{r['rows_per_s']:.0f} | {r['steady_rows_per_s']:.0f} | {1000 * r['cpu_actor'] / n:.2f} | "
              f"{1000 * r['cpu_rest'] / n:.2f} | {r['peak_pss'] / 2**20:.0f} |")
    print(f"\n1 actor at {first} cases, steady: {runs[first, 1]['steady_rows_per_s'] / alone:.2f}x the teacher alone")
    for n in sizes:
        one, two = runs[n, 1], runs[n, 2]
        print(f"2 actors / 1 actor at {n} cases: x{two['steady_rows_per_s'] / one['steady_rows_per_s']:.2f} steady, "
              f"x{two['rows_per_s'] / one['rows_per_s']:.2f} end to end")
    if len(sizes) > 1:
        lo, hi = runs[sizes[0], 2], runs[sizes[-1], 2]
        rows = hi["rows_in"] - lo["rows_in"]
        actor_ms = 1000 * (hi["cpu_actor"] - lo["cpu_actor"]) / rows
        rest_ms = 1000 * (hi["cpu_rest"] - lo["cpu_rest"]) / rows
        p1, p2, pa_ = 1000 / max(actor_ms, rest_ms), 2000 / (actor_ms + rest_ms), 1000 / alone_cpu
        print(f"{sizes[-1]} vs {sizes[0]} cases (x{sizes[-1] / sizes[0]:.0f}), 2 actors: time "
              f"x{hi['seconds'] / lo['seconds']:.2f}, peak memory x{hi['peak_pss'] / lo['peak_pss']:.2f}")
        print(f"per-row CPU without start-up (from the difference): actors {actor_ms:.2f} ms "
              f"(teacher alone {alone_cpu:.2f}), everything else {rest_ms:.2f} ms")
        print(f"projected on 2 dedicated cores: teacher alone {pa_:.0f} rows/s, pipeline 1 actor "
              f"{p1:.0f} ({p1 / pa_:.2f}x), 2 actors {p2:.0f} (x{p2 / p1:.2f} of 1 actor)")
    if args.plot:
        plot(runs, alone, setup.replace("; tiles", "\ntiles", 1), args.plot)


if __name__ == "__main__":
    main()
