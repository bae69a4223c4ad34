"""GPU benchmark: every GPU figure of BENCHMARKS.md from one run on one GPU.

    python scripts/bench_gpu.py                       # on a machine with CUDA (about 5 minutes on an H200)
    python scripts/bench_gpu.py --quick --device cpu  # smoke run of the same code on a CPU (tests)

Rows (ResNet-56, real CIFAR-10 reward images unless --quick):
  1. floor (one plain forward over the reward images), one weight-masked
     candidate, and K candidates per pass on the batched path (K from free
     memory), with evaluations per second; the same two paths again for the
     default reward (top-1 after BN recalibration, CompressConfig's number of
     batches), what `--scoring auto` chooses for it, and how the two paths'
     recalibrated rewards agree;
  2. bf16 autocast (+ channels-last) against fp32 on the same candidates:
     Spearman of the rewards and the largest accuracy difference;
  3. the evaluation pool with 1, 2, 4, 8 actors sharing the GPU;
  4. `compress --algo ppo` against the native pool on the same GPU, steady
     state (the steps after the first, which carries start-up);
  5. base training and KD fine-tuning images per second, fp32 and bf16
     (+ channels-last), at two batch sizes;
  6. latency of a 50%-filters pruned model against the base at batch 1 and 256,
     interleaved.

It rewrites only the "## GPU" section of --out; the rest of the file (what
scripts/bench.py writes) is kept. Raw rows go to --rows (Parquet).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from rlpruner_ray.stats import spearman  # noqa: E402  (ties share their average rank; bf16 and fp32 tie often)
HEADING = "## GPU"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"

PROFILES = {
    # ResNet-56, 1,024 real CIFAR-10 reward images: the setting
    "full": dict(model="resnet56", reward_samples=1024, candidates=256, masked_candidates=32,
                 agreement_candidates=64, actors=[1, 2, 4, 8], pool_candidates=512,
                 rl_steps=4, rl_evals=129, rl_envs=16, train_batches=60, batch_sizes=[128, 512],
                 latency_repeats=30),
    # the same code, sized for a CPU smoke run
    "quick": dict(model="resnet8", reward_samples=64, candidates=8, masked_candidates=4,
                  agreement_candidates=8, actors=[1, 2], pool_candidates=8,
                  rl_steps=2, rl_evals=5, rl_envs=2, train_batches=2, batch_sizes=[32, 64],
                  latency_repeats=3),
}


def log(msg: str) -> None:
    print(f"[bench-gpu] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------- set-up
class Bench:
    def __init__(self, args):
        from rlpruner_ray.config import CompressConfig
        from rlpruner_ray.data import load_dataset
        self.args = args
        self.p = PROFILES["quick" if args.quick else "full"]
        self.device = torch.device(args.device)
        self.dataset = "digits" if args.quick else f"npz:{args.data}"
        self.data = load_dataset(self.dataset, image_size=None)
        self.config = CompressConfig(model=self.p["model"], dataset=self.dataset,
                                     reward_samples=self.p["reward_samples"],
                                     reward_batch_size=self.p["reward_samples"], criterion="l1",
                                     # the scoring paths themselves: no BN recalibration (it adds
                                     # its own batches; the recalibrated rows set it themselves)
                                     bn_recalibration_batches=0, device=str(self.device))
        self.recalibration_batches = CompressConfig().bn_recalibration_batches     # the default reward's
        torch.manual_seed(0)
        from rlpruner_ray.checkpoint import tag_model
        from rlpruner_ray.models import build_model, model_spec
        shape = self.data.example_inputs(1).shape[1:]
        self.model = build_model(self.p["model"], self.data.num_classes, self.data.in_channels).eval()
        tag_model(self.model, model_spec(self.p["model"], self.data.num_classes, self.data.in_channels), shape)
        self.rows: list[dict] = []
        self.rng = np.random.default_rng(0)

    def row(self, section: str, metric: str, value, unit: str = "", variant: str = "") -> None:
        self.rows.append({"section": section, "metric": metric, "variant": variant,
                          "value": float(value), "unit": unit})

    def payload(self, model):
        from rlpruner_ray.model_store import make_payload
        from rlpruner_ray.pipeline import build_graph
        graph = build_graph(self.config, model.to(self.device), self.data, str(self.device))
        context = {"step": 0, "num_steps": 5, "original": graph.sizes(),
                   "num_filters": int(0.1 * graph.total_channels)}
        return make_payload(model, graph, context, version=0), graph

    def env(self, **changes):
        from envs import LayerPruningEnv
        from rlpruner_ray.search.workers import env_settings
        settings = env_settings(self.config, device=str(self.device))
        settings.update(payload=self.base_payload, **changes)
        return LayerPruningEnv(settings)

    def distributions(self, n: int, groups: int):
        return [self.rng.dirichlet(np.ones(groups)) for _ in range(n)]

    # ------------------------------------------------------------------ 1, 2
    def scoring(self) -> None:
        self.base_payload, graph = self.payload(copy.deepcopy(self.model))
        single = self.env(scoring="single")
        scorer = single.scorer
        floor = timed(lambda: scorer._measure(scorer.model, 1), self.device)
        n = self.p["masked_candidates"]
        ds = self.distributions(n, graph.num_groups)
        masked = timed(lambda: single.evaluate_distributions(ds), self.device) / n
        batched_env = self.env(scoring="batched")
        k = batched_env.scorer.per_pass
        ds_b = self.distributions(self.p["candidates"], graph.num_groups)
        batched = timed(lambda: batched_env.evaluate_distributions(ds_b), self.device) / len(ds_b)
        s = "1. scoring"
        self.row(s, "floor", floor * 1e3, "ms")
        self.row(s, "masked per candidate", masked * 1e3, "ms")
        self.row(s, "masked / floor", masked / floor, "x")
        self.row(s, "batched K", k)
        self.row(s, "batched per candidate", batched * 1e3, "ms")
        self.row(s, "batched / floor", batched / floor, "x")
        self.row(s, "batched evaluations/s", 1.0 / batched, "1/s")
        self.row(s, "masked evaluations/s", 1.0 / masked, "1/s")
        auto = self.env(scoring="auto").scorer.choice
        self.row(s, "auto chose batched", float(auto["path"] == "batched"))

        # 1b: the default reward, BN statistics re-estimated for every candidate, on both paths
        nb = self.recalibration_batches
        s = "1b. recalibrated"
        single_bn = self.env(scoring="single", bn_recalibration_batches=nb)
        masked_bn = timed(lambda: single_bn.evaluate_distributions(ds), self.device) / n
        batched_bn_env = self.env(scoring="batched", bn_recalibration_batches=nb)
        batched_bn = timed(lambda: batched_bn_env.evaluate_distributions(ds_b), self.device) / len(ds_b)
        self.row(s, "recalibration batches", nb)
        self.row(s, "masked evaluations/s", 1.0 / masked_bn, "1/s")
        self.row(s, "batched evaluations/s", 1.0 / batched_bn, "1/s")
        self.row(s, "batched K", batched_bn_env.scorer.per_pass)
        self.row(s, "batched / masked evaluations/s", masked_bn / batched_bn, "x")
        auto_bn = self.env(scoring="auto", bn_recalibration_batches=nb).scorer.choice
        self.row(s, "auto chose batched", float(auto_bn["path"] == "batched"))
        ds_r = self.distributions(self.p["agreement_candidates"], graph.num_groups)
        one = [r["accuracy"] for r in single_bn.evaluate_distributions(ds_r)]
        many = [r["accuracy"] for r in batched_bn_env.evaluate_distributions(ds_r)]
        self.row(s, "spearman batched vs single", spearman(one, many))
        self.row(s, "max top-1 difference (images)",
                 max(abs(a - b) for a, b in zip(one, many)) * self.p["reward_samples"], "images")

        # 2: bf16 (+ channels-last) against fp32 on the same candidates
        ds_a = self.distributions(self.p["agreement_candidates"], graph.num_groups)
        fp32 = [r["accuracy"] for r in batched_env.evaluate_distributions(ds_a)]
        bf16_env = self.env(scoring="batched", precision="bf16", channels_last=True)
        bf16 = [r["accuracy"] for r in bf16_env.evaluate_distributions(ds_a)]
        bf16_time = timed(lambda: bf16_env.evaluate_distributions(ds_b), self.device) / len(ds_b)
        s = "2. bf16"
        self.row(s, "spearman vs fp32", spearman(fp32, bf16))
        self.row(s, "max abs accuracy difference", max(abs(a - b) for a, b in zip(fp32, bf16)))
        self.row(s, "bf16 batched evaluations/s", 1.0 / bf16_time, "1/s")
        self.row(s, "bf16 K", bf16_env.scorer.per_pass)

    # ------------------------------------------------------------------ 3
    def actors(self) -> None:
        import ray

        from rlpruner_ray.model_store import start_store
        from rlpruner_ray.runtime import init_ray
        from rlpruner_ray.search.workers import EvaluationPool
        gpus = 1 if self.device.type == "cuda" else 0
        init_ray(None, Path(tempfile.mkdtemp(prefix="bgpu")), num_cpus=max(8, max(self.p["actors"]) + 1),
                 num_gpus=gpus)
        store, name = start_store()
        ray.get(store.publish.remote(self.base_payload))
        groups = len(self.base_payload["keys"])
        ds = self.distributions(self.p["pool_candidates"], groups)
        for n in self.p["actors"]:
            config = self.config.replace(num_workers=n, cpus_per_worker=1.0,
                                         gpus_per_worker=(1.0 / n) if gpus else 0.0)
            pool = EvaluationPool(config, name)
            try:
                seconds = timed(lambda: pool.evaluate(ds, 0), self.device, repeats=2)
                self.row("3. actors", "evaluations/s", len(ds) / seconds, "1/s", variant=f"{n} actors")
            finally:
                pool.close()
        ray.kill(store)
        ray.shutdown()

    # ------------------------------------------------------------------ 4
    def rllib(self) -> None:
        from rlpruner_ray.checkpoint import save_pruned
        from rlpruner_ray.pipeline import compress
        work = Path(tempfile.mkdtemp(prefix="bgpu-rl"))
        base_file = work / "base.pt"
        save_pruned(copy.deepcopy(self.model).cpu(), base_file)
        gpu = 1.0 if self.device.type == "cuda" else 0.0
        common = dict(base_checkpoint=str(base_file), evaluations_per_step=self.p["rl_evals"],
                      sparsity=0.1 * self.p["rl_steps"], step_fraction=0.1, finetune_epochs=0,
                      num_workers=1, cpus_per_worker=1.0, gpus_per_worker=gpu, rl_num_env_runners=1,
                      rl_envs_per_env_runner=self.p["rl_envs"], rl_batch_size=self.p["rl_envs"] * 2,
                      # the throughput of the env runners alone: no starting candidates on the driver
                      include_baselines=False)
        for algo in ("rlpruner", "ppo"):
            summary = compress(self.config.replace(algo=algo, out_dir=str(work / algo), **common))
            steady = summary["steps"][1:] or summary["steps"]
            rate = sum(s["evaluations"] for s in steady) / sum(s["search_seconds"] for s in steady)
            first = summary["steps"][0]
            self.row("4. rllib", "steady evaluations/s", rate, "1/s", variant=algo)
            self.row("4. rllib", "first step evaluations/s", first["evaluations"] / first["search_seconds"],
                     "1/s", variant=algo)

    # ------------------------------------------------------------------ 5
    def training(self) -> None:
        from rlpruner_ray.train import TrainSettings, evaluate, finetune_kd, train_base
        teacher = copy.deepcopy(self.model).to(self.device)
        val_s = timed(lambda: evaluate(teacher, self.data, "val", device=self.device), self.device, repeats=1)
        for bs in self.p["batch_sizes"]:
            for precision, cl in (("fp32", False), ("bf16", True)):
                settings = TrainSettings(epochs=1, batch_size=bs, lr=0.01, device=str(self.device),
                                         max_batches_per_epoch=self.p["train_batches"], precision=precision,
                                         channels_last=cl)
                images = bs * self.p["train_batches"]
                variant = f"{precision}{' channels-last' if cl else ''} bs {bs}"
                for what, run in (("train", lambda: train_base(copy.deepcopy(self.model), self.data, settings)),
                                  ("kd", lambda: finetune_kd(copy.deepcopy(self.model), teacher, self.data,
                                                             settings))):
                    seconds = timed(run, self.device, repeats=1)
                    # the loop validates once per epoch (KD once more, before it starts)
                    loop = max(seconds - val_s * (2 if what == "kd" else 1), 1e-9)
                    self.row("5. training", f"{what} images/s", images / loop, "1/s", variant=variant)

    # ------------------------------------------------------------------ 6
    def latency(self) -> None:
        from rlpruner_ray.measure import latency_ms
        from rlpruner_ray.graph import PruningGraph
        base = copy.deepcopy(self.model).to(self.device).eval()
        graph = PruningGraph(base, self.data.example_inputs(1).to(self.device))
        graph.compute_scores("l1")
        small = graph.prune(graph.plan(graph.initial_distribution(), graph.total_channels // 2)).eval()
        shape = tuple(self.data.example_inputs(1).shape[1:])
        for batch in (1, 256):
            pairs = [(latency_ms(base, shape, batch_size=batch, device=str(self.device), repeats=5),
                      latency_ms(small, shape, batch_size=batch, device=str(self.device), repeats=5))
                     for _ in range(self.p["latency_repeats"] // 5 or 1)]       # interleaved
            b, s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            self.row("6. latency", "base ms", b, "ms", variant=f"batch {batch}")
            self.row("6. latency", "pruned ms", s, "ms", variant=f"batch {batch}")
            self.row("6. latency", "speed-up", b / s, "x", variant=f"batch {batch}")


# ---------------------------------------------------------------------- report
def render(bench: Bench, seconds: dict, errors: dict) -> str:
    get = {(r["section"], r["metric"], r["variant"]): r["value"] for r in bench.rows}

    def v(section, metric, variant="", spec=".3g"):
        x = get.get((section, metric, variant))
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    dev = torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor() or "CPU"
    p = bench.p
    out = [HEADING, "",
           f"Written by `python scripts/bench_gpu.py{' --quick' if bench.args.quick else ''}` on "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, device {dev} ({bench.device}), torch "
           f"{torch.__version__}; {p['model']}, {p['reward_samples']} reward images of {bench.dataset}; "
           f"total {sum(seconds.values()):.0f} s.", "",
           "| scoring (one candidate = one pass over the reward images) | value |", "|---|---|",
           f"| floor: one plain forward (ms) | {v('1. scoring', 'floor')} |",
           f"| weight-masked, per candidate (ms) | {v('1. scoring', 'masked per candidate')} "
           f"({v('1. scoring', 'masked / floor', spec='.2f')}x the floor) |",
           f"| batched, K per pass | {v('1. scoring', 'batched K', spec='.0f')} |",
           f"| batched, per candidate (ms) | {v('1. scoring', 'batched per candidate')} "
           f"({v('1. scoring', 'batched / floor', spec='.2f')}x the floor) |",
           f"| evaluations/s: masked / batched | {v('1. scoring', 'masked evaluations/s', spec='.1f')} / "
           f"{v('1. scoring', 'batched evaluations/s', spec='.1f')} |",
           f"| `--scoring auto` chose batched | {'yes' if get.get(('1. scoring', 'auto chose batched', '')) else 'no'} |",
           f"| default reward (top-1 after BN recalibration on {v('1b. recalibrated', 'recalibration batches', spec='.0f')}"
           f" batches), evaluations/s: masked / batched (K) | {v('1b. recalibrated', 'masked evaluations/s', spec='.1f')}"
           f" / {v('1b. recalibrated', 'batched evaluations/s', spec='.1f')} "
           f"({v('1b. recalibrated', 'batched K', spec='.0f')}; "
           f"{v('1b. recalibrated', 'batched / masked evaluations/s', spec='.1f')}x) |",
           f"| `--scoring auto` chose batched with recalibration | "
           f"{'yes' if get.get(('1b. recalibrated', 'auto chose batched', '')) else 'no'} |",
           f"| recalibrated, batched vs single on {p['agreement_candidates']} candidates: Spearman / max top-1 "
           f"difference (images) | {v('1b. recalibrated', 'spearman batched vs single')} / "
           f"{v('1b. recalibrated', 'max top-1 difference (images)', spec='.0f')} |",
           f"| bf16 + channels-last: evaluations/s (K) | {v('2. bf16', 'bf16 batched evaluations/s', spec='.1f')} "
           f"({v('2. bf16', 'bf16 K', spec='.0f')}) |",
           f"| bf16 vs fp32 on {p['agreement_candidates']} candidates: Spearman / max abs accuracy difference | "
           f"{v('2. bf16', 'spearman vs fp32')} / {v('2. bf16', 'max abs accuracy difference')} |", "",
           "| evaluation actors sharing the device | evaluations/s |", "|---|---|"]
    out += [f"| {n} | {v('3. actors', 'evaluations/s', f'{n} actors', '.1f')} |" for n in p["actors"]]
    out += ["", "| search on the same device (steady state = steps after the first) | evaluations/s |",
            "|---|---|"]
    for algo in ("rlpruner", "ppo"):
        out.append(f"| {algo}: steady / first step | {v('4. rllib', 'steady evaluations/s', algo, '.1f')} / "
                   f"{v('4. rllib', 'first step evaluations/s', algo, '.1f')} |")
    out += ["", "| training loop | train images/s | KD images/s |", "|---|---|---|"]
    for bs in p["batch_sizes"]:
        for variant in (f"fp32 bs {bs}", f"bf16 channels-last bs {bs}"):
            out.append(f"| {variant} | {v('5. training', 'train images/s', variant, '.0f')} | "
                       f"{v('5. training', 'kd images/s', variant, '.0f')} |")
    out += ["", "| latency, 50% of filters pruned (uniform) | base (ms) | pruned (ms) | speed-up |",
            "|---|---|---|---|"]
    for batch in (1, 256):
        variant = f"batch {batch}"
        out.append(f"| {variant} | {v('6. latency', 'base ms', variant)} | {v('6. latency', 'pruned ms', variant)} "
                   f"| {v('6. latency', 'speed-up', variant, '.2f')}x |")
    out += ["", "Section wall times (s): " + ", ".join(f"{k}: {s:.0f}" for k, s in seconds.items()) + "."]
    if errors:
        out += ["", "Sections that failed: " + "; ".join(f"{k}: {e}" for k, e in errors.items())]
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with its "## GPU" section (up to the next "## " heading) replaced."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == HEADING), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + tail if tail else "")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --quick)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder of the CIFAR-10 train.npz/test.npz")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on digits: a smoke run of the same code")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file whose GPU section is rewritten")
    ap.add_argument("--rows", default=str(ROOT / "benchmarks" / "gpu_rows.parquet"), help="raw rows (Parquet)")
    ap.add_argument("--only", nargs="*", default=None,
                    choices=["scoring", "actors", "rllib", "training", "latency"], help="run some sections only")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: error: no CUDA device here; on a CPU run `--quick --device cpu` (a smoke run)",
              file=sys.stderr)
        return 2
    if not args.quick and not (Path(args.data) / "train.npz").is_file():
        print(f"bench_gpu: error: no CIFAR-10 copy at {args.data} (--data)", file=sys.stderr)
        return 2
    bench = Bench(args)
    seconds, errors = {}, {}
    for name in args.only or ["scoring", "actors", "rllib", "training", "latency"]:
        log(f"section {name}")
        t0 = time.perf_counter()
        try:
            getattr(bench, name)()
        except Exception as exc:       # a failed section is reported, the others still run
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log(f"section {name} failed: {errors[name]}")
        seconds[name] = time.perf_counter() - t0
    out = Path(args.out)
    section = render(bench, seconds, errors)
    out.write_text(replace_section(out.read_text() if out.exists() else "# Benchmarks\n", section))
    import pyarrow as pa
    import pyarrow.parquet as pq
    Path(args.rows).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(bench.rows), args.rows)
    print(json.dumps({"seconds": seconds, "errors": errors, "rows": len(bench.rows)}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
