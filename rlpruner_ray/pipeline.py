"""compress(): the outer loop of RL-Pruner, resumable step by step.

    preflight (every refusal; the base model's graph, built once)
    -> prepare the folder -> the base model (loaded or trained) and its sizes
    -> restore the RunState of the last finished step -> Ray, the model store
    -> for each step, run_step: publish the new base -> search (parallel actors)
       -> prune physically -> KD fine-tune -> validate -> record -> step checkpoint
    -> teardown -> final test evaluation (the only read of the test split) -> report files

Each step's randomness is seeded from (seed, step), and everything a step
needs to continue is in its checkpoint (:class:`run_state.RunState`), so a run
killed anywhere and resumed with ``--resume`` ends with the same result files
as an uninterrupted run. The one-shot commands are in :mod:`rlpruner_ray.commands`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import compute
from . import console
from . import halving
from .config import RESULT_KEYS, CompressConfig
from .data import Dataset
from .errors import ConfigError, RLPrunerError, StepFailed, one_line
from .graph import PruningGraph, group_widths
from .incumbent import Rescorer
from .measure import GPU_LATENCY_SETTING, LATENCY_SETTINGS, macs_params, time_against_base
from .models import build_model, model_spec
from .plans import apply_plan
from .problem import StepTargets, build_graph, check_model, load_data, score_graph, train_settings
from .report import HistoryWriter, LearningCurves, write_report
from .run_state import RunState
from .search.base import Evaluator, StepContext
from .search.registry import check_algorithm, make_algorithm, planned_bundles
from .train import evaluate, finetune_kd, train_base

log = logging.getLogger("rlpruner_ray")

RESULT_FILES = ("summary.json", "history.parquet", "pruned_model.pt", "report.png")


class RunFolder:
    """Names of everything a run writes under its output folder. Steps are numbered
    from 1 everywhere a person reads them (log, summary, history, file names)."""

    def __init__(self, root):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.base = self.root / "base_model.pt"
        self.steps = self.root / "steps"
        self.history = self.root / "history"
        self.summary = self.root / "summary.json"
        self.model = self.root / "pruned_model.pt"
        self.curves = self.root / "tensorboard"
        self.log = self.root / console.LOG_FILE

    def step_file(self, number: int) -> Path:
        return self.steps / f"step_{number:03d}.pt"

    def algo_dir(self, number: int) -> Path:
        return self.steps / f"step_{number:03d}_algo"

    def finished_steps(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.steps.glob("step_*.pt")) if self.steps.exists() else []

    def is_legacy(self) -> bool:
        """Written by a version that numbered steps from 0 (its first step is step_000)."""
        return self.step_file(0).exists()


# ---------------------------------------------------------------------- set-up checks
def prepare_run(config: CompressConfig) -> RunFolder:
    """Check the output folder before any work: refuse to mix runs, refuse to
    resume with different settings. Writes nothing."""
    run = RunFolder(config.out_dir)
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"out_dir {run.root} exists and is not a folder")
    has_run = run.config.exists()
    if config.resume:
        if not has_run:
            raise ConfigError(f"nothing to resume in {run.root} (no config.json)")
        saved = ckpt.load_json(run.config)
        diff = [k for k in RESULT_KEYS if _norm(saved.get(k)) != _norm(getattr(config, k))]
        if diff:
            raise ConfigError(f"--resume with different settings than the run in {run.root}: {', '.join(diff)}")
        if run.is_legacy():
            raise ConfigError(f"{run.root} was written by an older rlpruner (steps numbered from 0); "
                              "resume it with that version or start over with --overwrite")
    elif has_run and not config.overwrite:
        raise ConfigError(f"{run.root} already holds a run; pass --resume to continue it or --overwrite")
    return run


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------- pieces
def _batches_per_epoch(config: CompressConfig, data: Dataset, *, finetune: bool) -> int:
    from .train import batches_per_epoch
    batch = (config.finetune_batch_size or config.batch_size) if finetune else config.batch_size
    return batches_per_epoch(len(data.train), batch, config.max_batches_per_epoch)


def finetune_epochs(config: CompressConfig, data: Dataset) -> int:
    """Epochs of KD fine-tuning after a step: --finetune-epochs, or as many as
    --finetune-batches needs (the last one cut short by ``TrainSettings.max_batches``)."""
    if config.finetune_batches is None:
        return config.finetune_epochs
    return -(-config.finetune_batches // _batches_per_epoch(config, data, finetune=True))


def training_progress(config: CompressConfig, data: Dataset, epochs: int, label: str, *, finetune: bool = False):
    """A progress display over the training batches of ``epochs`` epochs, and a view
    of ``data`` that advances it with every training batch it hands out (the
    training loop needs no hook for it)."""
    total = epochs * _batches_per_epoch(config, data, finetune=finetune)
    if finetune and config.finetune_batches is not None:
        total = min(total, config.finetune_batches)
    bar = console.Progress(total, label)
    view = copy.copy(data)

    def batches(split, *args, **kwargs):
        for batch in data.batches(split, *args, **kwargs):
            yield batch
            if split == "train":
                bar.update()

    view.batches = batches
    return bar, view


def base_source(config: CompressConfig, run: RunFolder) -> Path | None:
    """The file the base model comes from: ``--base-checkpoint``, else the one this
    folder holds (an earlier attempt's, or ``rlpruner train``'s); None: trained now."""
    if config.base_checkpoint:
        return Path(config.base_checkpoint)
    return run.base if run.base.exists() else None


def open_base(config: CompressConfig, data: Dataset, source) -> torch.nn.Module:
    """The base model before any work: loaded from ``source``, or (None) the model
    :func:`prepare_base` trains, initialised at the run's seed."""
    if source is not None:
        return ckpt.load_pruned(source, allow_import=config.model)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.in_channels)
    return ckpt.tag_model(model, model_spec(config.model, data.num_classes, data.in_channels),
                          data.example_inputs(1).shape[1:])


def prepare_base(config: CompressConfig, data: Dataset, run: RunFolder, device: str, model, source,
                 ledger: compute.Ledger | None = None):
    """``model`` from :func:`open_base`, ready: a file's model as it is (a given
    ``--base-checkpoint`` is copied into the folder), else trained now and saved as
    the run's ``base_model.pt``. Compute is charged to ``ledger``; a resumed run gets
    back what training its own base cost. Returns the same model object."""
    if source is not None:
        if ledger is not None and config.resume and not config.base_checkpoint:
            ledger.restore(ckpt.read_model_record(source)["meta"].get("compute"))
        if config.base_checkpoint:
            ckpt.save_pruned(model, run.base, meta={"source": str(source)})
        return model
    log.info("training the base model %s on %s for %d epochs", config.model, data.name, config.train_epochs)
    bar, counted = training_progress(config, data, config.train_epochs, "base training")
    with bar:
        result = train_base(model, counted, train_settings(config, epochs=config.train_epochs,
                                                           lr=config.train_lr, seed=config.seed, device=device,
                                                           label="base training"),
                            ledger=ledger)
    meta = {"val_top1": result.best_val_top1, "epochs": result.epochs}
    if ledger is not None:
        meta["compute"] = ledger.state_dict()
    ckpt.save_pruned(model.cpu(), run.base, meta=meta)
    return model


def measure_model(model, data: Dataset, device: str, *, test: bool, ledger: compute.Ledger | None = None) -> dict:
    example = data.example_inputs(1)
    macs, params = macs_params(model.cpu(), example)
    out = {"macs": macs, "params": params,
           "val_top1": evaluate(model, data, "val", device=device, ledger=ledger)["top1"]}
    if test:      # a run's one read of the test images: the final part when divided, else all
        t = evaluate(model, data, data.final_split, device=device, ledger=ledger)
        out.update(test_top1=t["top1"], test_top5=t["top5"])
        if data.selection is not None:
            out["selection_top1"] = evaluate(model, data, "selection", device=device, ledger=ledger)["top1"]
    model.to(device)
    return out


def measure_pair(base, pruned, data: Dataset, device: str,
                 ledger: compute.Ledger | None = None) -> tuple[dict, dict]:
    """Base and pruned model on val and test, and their latencies timed in
    alternation, so a busy machine slows both alike (median and quartiles)."""
    ledger = ledger or compute.Ledger()
    measured = {"base": measure_model(base, data, device, test=True, ledger=ledger),
                "pruned": measure_model(pruned, data, device, test=True, ledger=ledger)}
    shape = tuple(data.example_inputs(1).shape[1:])
    settings = list(LATENCY_SETTINGS) + ([GPU_LATENCY_SETTING] if torch.cuda.is_available() else [])
    example = data.example_inputs(1)
    sizes = {m: compute.model_macs(m, example) for m in (base, pruned)}
    for setting in settings:
        label = setting[0]
        with ledger.timed("latency_timing"), compute.counting_forwards(base, sizes[base]) as a, \
                compute.counting_forwards(pruned, sizes[pruned]) as b:
            timed = time_against_base(base, pruned, shape, setting)
        ledger.add("latency_timing", a[0] + b[0])
        for name, t in timed.items():
            measured[name][f"latency_ms_{label}"] = t["median"]
            measured[name][f"latency_ms_{label}_quartiles"] = [t["q1"], t["q3"]]
        # the pruned model's fastest pass over the base's (measure.compare_latency says why)
        measured["pruned"][f"latency_ratio_{label}"] = timed["pruned"]["ratio"]
    for model in (base, pruned):
        model.to(device)
    return measured["base"], measured["pruned"]


def _step_failed(run: RunFolder, config: CompressConfig, label: str, exc: Exception) -> StepFailed:
    """An unexpected error inside a step as one StepFailed line naming the step and
    the model, with its traceback appended to the run's log.txt; the steps finished
    before it keep their checkpoints (``--resume`` goes on from there)."""
    console.append_to_log(run.root, f"{label} of model {config.model} failed:\n{traceback.format_exc()}\n")
    return StepFailed(f"{label} of model {config.model} failed: {one_line(exc)[:300]} (traceback in "
                      f"{run.log}; finished steps are kept: rerun with --resume)")


# ---------------------------------------------------------------------- the loop
def compress(config: CompressConfig, on_step=None) -> dict:
    """Run RL-Pruner end to end; returns the summary (also written to summary.json).

    ``on_step(record, run_folder)`` is called after each step's checkpoint is on
    disk (a Tune trial reports and checkpoints from it)."""
    config.validate()
    check_algorithm(config)
    run = prepare_run(config)
    if config.resume and run.summary.exists() and len(run.finished_steps()) >= config.num_steps:
        log.info("the run in %s is already finished; its results are unchanged", run.root)
        return ckpt.load_json(run.summary)
    started = time.perf_counter()
    device = config.resolved_device()      # (a GPU that is not there: refused before anything is written)
    checked = preflight(config, run)
    reset_folder(config, run)
    # the compute this run executes; a resumed run continues the counts of its last
    # checkpoint (like its wall time, work a kill threw away is not counted)
    ledger = compute.Ledger()
    base = prepare_base(config, checked.data, run, device, checked.model, checked.source, ledger)
    base = base.to(device).eval()
    graph = checked.graph.to(device)        # the base model's graph, built once (in preflight)
    if not graph.masking_exact:
        log.info("masked scoring is not exact for %d group(s), which need the physical path: %s",
                 len(graph.inexact), "; ".join(sorted(set(graph.inexact.values())))[:300])
    state = restore(config, run, device, ledger, base, started)
    loop = open_loop(config, run, checked.data, device, base, graph, state)
    try:
        start_search(loop, state)
        for step in range(len(state.steps), config.num_steps):
            record = run_step(loop, state, step)
            if on_step is not None:
                on_step(record, run)
    except (RLPrunerError, KeyboardInterrupt):
        raise
    except Exception as exc:    # the step under way is the one after the last recorded
        raise _step_failed(run, config, f"step {len(state.steps) + 1}/{config.num_steps}", exc) from exc
    finally:
        loop.close()
        if checked.own_ray:
            from .runtime import shutdown_ray
            shutdown_ray()
    return finish(config, run, checked.data, base, state.model, state.steps, loop.original, device,
                  wall_seconds=state.wall_seconds, exactness=graph.exactness(), ledger=state.ledger)


@dataclass
class Checked:
    """What :func:`preflight` found usable: the data, the base model (loaded, or
    initialised for training) with the file it came from, and its graph."""
    data: Dataset
    model: torch.nn.Module
    source: Path | None
    graph: PruningGraph
    own_ray: bool                  # Ray was not running: this run starts it and shuts it down


def preflight(config: CompressConfig, run: RunFolder) -> Checked:
    """Everything that can be refused, before the first byte is written, and what
    needs no data before the data is loaded (a refusal is the only line printed)."""
    # --overwrite deletes the folder's own base model before it could be used
    source = base_source(config, run) if config.base_checkpoint or not config.overwrite else None
    probe = ckpt.load_pruned(source, allow_import=config.model) if source is not None else None
    from .cluster_offer import check_request
    from .runtime import init_ray, local_offer
    import ray
    own_ray = not ray.is_initialized()
    if config.ray_address:
        init_ray(config.ray_address, run.root)
    # refused here only when it can never fit; an autoscaling cluster gets time to grow
    # when the evaluation pool starts
    check_request(planned_bundles(config), f"algorithm {config.algo}", offered=None if
                  (config.ray_address or not own_ray) else local_offer())
    data = load_data(config)
    model = probe if probe is not None else open_base(config, data, None)
    return Checked(data, model, source, check_model(config, data, model, source), own_ray)


def reset_folder(config: CompressConfig, run: RunFolder) -> None:
    """The output folder, ready: emptied of an earlier run's files (--overwrite),
    cleared of temp files a kill left (--resume), with the config written and the
    libraries' output going to its log.txt (not the terminal)."""
    if config.overwrite and run.root.exists():
        for p in [run.steps, run.history, run.base, run.curves, run.log, *[run.root / f for f in RESULT_FILES]]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run.root.mkdir(parents=True, exist_ok=True)
    console.attach_log(run.root)
    if config.resume:   # temp files of writes a kill cut short (their targets are intact)
        ckpt.remove_stale_temps(run.root, run.steps, run.history)
    ckpt.atomic_write_json(run.config, config.to_dict())


def restore(config: CompressConfig, run: RunFolder, device: str, ledger: compute.Ledger, base,
            started: float) -> RunState:
    """The state after the last finished step (a resumed run, its ledger and wall
    time included), or before the first: ``base`` to prune, ``ledger`` counting."""
    done = run.finished_steps()
    if not done:
        return RunState(model=base, ledger=ledger, started=started)
    state = RunState.load(run.step_file(done[-1]), allow_import=config.model, device=device, started=started)
    log.info("resuming after step %d of %d", done[-1], config.num_steps)
    return state


@dataclass
class Loop:
    """What every step of a run shares: its fixed inputs, the base model's sizes,
    and the services it opened (the model store, the algorithm and its evaluation
    pool, the history and the learning curves). ``version``: the step whose base
    model the store holds (-1: none yet)."""
    config: CompressConfig
    run: RunFolder
    data: Dataset
    device: str
    base: torch.nn.Module
    base_graph: PruningGraph
    original: dict
    targets: StepTargets
    base_top1: float | None          # the drop guard's reference at step 0
    store: object
    store_name: str
    history: HistoryWriter
    curves: LearningCurves
    algo: object = None
    pool: object = None
    rescorer: Rescorer | None = None      # the re-score of the incumbent rule and of successive halving
    graph: PruningGraph | None = None
    context: dict | None = None
    version: int = -1

    def close(self) -> None:
        import ray
        self.curves.close()
        if self.pool is not None:
            self.pool.close()
        if self.algo is not None:
            self.algo.close()
        ray.kill(self.store)


def open_loop(config: CompressConfig, run: RunFolder, data: Dataset, device: str, base, base_graph: PruningGraph,
              state: RunState) -> Loop:
    """The teacher's accuracy (a fresh run measures the base model), Ray, the model
    store, the history and the learning curves."""
    if state.teacher_acc is None:
        state.teacher_acc = evaluate(base, data, "val", device=device, ledger=state.ledger)["top1"]
    curves = LearningCurves(run.curves)
    if not state.steps:
        curves.step(0, {"val_top1": state.teacher_acc, "sparsity": 0.0, "macs_kept": 1.0, "params_kept": 1.0})
    from .model_store import start_store
    from .runtime import init_ray
    init_ray(config.ray_address, run.root)
    store, store_name = start_store()
    original = base_graph.sizes()
    return Loop(config, run, data, device, base, base_graph, original,
                StepTargets.of(config, original["total_channels"]),
                state.teacher_acc if not state.steps else None, store, store_name,
                HistoryWriter(run.history, algo=config.algo, base_macs=original_macs(original)), curves)


def start_search(loop: Loop, state: RunState) -> None:
    """The first step of this process: its base model published, the algorithm made
    (with the state it had after the last finished step) and its evaluation pool.
    A run killed after its last step has none (it goes straight to the report)."""
    start = len(state.steps)
    if start >= loop.config.num_steps:
        return
    # a fresh run's first base is the base model, whose graph is already built
    graph = (score_graph(loop.config, loop.base_graph, loop.data, loop.device, state.ledger) if start == 0
             else None)
    publish_base(loop, state, start, graph)
    loop.algo = make_algorithm(loop.config, store_name=loop.store_name)
    loop.algo.load_state_dict(state.algo_state)
    if start:
        loop.algo.load_extra(loop.run.algo_dir(start))
    if loop.algo.uses_pool:
        from .search.workers import EvaluationPool
        loop.pool = EvaluationPool(loop.config, loop.store_name)
    if loop.algo.holds_incumbent or loop.algo.selects_by_halving:
        loop.rescorer = Rescorer(loop.config, loop.data, loop.device, state.ledger)


def publish_base(loop: Loop, state: RunState, step: int, graph: PruningGraph | None = None) -> None:
    """Step ``step``'s base model (``state.model``) and its graph (built here unless
    given) and context, published to every environment through the store."""
    import ray
    from .model_store import make_payload
    graph = graph or build_graph(loop.config, state.model, loop.data, loop.device, state.ledger)
    context = loop.targets.context(step, loop.original, graph)
    ray.get(loop.store.publish.remote(make_payload(state.model, graph, context, version=step)))
    loop.graph, loop.context, loop.version = graph, context, step


def run_step(loop: Loop, state: RunState, step: int) -> dict:
    """One pruning step (``step``: 0-based, for seeds and contexts): the new base
    published, the search, the chosen plan applied and KD fine-tuned, the step's
    record, history and curves, and the checkpoint. Returns the record."""
    config, data, device, ledger = loop.config, loop.data, loop.device, state.ledger
    t0 = time.perf_counter()
    if loop.version != step:
        publish_base(loop, state, step)
        loop.algo.on_new_base(step)
    graph = loop.graph
    number = step + 1     # what people read
    label = f"step {number}/{config.num_steps}"
    found = search_step(loop, state, step, label, t0)
    chosen = found.chosen
    small = found.model if found.model is not None else apply_plan(graph, chosen.counts, chosen.indices)
    before = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
    epochs = finetune_epochs(config, data)
    bar, counted = training_progress(config, data, epochs, f"{label} fine-tuning", finetune=True)
    teacher = state.teacher if state.teacher is not None else loop.base
    with bar:
        ft = finetune_kd(small, teacher, counted,
                         train_settings(config, epochs=epochs, lr=config.finetune_lr, seed=config.seed + step + 1,
                                        device=device, finetune=True, label=f"{label} fine-tuning"),
                         temperature=config.kd_temperature, alpha=config.kd_alpha, ledger=ledger)
    after = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
    if after > state.teacher_acc:  # a better pruned model becomes the teacher (as in the paper)
        state.teacher, state.teacher_acc = small, after
    record = step_record(loop, number, small, found, before=before, after=after, finetuned=ft, t0=t0)
    state.steps.append(record)
    loop.curves.step(number, {"val_top1": after, "val_top1_before_finetune": before,
                              "sparsity": record["sparsity"], "macs_kept": 1 - record["macs_reduction"],
                              "params_kept": 1 - record["params_reduction"], "best_reward": found.evaluator.best.reward,
                              "chosen_reward": chosen.reward})
    loop.history.flush(number, chosen.index)
    loop.algo.save_extra(loop.run.algo_dir(number))
    state.model, state.algo_state = small, loop.algo.state_dict()
    state.checkpoint(loop.run.step_file(number))
    log.info("step %d/%d: %d evaluations, best reward %.4f; %.1f%% filters removed, MACs %.1f%% of "
             "base; val %.4f -> %.4f after fine-tuning (%.1fs)", number, config.num_steps,
             found.evaluator.used, found.evaluator.best.reward, 100 * record["sparsity"],
             100 * record["macs"] / loop.original["macs"], before, after, record["step_seconds"])
    return record


@dataclass
class Search:
    """A step's search: the chosen candidate, the evaluator (every candidate it
    scored), the step context (``skipped`` candidates) and its seconds since the
    step began (the new base's graph included)."""
    chosen: object
    evaluator: Evaluator
    ctx: StepContext
    seconds: float
    model: torch.nn.Module | None = None     # the chosen plan's network, when selection fine-tuned it
    halving: dict | None = None              # successive halving's stages (halving.select)


def search_step(loop: Loop, state: RunState, step: int, label: str, t0: float) -> Search:
    """The step's search over ``loop.graph``, its compute charged; candidates go to
    the history and the curves as they come."""
    config, number = loop.config, step + 1
    spent = sum(s["evaluations"] for s in state.steps)
    searching = console.Progress(config.evaluations_per_step, f"{label} evaluations")

    def on_candidate(c, seconds):
        loop.history.add(c, seconds)
        loop.curves.evaluation(spent + c.index + 1, c)
        searching.update()

    # an algorithm without evaluation actors (RLlib's) scores what it asks the
    # evaluator for on the driver
    pool = loop.pool
    score = (lambda ds, v=step: pool.evaluate(ds, v)) if pool is not None else loop.algo.score
    evaluator = Evaluator(score, config.evaluations_per_step, on_candidate=on_candidate)
    ctx = StepContext(step, config.num_steps, loop.graph, np.random.default_rng([config.seed, step]),
                      reference_accuracy=state.steps[-1]["chosen_accuracy"] if state.steps else loop.base_top1,
                      extras={k: loop.context.get(k) for k in ("num_filters", "cost_target")},
                      rescore=functools.partial(loop.rescorer, loop.graph) if loop.rescorer is not None else None)
    searched = time.perf_counter()
    with searching:
        chosen = loop.algo.search(ctx, evaluator)
    for skip in ctx.skipped:
        log.warning("step %d/%d: the %s candidate is skipped: %s", number, config.num_steps,
                    skip["candidate"], skip["reason"])
    seconds = time.perf_counter() - t0
    charge_search(state.ledger, evaluator.candidates, time.perf_counter() - searched)
    return choose(loop, state, Search(chosen, evaluator, ctx, seconds), label)


def choose(loop: Loop, state: RunState, found: Search, label: str) -> Search:
    """The plan the step applies, after the search chose ``found.chosen``: by
    successive halving (``halving``: its winner comes with its fine-tuned network),
    by the incumbent rule, or the search's choice itself."""
    config, number, ctx = loop.config, found.ctx.step + 1, found.ctx
    if loop.algo.selects_by_halving:
        teacher = state.teacher if state.teacher is not None else loop.base
        picked = halving.select(config, loop.graph, found.evaluator.candidates, loop.rescorer, teacher,
                                loop.data, loop.device, state.ledger, seed=config.seed + 1000 + number, label=label,
                                pool=loop.pool, version=loop.version)
        r = picked.record
        log.info("step %d/%d: successive halving applies the %s candidate %d (top-1 %.4f on %d images after "
                 "%d KD batches)", number, config.num_steps, r["winner_source"], r["winner_index"],
                 r["winner_top1"], r["stage2_images"], r["kd_batches"])
        return dataclasses.replace(found, chosen=picked.chosen, model=picked.model, halving=r)
    found.chosen = loop.algo.keep_incumbent(ctx, found.evaluator, found.chosen)   # (passes: the ledger's rescore)
    if ctx.incumbent and "images" in ctx.incumbent:
        r = ctx.incumbent
        log.info("step %d/%d: the %s is applied (re-score on %d images: incumbent %s %.4f, challenger "
                 "%s %.4f, gain %+.4f, s.e. %s, z %.2f)", number, config.num_steps, r["applied"],
                 r["images"], r["incumbent_source"], r["incumbent_top1"], r["challenger_source"],
                 r["challenger_top1"], r["difference"], r["standard_error"], r["z"])
    return found


def step_record(loop: Loop, number: int, small, found: Search, *, before: float, after: float, finetuned,
                t0: float) -> dict:
    """What summary.json's ``steps`` and the step checkpoint keep of step ``number``:
    ``small`` (the pruned and fine-tuned model) against the base model, the search's
    choice, val accuracy ``before`` and ``after`` fine-tuning."""
    original, chosen, evaluator = loop.original, found.chosen, found.evaluator
    macs, params = macs_params(small, loop.data.example_inputs(1).to(loop.device))
    removed = original["total_channels"] - (loop.graph.total_channels - int(chosen.counts.sum()))
    record = {
        "step": number, "filters_removed": int(removed),
        "sparsity": removed / original["total_channels"],
        "macs": macs, "params": params,
        "macs_reduction": 1 - macs / original["macs"], "params_reduction": 1 - params / original["params"],
        "chosen_reward": chosen.reward, "chosen_accuracy": chosen.accuracy, "chosen_source": chosen.source,
        "best_reward": evaluator.best.reward, "evaluations": evaluator.used,
        "val_top1_before_finetune": before, "val_top1": after, "finetune_best_epoch": finetuned.best_epoch,
        "finetune_batches": finetuned.batches,
        "macs_executed": sum(c.macs_executed for c in evaluator.candidates),
        "search_seconds": found.seconds, "step_seconds": time.perf_counter() - t0,
        "distribution": (chosen.counts / max(chosen.counts.sum(), 1)).tolist(),
        "counts": chosen.counts.tolist(),
        "skipped": list(found.ctx.skipped), "incumbent_rule": found.ctx.incumbent,
        "halving": found.halving,
    }
    if loop.pool is not None:
        record.update(loop.pool.scoring_choice())
    return record


def original_macs(original: dict) -> int:
    """MACs of one image through the original base model: the unit of forward-equivalents."""
    return int(round(original["macs"]))


def charge_search(ledger: compute.Ledger, candidates, seconds: float) -> None:
    """A step's search on the ledger: each candidate's scoring passes as its worker
    counted them, BN recalibration apart. The workers run in parallel, so their
    seconds overlap: the driver's wall time of the search is split between search and
    recalibration in the share the workers measured."""
    bn_macs = sum(c.bn_recalibration_macs for c in candidates)
    ledger.add("search", sum(c.macs_executed for c in candidates) - bn_macs)
    ledger.add("bn_recalibration", bn_macs)
    worker_s = sum(c.worker_s for c in candidates)
    bn_share = sum(c.bn_recalibration_s for c in candidates) / worker_s if worker_s > 0 else 0.0
    ledger.add("search", seconds=seconds * (1 - bn_share))
    ledger.add("bn_recalibration", seconds=seconds * bn_share)


def finish(config, run: RunFolder, data, base, model, steps, original, device, *, wall_seconds,
           exactness: dict, ledger: compute.Ledger) -> dict:
    """Final report: the one and only evaluation on the test split. Groups are
    listed in the layers' order in the model (the graph's order) everywhere."""
    base_m, pruned_m = measure_pair(base, model, data, device, ledger)
    ckpt.save_pruned(model.cpu(), run.model, meta={"config": config.to_dict()})
    groups = list(original["channels"])
    channels_after = group_widths(model, groups)
    wall = wall_seconds()
    summary = {
        "config": config.to_dict(),
        "base": base_m, "pruned": pruned_m,
        "reductions": {"filters": steps[-1]["sparsity"] if steps else 0.0,
                       "macs": 1 - pruned_m["macs"] / base_m["macs"],
                       "params": 1 - pruned_m["params"] / base_m["params"],
                       "macs_speedup": base_m["macs"] / pruned_m["macs"]},
        "steps": steps,
        # optional candidates left out, and why (each step's record has its own)
        "skipped": [{"step": s["step"], **k} for s in steps for k in s.get("skipped", [])],
        "evaluations": int(sum(s["evaluations"] for s in steps)),
        "groups": groups, "channels_before": original["channels"], "channels_after": channels_after,
        "scoring_exactness": exactness,
        "wall_seconds": wall,
        "compute": ledger.summary(original_macs(original), wall),
        "files": {"history": "history.parquet", "model": "pruned_model.pt", "report": "report.png"},
    }
    HistoryWriter.combine(run.history, run.root / "history.parquet")
    write_report(summary, run.root / "report.png")
    ckpt.atomic_write_json(run.summary, summary, sort_keys=False)
    log.info("done: test top-1 %.4f -> %.4f, MACs -%.1f%%, params -%.1f%% (%s)", base_m["test_top1"],
             pruned_m["test_top1"], 100 * summary["reductions"]["macs"], 100 * summary["reductions"]["params"],
             run.root)
    return summary


# ---------------------------------------------------------------------- checks for other commands
def check_inputs(config: CompressConfig, base=None) -> Dataset:
    """Refuse what a run could not use, before it writes anything (``sweep`` and
    ``compare`` before their first trial; ``compress`` makes the same checks in its
    own order): the base model file (``base``, default ``--base-checkpoint``:
    present, ours), then the data set, then :func:`check_model`. Returns the data."""
    base = base if base is not None else config.base_checkpoint
    probe = ckpt.load_pruned(base, allow_import=config.model) if base else None
    data = load_data(config)
    check_model(config, data, probe, base)
    return data


