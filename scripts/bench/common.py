"""What every section shares: paths, the budgets of each profile, result rows,
small statistics, and running a task in a fresh process."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the checkout
SCRIPT = ROOT / "scripts" / "bench.py"              # tasks run through it (--task)
# the project's shared data and models sit next to the checkout (../shared)
SHARED = ROOT.parent / "shared"
CIFAR_DEFAULT = SHARED / "data" / "cifar10"
SHARED_BASE = SHARED / "models" / "cifar10-resnet20.pt"
# the exact versions users install (pip install -c constraints.txt): the benchmark runs on them
CONSTRAINTS = ROOT / "constraints.txt"
METHODS = ("rlpruner", "ppo", "ppo-lr0", "random", "cmaes", "uniform", "global", "tp-uniform", "tp-global")
ONE_SHOT = ("uniform", "global", "tp-uniform", "tp-global")   # no search: all their fine-tuning after one step
# "<one-shot method>@compute": the one-shot method at equal compute with COMPUTE_REFERENCE
# on the same seed, its extra compute spent as extra KD batches (quality.matched_config)
AT_COMPUTE = "@compute"
COMPUTE_REFERENCE = "rlpruner"
MATCHED = tuple(f"{m}{AT_COMPUTE}" for m in ONE_SHOT)


def matched_of(method: str) -> str | None:
    """The one-shot method a ``<method>@compute`` name runs, else None."""
    base, at, rest = method.partition("@")
    return base if at and f"@{rest}" == AT_COMPUTE and base in ONE_SHOT else None


# every search of the protocol on the same footing as the project's rlpruner: the same
# reward (BN-recalibrated), schedule (one step with the whole budget) and starting
# candidates (the baseline plans); only the search differs
SEARCH_FOOTING = {"one_step": True, "bn_recalibration_batches": 4, "include_baselines": True}
# section-3 methods that are an algorithm with other settings: name -> (algo, config changes);
# one_step: a single pruning step with the whole evaluation budget of the multi-step
# searches and all the KD epochs after it (the one-shot methods' schedule).
# Every method runs with the protocol's criterion (PROFILES: l1, the project default)
# unless its changes name another; rlpruner runs start from the paper's settings
# (PAPER_RLPRUNER) and their changes apply on top.
# the project's rlpruner defaults (config.CompressConfig since 2026-12-06), pinned here
# so a changed default can never pass for what these runs measured
DEFAULT_RLPRUNER = {**SEARCH_FOOTING, "epsilon": 0.0, "guard_keep_best": True, "criterion": "l1"}
VARIANTS = {"rlpruner": ("rlpruner", DEFAULT_RLPRUNER),
            "random": ("random", SEARCH_FOOTING),
            "cmaes": ("cmaes", SEARCH_FOOTING),
            "ppo": ("ppo", SEARCH_FOOTING),
            # the null baseline of ppo: the same proposal (its initial policy), no learning
            "ppo-lr0": ("ppo", {**SEARCH_FOOTING, "rl_lr": 0.0}),
            # the paper's search: epsilon-greedy choice, no baseline candidates, the
            # reference's drop guard, Taylor importance, 25% steps
            "rlpruner-paper": ("rlpruner", {}),
            "rlpruner-kl": ("rlpruner", {"reward_metric": "kl"}),
            "rlpruner-1step": ("rlpruner", {"one_step": True}),
            "rlpruner-1step-l1": ("rlpruner", {"one_step": True, "criterion": "l1"}),
            "rlpruner-mult": ("rlpruner", {"noise_type": "multiplicative"}),
            # -bn: the reward after re-estimating BN statistics on 4 training batches
            # (section 4's best-ranking reward); -base: the uniform, global and
            # Torch-Pruning global distributions among the first candidates;
            # -greedy: epsilon 0, every step applies its best candidate (with 2 steps the
            # paper's epsilon 0.4 applies a random elite at step 1 of 2)
            "rlpruner-bn": ("rlpruner", {"bn_recalibration_batches": 4}),
            "rlpruner-bn-base": ("rlpruner", {"bn_recalibration_batches": 4, "include_baselines": True}),
            # (the project's default rlpruner settings from 2026-12-05 to -06)
            "rlpruner-bn-base-greedy": ("rlpruner", {"bn_recalibration_batches": 4, "include_baselines": True,
                                                     "epsilon": 0.0}),
            # the baselines and the greedy choice without BN recalibration: which of the
            # three changes the gain over plain rlpruner comes from
            "rlpruner-base-greedy": ("rlpruner", {"include_baselines": True, "epsilon": 0.0}),
            # -keep: a drop-guard redo applies the better of its choice and the candidate
            # that tripped the guard (at 25% steps the guard fires at every step)
            "rlpruner-bn-base-greedy-keep": ("rlpruner", {"bn_recalibration_batches": 4, "include_baselines": True,
                                                          "epsilon": 0.0, "guard_keep_best": True}),
            # all four in one step with the whole budget (the defaults with Taylor importance)
            "rlpruner-1step-bn-base-greedy-keep": ("rlpruner", {"one_step": True, "bn_recalibration_batches": 4,
                                                                "include_baselines": True, "epsilon": 0.0,
                                                                "guard_keep_best": True}),
            # the two-step search with the defaults' choices and L1
            "rlpruner-bn-base-greedy-keep-l1": ("rlpruner", {"bn_recalibration_batches": 4, "include_baselines": True,
                                                             "epsilon": 0.0, "guard_keep_best": True,
                                                             "criterion": "l1"}),
            "ppo-bn": ("ppo", {"bn_recalibration_batches": 4}),
            # Taylor importance for the methods that now run with L1
            "ppo-taylor": ("ppo", {"criterion": "taylor"}),
            "global-taylor": ("global", {"criterion": "taylor"}),
            "uniform-taylor": ("uniform", {"criterion": "taylor"}),
            # issue 28's levers, each alone on top of the project's rlpruner, to be chosen
            # between on the selection half (all off by default until then)
            "rlpruner-incumbent": ("rlpruner", {**DEFAULT_RLPRUNER, "incumbent_rule": True}),
            "rlpruner-halving": ("rlpruner", {**DEFAULT_RLPRUNER, "halving": True}),
            "rlpruner-around": ("rlpruner", {**DEFAULT_RLPRUNER, "around_incumbent": True}),
            "rlpruner-hopeless": ("rlpruner", {**DEFAULT_RLPRUNER, "guard_skip_hopeless": True}),
            "rlpruner-tpmag": ("rlpruner", {**DEFAULT_RLPRUNER, "criterion": "tp-magnitude"})}
# the searches' settings before a method's changes: the paper's (no BN recalibration, no
# starting candidates); plain "rlpruner" also starts from the paper's search
PINNED_SEARCH = {"bn_recalibration_batches": 0, "include_baselines": False}
PAPER_RLPRUNER = {"epsilon": 0.4, "include_baselines": False, "guard_keep_best": False, "criterion": "taylor"}
# the searches of the protocol (one step, the same reward and starting candidates)
SEARCHES = ("rlpruner", "random", "ppo", "ppo-lr0", "cmaes")
# which split chose each of the project's defaults (BENCHMARKS.md section 3 reports it):
# all six were chosen on the test split, before the selection split existed; the pair
# rlpruner - rlpruner-paper on the selection half checks them together
_ON_TEST = "the test split (section 3 runs before 2026-12-07)"
DEFAULT_CHOICES = tuple((what, _ON_TEST) for what in (
    "one step of the whole sparsity", "--bn-recalibration-batches 4", "--include-baselines", "--epsilon 0",
    "--guard-keep-best", "--criterion l1"))
DEFAULTS_PAIR = ("rlpruner", "rlpruner-paper")
# issue 28's levers: each a variant of the project's rlpruner with one setting switched
# on (VARIANTS); a lever becomes a default only when it beats rlpruner on the selection
# half (selection top-1, paired t interval above 0). variant -> the option it sets
LEVERS = {"rlpruner-tpmag": "--criterion tp-magnitude", "rlpruner-incumbent": "--incumbent-rule",
          "rlpruner-halving": "--halving", "rlpruner-around": "--around-incumbent",
          "rlpruner-hopeless": "--guard-skip-hopeless"}
# variants whose question is answered: still runnable with --methods, no longer in the
# full profile (which must fit one background run of 100 minutes); name -> where
# BENCHMARKS.md section 3 has their figures and what they showed. Until 2026-12-06
# section 3 ran every method with Taylor importance and plain "rlpruner" was the
# paper's search (now rlpruner-paper); the -taylor variants are those runs' methods.
_LOST = "2026-11-30 (BENCHMARKS.md at commit 74544d5): below plain rlpruner or uniform"
_DECOMPOSED = ("2026-12-06 (BENCHMARKS.md at commit 5b8c51f): the decomposition of the project's rlpruner "
               "defaults, and ppo with BN recalibration")
_L1 = ("2026-12-06 (BENCHMARKS.md at commit 6092903): L1 against Taylor importance (global +1.73 pts, "
       "ppo -0.99, the rlpruner searches +0.53), and the one-step search against the two-step one (+0.88)")
RETIRED_VARIANTS = {"rlpruner-kl": _LOST, "rlpruner-1step": _LOST, "rlpruner-1step-l1": _LOST,
                    "rlpruner-mult": _LOST,
                    "rlpruner-bn": _DECOMPOSED, "rlpruner-bn-base": _DECOMPOSED, "rlpruner-base-greedy": _DECOMPOSED,
                    "rlpruner-bn-base-greedy": _DECOMPOSED, "ppo-bn": _DECOMPOSED,
                    "rlpruner-bn-base-greedy-keep": _L1, "rlpruner-1step-bn-base-greedy-keep": _L1,
                    "rlpruner-bn-base-greedy-keep-l1": _L1, "ppo-taylor": _L1, "global-taylor": _L1,
                    "uniform-taylor": _L1}
# section 3's protocol: 2 since issue 27 (every search on one footing, equal compute, the
# selection split); a state without it was measured under the earlier one
PROTOCOL = 2
ROW_COLUMNS = ("section", "item", "variant", "metric", "value", "unit", "repeat", "seed")
PAPER_EVALS_PER_STEP = 100

# Budgets. Everything that decides how long a section takes is here.
PROFILES = {
    "full": dict(
        # 1: CIFAR-style models at 32x32, 256 reward images in one batch
        cost_models=["resnet56", "mobilenetv3_large"], cost_samples=256, cost_batch=256, cost_repeats=7,
        cost_step_fraction=0.1,
        # 2: resnet20 at 32x32, 256 reward images
        scale_model="resnet20", scale_samples=256, scale_evals=12, scale_repeats=3, scale_rt=5,
        scale_ppo_evals=31, scale_ppo_batch=10,
        synth_train=3000, synth_test=200,
        # 3-6: real CIFAR-10 copy and the shared, well-trained ResNet-20 (never retrained)
        dataset="cifar10", model="resnet20", base="shared",
        sparsity=0.5, step_fraction=0.25, evals=40, reward_samples=512,
        # every method gets the same KD fine-tuning in total: multi-step methods split it
        # over their steps, one-shot methods get all of it after their single step
        finetune_total_epochs=2, finetune_batches=50, finetune_lr=0.01, num_workers=2,
        # the reward every search and the filter criterion every method uses unless its
        # variant says otherwise (pinned, so a changed default can never pass for what
        # these runs measured; l1 is the project's default criterion)
        reward_metric="top1", criterion="l1",
        # the searches on one footing, the one-shot methods at equal KD and at equal
        # compute (tp-uniform: --methods), 5 paired seeds
        methods=[*SEARCHES, "rlpruner-paper", "uniform", "global", "tp-global",
                 "uniform@compute", "global@compute", "tp-global@compute"],
        seeds=[0, 1, 2, 3, 4], paired_seeds=[0, 1, 2, 3, 4],
        paired_methods=[*SEARCHES, "rlpruner-paper", *(v for v in VARIANTS if v not in SEARCHES),
                        *ONE_SHOT, *MATCHED],
        # every headline pair twice: at equal KD and at equal compute
        pairs=[["rlpruner", "tp-global"], ["rlpruner", "tp-global@compute"],
               ["rlpruner", "uniform"], ["rlpruner", "uniform@compute"],
               ["rlpruner", "global"], ["rlpruner", "global@compute"],
               ["rlpruner", "rlpruner-paper"], ["rlpruner", "ppo"], ["rlpruner", "random"], ["rlpruner", "cmaes"],
               ["ppo", "ppo-lr0"], ["ppo", "random"], ["ppo", "cmaes"], ["cmaes", "random"],
               ["ppo-lr0", "random"], ["global", "tp-global"], ["global", "uniform"]],
        # a default is chosen on the selection half of the test split; the final half
        # (test_top1) is only reported
        selection_fraction=0.5, protocol=PROTOCOL,
        rl_batch_size=20, bootstrap=10000,
        # 4: at least 60 candidates, each physically pruned and KD-fine-tuned for a whole
        # epoch; ground truth on every validation row the rewards do not use
        fid_samples=60, fid_kd_epochs=1, fid_kd_batches=None, fid_kd_batch_size=128, fid_bn_batches=4,
        fid_reward_sizes=[512, 2048], fid_eval_images=None, fid_processes=2,
        # 5: every pruned model timed against the base this many times (their agreement is shown)
        lat_timings=2,
    ),
    "quick": dict(
        cost_models=["resnet8", "mobilenetv3_small"], cost_samples=64, cost_batch=64, cost_repeats=3,
        cost_step_fraction=0.1,
        scale_model="resnet8", scale_samples=64, scale_evals=4, scale_repeats=2, scale_rt=3,
        scale_ppo_evals=5, scale_ppo_batch=4,
        synth_train=800, synth_test=50,
        dataset="digits", model="resnet8", base="train", train_epochs=6, train_batches=12, train_lr=0.05,
        # 5 evaluations: the 3 starting candidates and 2 of the search's own
        sparsity=0.5, step_fraction=0.5, evals=5, reward_samples=64, reward_metric="top1", criterion="l1",
        finetune_total_epochs=1, finetune_batches=2, finetune_lr=0.01, num_workers=2,
        # one seed, and no ppo here: section 2 already runs `compress --algo ppo` twice; cmaes
        # stands for the non-learned searches (random: --methods), to keep the profile short
        methods=["rlpruner", "cmaes", "uniform", "global", "tp-global", "tp-global@compute"],
        seeds=[0], paired_seeds=[0, 1], paired_methods=["rlpruner", "tp-global", "tp-global@compute"],
        pairs=[["rlpruner", "tp-global"], ["rlpruner", "tp-global@compute"]],
        selection_fraction=0.5, protocol=PROTOCOL, rl_batch_size=2, bootstrap=500,
        fid_samples=6, fid_kd_epochs=1, fid_kd_batches=2, fid_kd_batch_size=32, fid_bn_batches=2,
        fid_reward_sizes=[32, 64], fid_eval_images=80, fid_processes=2,
        lat_timings=2,
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def row(section, item, variant, metric, value, unit="", repeat=-1, seed=-1) -> dict:
    return {"section": int(section), "item": str(item), "variant": str(variant), "metric": str(metric),
            "value": float(value), "unit": str(unit), "repeat": int(repeat), "seed": int(seed)}


def _threads(n: int) -> None:
    import torch
    torch.set_num_threads(int(n))


def _tagged_model(name: str, data, seed: int = 0):
    import torch
    from rlpruner_ray.checkpoint import tag_model
    from rlpruner_ray.models import build_model, model_spec
    torch.manual_seed(seed)
    model = build_model(name, data.num_classes, data.in_channels)
    tag_model(model, model_spec(name, data.num_classes, data.in_channels), data.example_inputs(1).shape[1:])
    return model.eval()


def _accuracy(model, batches) -> float:
    import torch
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def make_synthetic_npz(folder: Path, n_train: int, n_test: int, size: int = 32, seed: int = 0) -> str:
    """A folder with random 32x32 RGB images in the npz layout: the cost of a
    forward pass does not depend on pixel values, and it loads in milliseconds."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f"n{n_train}_{n_test}_{size}_{seed}.ok"
    if not marker.exists():
        rng = np.random.default_rng(seed)
        for name, n in (("train", n_train), ("test", n_test)):
            np.savez(folder / f"{name}.npz", images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                     labels=np.arange(n, dtype=np.int64) % 10)
        for old in folder.glob("*.ok"):
            old.unlink()
        marker.touch()
    return f"npz:{folder}"


# Tasks: heavy pieces run in a fresh Python process (isolates Ray and memory).
TASKS: dict = {}


def task(fn):
    """Register ``fn`` as a task ``run_task`` can start by its name (task_<name>)."""
    TASKS[fn.__name__.removeprefix("task_")] = fn
    return fn


def run_task(name: str, params: dict, work: Path, timeout: float | None = None) -> dict:
    """Run one task in a fresh Python process; its stderr is passed through."""
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{os.getpid()}-{time.monotonic_ns()}"
    inp, out = work / f".task-{tag}.json", work / f".task-{tag}.out.json"
    inp.write_text(json.dumps(params))
    # this checkout's packages first, in the task and in the Ray workers it starts
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore::DeprecationWarning",
               RAY_DEDUP_LOGS="1", PYTHONPATH=path)
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--task", name, "--task-in", str(inp),
                               "--task-out", str(out)], cwd=str(ROOT), env=env, timeout=timeout,
                              stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"task {name} failed with exit code {proc.returncode}")
        return json.loads(out.read_text())
    finally:
        inp.unlink(missing_ok=True)
        out.unlink(missing_ok=True)


def task_main(name: str, task_in: str, task_out: str) -> int:
    params = json.loads(Path(task_in).read_text())
    result = TASKS[name](params)
    Path(task_out).write_text(json.dumps(result, default=_json_default))
    return 0


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def not_read_note(methods: list[str]) -> list[str]:
    """The line under a table of sections 5 and 6 naming the section-3 methods it
    has no rows for: they read each run's own files (model, history), which a
    report merged from other invocations (``--merge``) does not have."""
    if not methods:
        return []
    return ["", f"Not in this table: {', '.join(methods)} (section 3 took their runs from another invocation "
                "with `--merge`; this section reads each run's model and history files, which only the "
                "invocation that made them had)."]


def num(value, spec: str = ".3f", suffix: str = "") -> str:
    """A table cell: the number, or n/a when it is missing or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:{spec}}{suffix}" if math.isfinite(v) else "n/a"


def _mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def _getter(rows):
    index = {(r["item"], r["variant"], r["metric"]): r["value"] for r in rows if r["repeat"] == -1}
    return lambda item, variant, metric: index.get((item, variant, metric), float("nan"))


def pinned_versions(path: Path | None = None) -> dict[str, str]:
    """Package name -> exact version, from constraints.txt (``name==version`` lines;
    comments, blank lines and environment markers after ``;`` ignored)."""
    path = Path(path or CONSTRAINTS)
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        pins[name.split("[", 1)[0].strip()] = version.strip()
    return pins


def installed_versions(names) -> dict[str, str | None]:
    """The installed version of each package (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def version_mismatches(pinned: dict[str, str] | None = None,
                       installed: dict[str, str | None] | None = None) -> list[dict]:
    """Every package whose installed version is not the one constraints.txt pins
    (a ``+local`` tag such as torch's ``+cpu`` counts as the same version)."""
    pinned = pinned_versions() if pinned is None else pinned
    installed = installed_versions(pinned) if installed is None else installed
    return [{"package": name, "pinned": want, "installed": installed.get(name)}
            for name, want in pinned.items()
            if (installed.get(name) or "").split("+", 1)[0] != want.split("+", 1)[0]]


def describe_mismatches(mismatches: list[dict]) -> str:
    return ", ".join(f"{m['package']} {m['installed'] or 'not installed'} (constraints.txt: {m['pinned']})"
                     for m in mismatches)


def machine() -> dict:
    import numpy
    import ray
    import torch
    import torch_pruning
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        memory = f"{kb / 2 ** 20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "torch_pruning": getattr(torch_pruning, "__version__", "?"), "numpy": numpy.__version__,
            # every package constraints.txt pins, as installed here
            "packages": installed_versions(pinned_versions()),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit()}


def git_commit() -> str:
    """The checkout's commit (short), "+changes" when files differ from it; "?" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return head + ("+changes" if dirty else "")


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
