"""compress(): the outer loop of RL-Pruner, resumable step by step.

    base model -> for each step: graph + importance -> search (parallel actors)
    -> prune physically -> KD fine-tune -> validate -> step checkpoint
    -> publish the new base to every environment
    -> final test evaluation (the only read of the test split) -> report files

Each step's randomness is seeded from (seed, step), and everything a step
needs to continue is in its checkpoint, so a run killed anywhere and resumed
with ``--resume`` ends with the same result files as an uninterrupted run.
"""
from __future__ import annotations

import copy
import functools
import logging
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import compute
from . import console
from .config import RESULT_KEYS, CompressConfig
from .data import Dataset
from .errors import ConfigError, ModelError, RLPrunerError, StepFailed, one_line
from .graph import PruningGraph, group_widths
from .incumbent import Rescorer
from .measure import compare_latency, latency_ms, macs_params
from .models import build_model, model_spec
from .problem import StepTargets, build_graph, check_fits, check_model, load_data, train_settings
from .report import HistoryWriter, LearningCurves, write_report
from .plans import apply_plan, global_plan, plan_for_step, tp_plan
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


def load_or_train_base(config: CompressConfig, data: Dataset, run: RunFolder, device: str,
                       ledger: compute.Ledger | None = None):
    """The base model: a given checkpoint, the run's cached one, or trained now (its
    compute charged to ``ledger``; a resumed run gets back what training its own base cost)."""
    source = config.base_checkpoint or (run.base if run.base.exists() else None)
    if source is not None:
        if ledger is not None and config.resume and not config.base_checkpoint:
            ledger.restore(ckpt.read_model_record(source)["meta"].get("compute"))
        model = ckpt.load_pruned(source, allow_import=config.model)
        spec = getattr(model, ckpt.SPEC_ATTR)
        if spec["num_classes"] != data.num_classes or spec["in_channels"] != data.in_channels:
            raise ModelError(f"checkpoint {source} is for {spec['num_classes']} classes / "
                             f"{spec['in_channels']} channels, the dataset has {data.num_classes} / "
                             f"{data.in_channels}")
        if config.base_checkpoint:
            ckpt.save_pruned(model, run.base, meta={"source": str(source)})
        return model
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.in_channels)
    ckpt.tag_model(model, model_spec(config.model, data.num_classes, data.in_channels),
                   data.example_inputs(1).shape[1:])
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
    # (label, device, batch, at least these rounds, and repeated for at least these
    # seconds): batch-1 passes take a millisecond or two, and their median, and the
    # pruned/base ratio, settle only after hundreds of rounds on a busy machine
    settings = [("cpu_b1", "cpu", 1, 30, 3.0), ("cpu_b64", "cpu", 64, 7, 0.0)]
    if torch.cuda.is_available():
        settings.append(("gpu_b64", "cuda", 64, 20, 1.0))
    example = data.example_inputs(1)
    sizes = {m: compute.model_macs(m, example) for m in (base, pruned)}
    for label, where, batch, rounds, seconds in settings:
        with ledger.timed("latency_timing"), compute.counting_forwards(base, sizes[base]) as a, \
                compute.counting_forwards(pruned, sizes[pruned]) as b:
            timed = compare_latency({"base": base, "pruned": pruned}, shape, batch_size=batch, device=where,
                                    rounds=rounds, warmup=10 if batch == 1 else 3, min_seconds=seconds)
        ledger.add("latency_timing", a[0] + b[0])
        for name, t in timed.items():
            measured[name][f"latency_ms_{label}"] = t["median"]
            measured[name][f"latency_ms_{label}_quartiles"] = [t["q1"], t["q3"]]
        # the pruned model's time over the base's, paired within each round
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
    # everything that can be refused is checked before the first byte is written, and
    # what needs no data before the data is loaded (a refusal is the only line printed)
    checkpoint = config.base_checkpoint or (run.base if config.resume and run.base.exists() else None)
    probe = ckpt.load_pruned(checkpoint, allow_import=config.model) if checkpoint is not None else None
    device = config.resolved_device()
    from .cluster_offer import check_request
    from .runtime import init_ray, local_offer, shutdown_ray
    import ray
    own_ray = not ray.is_initialized()
    if config.ray_address:
        init_ray(config.ray_address, run.root)
    # refused here only when it can never fit; an autoscaling cluster gets time to grow
    # when the evaluation pool starts
    check_request(planned_bundles(config), f"algorithm {config.algo}", offered=None if
                  (config.ray_address or not own_ray) else local_offer())
    data = load_data(config)
    check_model(config, data, probe, checkpoint)
    del probe

    if config.overwrite and run.root.exists():
        for p in [run.steps, run.history, run.base, run.curves, run.log, *[run.root / f for f in RESULT_FILES]]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run.root.mkdir(parents=True, exist_ok=True)
    console.attach_log(run.root)    # Ray's and other libraries' output: log.txt (not the terminal)
    if config.resume:   # temp files of writes a kill cut short (their targets are intact)
        ckpt.remove_stale_temps(run.root, run.steps, run.history)
    ckpt.atomic_write_json(run.config, config.to_dict())

    # the compute this run executes; a resumed run continues the counts of its last
    # checkpoint (like its wall time, work a kill threw away is not counted)
    ledger = compute.Ledger()
    base = load_or_train_base(config, data, run, device, ledger).to(device).eval()
    base_graph = PruningGraph(base, data.example_inputs(1).to(device), exclude=config.exclude,
                              min_channels=config.min_channels, max_group_sparsity=config.max_group_sparsity)
    original = base_graph.sizes()
    if not base_graph.masking_exact:
        log.info("masked scoring is not exact for %d group(s), which need the physical path: %s",
                 len(base_graph.inexact), "; ".join(sorted(set(base_graph.inexact.values())))[:300])
    targets = StepTargets.of(config, original["total_channels"])

    # ---- resume
    model, teacher, teacher_acc = base, base, None
    steps: list[dict] = []
    algo_state: dict = {}
    spent_before = 0.0            # wall time of the earlier processes of this run (kept work only)
    done = run.finished_steps()
    if done:
        state = ckpt.load_tensors(run.step_file(done[-1]))
        model = ckpt.model_from_record(state["model"], allow_import=config.model).to(device)
        steps = list(state["steps"])
        algo_state = state["algo_state"]
        teacher = (ckpt.model_from_record(state["teacher"], allow_import=config.model).to(device)
                   if state["teacher"] is not None else base)
        teacher_acc = state["teacher_acc"]
        spent_before = float(state.get("wall_seconds", 0.0))
        # (a run of a version without compute records is refused earlier: its config.json
        # lacks selection_fraction, so --resume finds different settings)
        ledger = compute.Ledger(state["compute"])
        log.info("resuming after step %d of %d", done[-1], config.num_steps)
    if teacher_acc is None:
        teacher_acc = evaluate(base, data, "val", device=device, ledger=ledger)["top1"]
    base_top1 = teacher_acc if not steps else None   # the drop guard's reference at step 0
    curves = LearningCurves(run.curves)
    if not steps:
        curves.step(0, {"val_top1": teacher_acc, "sparsity": 0.0, "macs_kept": 1.0, "params_kept": 1.0})

    init_ray(config.ray_address, run.root)
    from .model_store import make_payload, start_store
    from .search.workers import EvaluationPool
    store, store_name = start_store()
    algo = pool = None
    history = HistoryWriter(run.history, algo=config.algo, base_macs=original_macs(original))
    try:
        start = len(steps)
        if start < config.num_steps:   # (a run killed after its last step goes straight to the report)
            graph = build_graph(config, model, data, device, ledger)
            context = targets.context(start, original, graph)
            ray.get(store.publish.remote(make_payload(model, graph, context, version=start)))
            algo = make_algorithm(config, store_name=store_name)
            algo.load_state_dict(algo_state)
            if done:
                algo.load_extra(run.algo_dir(done[-1]))
            if algo.uses_pool:
                pool = EvaluationPool(config, store_name)
        rescorer = Rescorer(config, data, device, ledger) if algo is not None and algo.holds_incumbent else None
        for step in range(start, config.num_steps):
            t0 = time.perf_counter()
            if step > start:
                graph = build_graph(config, model, data, device, ledger)
                context = targets.context(step, original, graph)
                ray.get(store.publish.remote(make_payload(model, graph, context, version=step)))
                algo.on_new_base(step)
            number = step + 1     # (step: 0-based index for seeds and contexts; number: what people read)
            label = f"step {number}/{config.num_steps}"
            spent = sum(s["evaluations"] for s in steps)
            searching = console.Progress(config.evaluations_per_step, f"{label} evaluations")

            def on_candidate(c, seconds, spent=spent, bar=searching):
                history.add(c, seconds)
                curves.evaluation(spent + c.index + 1, c)
                bar.update()

            # an algorithm without evaluation actors (RLlib's) scores what it asks the
            # evaluator for on the driver
            score = (lambda ds, v=step: pool.evaluate(ds, v)) if pool is not None else algo.score
            evaluator = Evaluator(score, config.evaluations_per_step, on_candidate=on_candidate)
            ctx = StepContext(step, config.num_steps, graph, np.random.default_rng([config.seed, step]),
                              reference_accuracy=steps[-1]["chosen_accuracy"] if steps else base_top1,
                              extras={k: context.get(k) for k in ("num_filters", "cost_target")},
                              rescore=functools.partial(rescorer, graph) if rescorer is not None else None)
            searched = time.perf_counter()
            with searching:
                chosen = algo.search(ctx, evaluator)
            for skip in ctx.skipped:
                log.warning("step %d/%d: the %s candidate is skipped: %s", number, config.num_steps,
                            skip["candidate"], skip["reason"])
            search_s = time.perf_counter() - t0
            charge_search(ledger, evaluator.candidates, time.perf_counter() - searched)
            chosen = algo.keep_incumbent(ctx, evaluator, chosen)    # (its passes: the ledger's rescore)
            if ctx.incumbent and "images" in ctx.incumbent:
                r = ctx.incumbent
                log.info("step %d/%d: the %s is applied (re-score on %d images: incumbent %s %.4f, challenger "
                         "%s %.4f, gain %+.4f, s.e. %s, z %.2f)", number, config.num_steps, r["applied"],
                         r["images"], r["incumbent_source"], r["incumbent_top1"], r["challenger_source"],
                         r["challenger_top1"], r["difference"], r["standard_error"], r["z"])

            small = apply_plan(graph, chosen.counts, chosen.indices)
            before = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
            epochs = finetune_epochs(config, data)
            bar, counted = training_progress(config, data, epochs, f"{label} fine-tuning", finetune=True)
            with bar:
                ft = finetune_kd(small, teacher, counted,
                                 train_settings(config, epochs=epochs, lr=config.finetune_lr,
                                                seed=config.seed + step + 1, device=device, finetune=True,
                                                label=f"{label} fine-tuning"),
                                 temperature=config.kd_temperature, alpha=config.kd_alpha, ledger=ledger)
            after = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
            if after > teacher_acc:  # a better pruned model becomes the teacher (as in the paper)
                teacher, teacher_acc = small, after
            macs, params = macs_params(small, data.example_inputs(1).to(device))
            removed = original["total_channels"] - (graph.total_channels - int(chosen.counts.sum()))
            record = {
                "step": number, "filters_removed": int(removed),
                "sparsity": removed / original["total_channels"],
                "macs": macs, "params": params,
                "macs_reduction": 1 - macs / original["macs"], "params_reduction": 1 - params / original["params"],
                "chosen_reward": chosen.reward, "chosen_accuracy": chosen.accuracy, "chosen_source": chosen.source,
                "best_reward": evaluator.best.reward, "evaluations": evaluator.used,
                "val_top1_before_finetune": before, "val_top1": after, "finetune_best_epoch": ft.best_epoch,
                "finetune_batches": ft.batches,
                "macs_executed": sum(c.macs_executed for c in evaluator.candidates),
                "search_seconds": search_s, "step_seconds": time.perf_counter() - t0,
                "distribution": (chosen.counts / max(chosen.counts.sum(), 1)).tolist(),
                "counts": chosen.counts.tolist(),
                "skipped": list(ctx.skipped), "incumbent_rule": ctx.incumbent,
            }
            if pool is not None:
                record.update(pool.scoring_choice())
            steps.append(record)
            curves.step(number, {"val_top1": after, "val_top1_before_finetune": before, "sparsity": record["sparsity"],
                                 "macs_kept": 1 - record["macs_reduction"], "params_kept": 1 - record["params_reduction"],
                                 "best_reward": evaluator.best.reward, "chosen_reward": chosen.reward})
            history.flush(number, chosen.index)
            algo.save_extra(run.algo_dir(number))
            ckpt.save_tensors(run.step_file(number), {
                "model": ckpt.model_record(small), "steps": steps, "algo_state": algo.state_dict(),
                "teacher": None if teacher is base else ckpt.model_record(teacher), "teacher_acc": teacher_acc,
                "wall_seconds": spent_before + time.perf_counter() - started, "compute": ledger.state_dict()})
            log.info("step %d/%d: %d evaluations, best reward %.4f; %.1f%% filters removed, MACs %.1f%% of "
                     "base; val %.4f -> %.4f after fine-tuning (%.1fs)", number, config.num_steps,
                     evaluator.used, evaluator.best.reward, 100 * record["sparsity"],
                     100 * macs / original["macs"], before, after, record["step_seconds"])
            model = small
            if on_step is not None:
                on_step(record, run)
    except (RLPrunerError, KeyboardInterrupt):
        raise
    except Exception as exc:    # the step under way is the one after the last recorded
        raise _step_failed(run, config, f"step {len(steps) + 1}/{config.num_steps}", exc) from exc
    finally:
        curves.close()
        if pool is not None:
            pool.close()
        if algo is not None:
            algo.close()
        ray.kill(store)
        if own_ray:
            shutdown_ray()

    return finish(config, run, data, base, model, steps, original, device,
                  wall_seconds=lambda: spent_before + time.perf_counter() - started,
                  exactness=base_graph.exactness(), ledger=ledger)


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


# ---------------------------------------------------------------------- other commands
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


def train_command(config: CompressConfig) -> dict:
    """``rlpruner train``: train a base model, save ``base_model.pt`` in out_dir."""
    run = RunFolder(config.out_dir)
    if run.base.exists() and not config.overwrite:
        raise ConfigError(f"{run.base} exists; pass --overwrite to replace it")
    data = load_data(config)
    device = config.resolved_device()
    run.base.unlink(missing_ok=True)
    model = load_or_train_base(config, data, run, device)
    m = measure_model(model, data, device, test=False)
    return {"model_file": str(run.base), **m}


def evaluate_command(path, config: CompressConfig, *, split: str) -> dict:
    """``rlpruner evaluate``: accuracy, MACs, params and CPU latency of a model file."""
    model = ckpt.load_pruned(path, allow_import=config.model)
    data = load_data(config)
    check_fits(model, data, path)
    device = config.resolved_device()
    r = evaluate(model, data, split, device=device)
    macs, params = macs_params(model.cpu(), data.example_inputs(1))
    shape = tuple(data.example_inputs(1).shape[1:])
    return {"split": split, "top1": r["top1"], "top5": r["top5"], "macs": macs, "params": params,
            "latency_ms_cpu_b1": latency_ms(model, shape, batch_size=1)}


def prune_command(config: CompressConfig, *, export: str | None = None) -> dict:
    """``rlpruner prune``: one-shot pruning with a non-learned strategy, then
    optional KD fine-tuning; writes ``pruned_model.pt`` and ``summary.json``."""
    run = RunFolder(config.out_dir)
    if (run.model.exists() or run.summary.exists()) and not config.overwrite:
        raise ConfigError(f"{run.root} already holds results; pass --overwrite to replace them")
    # the file's and Torch-Pruning's refusals come before the data's lines and before training
    given = ckpt.load_pruned(config.base_checkpoint, allow_import=config.model) if config.base_checkpoint else None
    started = time.perf_counter()
    ledger = compute.Ledger()
    device = config.resolved_device()
    data = load_data(config)
    check_model(config, data, given, config.base_checkpoint)
    if given is not None:
        base = given
    else:
        base = load_or_train_base(config, data, run, device, ledger)
    base = base.to(device).eval()
    graph = build_graph(config, base, data, device, ledger)
    original = {"macs": graph.base_macs, "params": graph.base_params}
    rng = np.random.default_rng(config.seed)
    if config.target == "filters":
        context = {"num_filters": int(round(config.sparsity * graph.total_channels))}
    else:
        context = {"cost_target": {"kind": config.target, "value": original[config.target] * (1 - config.sparsity)}}
    indices = None
    if config.algo == "global":          # the global threshold itself, not rescaled by a plan
        counts = global_plan(graph, context)
    elif config.algo in ("tp-uniform", "tp-global"):
        counts, indices = tp_plan(graph, context, global_pruning=config.algo == "tp-global")
    else:
        distribution = (rng.dirichlet(graph.initial_distribution() * graph.num_groups + 1e-3)
                        if config.algo == "random" else graph.initial_distribution())
        counts = plan_for_step(graph, distribution, context, round_to=config.round_to)
    small = apply_plan(graph, counts, indices)
    before = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
    ft = finetune_kd(small, base, data, train_settings(config, epochs=finetune_epochs(config, data),
                                                       lr=config.finetune_lr, seed=config.seed, device=device,
                                                       finetune=True, label="fine-tuning"),
                     temperature=config.kd_temperature, alpha=config.kd_alpha, ledger=ledger)
    base_m, pruned_m = measure_pair(base, small, data, device, ledger)
    run.root.mkdir(parents=True, exist_ok=True)
    ckpt.save_pruned(small.cpu(), run.model, meta={"config": config.to_dict()})
    if export:
        ckpt.export_model(small, run.root / f"pruned_model.{'onnx' if export == 'onnx' else 'ts'}", export)
    summary = {"config": config.to_dict(), "strategy": config.algo, "counts": counts.tolist(),
               "base": base_m, "pruned": {**pruned_m, "val_top1_before_finetune": before},
               "reductions": {"filters": float(counts.sum() / graph.total_channels),
                              "macs": 1 - pruned_m["macs"] / base_m["macs"],
                              "params": 1 - pruned_m["params"] / base_m["params"]},
               "finetune_batches": ft.batches, "model_file": str(run.model)}
    summary["wall_seconds"] = time.perf_counter() - started
    summary["compute"] = ledger.summary(original_macs(graph.sizes()), summary["wall_seconds"])
    ckpt.atomic_write_json(run.summary, summary)
    return summary
