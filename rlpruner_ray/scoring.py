"""Scoring a pruning distribution on the current base model: the search's hot path.

A :class:`StepScorer` holds one base model, its :class:`PruningGraph` (built once
per base model), the importance order shipped by the driver, and the reward
batches (a fixed slice of the validation split, kept on the scorer's device).
Scoring a candidate is: plan -> ``graph.masked`` -> forward passes -> reward.
No deep copy, no graph rebuild, no file I/O, no logging.

Two exact ways to score a list of candidates, chosen once per scorer:

* ``single``: one weight-masked pass per candidate (fastest on a CPU, where a
  pass is compute-bound and masking costs next to nothing);
* ``batched``: K candidates per pass, the reward images repeated K times with
  per-candidate activation masks (:mod:`rlpruner_ray.batched`); on a GPU one
  small pass is mostly kernel launches, so K at once keeps it busy.

``auto`` keeps ``single`` on a CPU; on an accelerator it times both on the first
base model and keeps the faster. With BN recalibration both paths recalibrate
every candidate (the batched one per candidate inside its K-candidate passes),
so the choice between them is the same.

The same :func:`~rlpruner_ray.plans.plan_for_step` turns a distribution into
per-group counts here and in the pipeline, so what is applied is exactly what
was scored.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from . import compute
from .batched import CandidateMasks, recalibrated, repeat_rows
from .checkpoint import load_pruned
from .config import SCORING
from .data import Dataset
from .errors import ConfigError
from .graph import PruningGraph
from .plans import apply_plan, plan_for_step


def quality_of(measured: dict, settings: dict) -> float:
    """The reward's quality term: top-1, or minus the KL divergence to the base
    model's outputs, or minus the cross-entropy (both far less noisy than top-1)."""
    metric = settings.get("reward_metric", "top1")
    if metric == "top1":
        return measured["accuracy"]
    if metric in ("kl", "loss"):
        return -measured[metric]
    raise ConfigError(f"unknown reward metric {metric!r}")


def reward_of(quality: float, macs: float, params: float, settings: dict, original: dict) -> float:
    kind, coef = settings["reward"], settings["reward_coef"]
    if kind == "acc":
        return quality
    if kind == "flops":
        return quality + coef * (1.0 - macs / original["macs"])
    if kind == "params":
        return quality + coef * (1.0 - params / original["params"])
    raise ConfigError(f"unknown reward {kind!r}")


MAX_CANDIDATES_PER_PASS = 64     # beyond this a GPU gains nothing and the mask tensors grow


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``precision == "bf16"`` (forward passes only), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_memory_format(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


class StepScorer:
    """Scores distributions on one base model. ``settings`` is the plain dict of
    environment settings (see ``envs.layer_pruning``)."""

    def __init__(self, settings: dict, data: Dataset):
        self.settings = settings
        self.device = torch.device(settings.get("device", "cpu"))
        self.precision = settings.get("precision", "fp32")
        self.channels_last = bool(settings.get("channels_last", False))
        n = settings["reward_samples"]
        bs = settings["reward_batch_size"]
        # fixed reward batches: the first n validation images, moved to the device once
        x, y = next(data.batches("val", n, device=self.device))
        x = to_memory_format(x, self.channels_last)
        self.batches = list(zip(torch.split(x, bs), torch.split(y, bs)))
        nb = settings.get("bn_recalibration_batches", 0)
        self.bn_batches = ([to_memory_format(x, self.channels_last)
                            for x, _ in data.batches("train", bs, device=self.device, limit=nb)] if nb else [])
        self.version = None
        self.base_log_probs: list[torch.Tensor] | None = None
        self.model = None
        self.graph = None
        self.masks: CandidateMasks | None = None
        self.path: str | None = None          # "single" or "batched", fixed on the first base model
        self.per_pass = 1                     # candidates per forward pass on the batched path
        self.choice: dict = {}                # how the path was chosen (recorded in the run's summary)
        self.pending_macs = 0                 # passes of a new base model's set-up, charged to the next candidate

    # ------------------------------------------------------------------ base model
    def load(self, payload: dict) -> None:
        """Adopt a new base model (once per outer step)."""
        # the payload is the driver's own model, loaded there under the user's allow_import
        model = load_pruned(payload["model"], allow_import=True).to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        graph = PruningGraph(model, torch.zeros(1, *payload["input_shape"], device=self.device),
                             exclude=self.settings.get("exclude", ()),
                             min_channels=self.settings["min_channels"],
                             max_group_sparsity=self.settings["max_group_sparsity"])
        if graph.keys != list(payload["keys"]):
            raise RuntimeError("worker traced different groups than the driver; versions of "
                               "torch / torch-pruning differ between nodes?")
        graph.set_scores([torch.tensor(np.array(s)) for s in payload["scores"]], payload["criterion"])
        self.model, self.graph = model, graph
        self.context = payload["context"]
        self.version = payload["version"]
        self.masks = CandidateMasks(graph)
        self.image_macs = int(round(graph.base_macs))     # what a masked candidate costs per image
        # the base model's reference pass (and, once, the timing of both paths) is real
        # work of the search: counted here and charged to the next candidate scored
        with compute.counting_forwards(model, self.image_macs) as setup:
            self.base_log_probs = self._base_log_probs()
            if self.path is None:
                self._choose_path()
        self.pending_macs += setup[0]

    def _choose_path(self) -> None:
        """Fix the scoring path (and K) once, from the settings or by timing both."""
        asked = self.settings.get("scoring", "auto")
        if asked not in SCORING:
            raise ConfigError(f"scoring must be one of {', '.join(SCORING)}, got {asked!r}")
        self.per_pass = int(self.settings.get("candidates_per_pass") or self._fitting_per_pass())
        if not self.graph.masking_exact:
            self.path, self.choice = "single", {"reason": f"{len(self.graph.inexact)} group(s) are scored "
                                                          "on the physical path (masking is not exact there)"}
        elif asked == "single":
            self.path, self.choice = "single", {"reason": "asked for"}
        elif asked == "auto" and not _worth_timing(self.device):
            self.path, self.choice = "single", {"reason": "auto on a CPU"}
        elif not self._batched_is_exact():      # checked only where batched could be chosen
            self.path, self.choice = "single", {"reason": "batched scoring is not exact for this model"}
        elif asked == "batched":
            self.path, self.choice = "batched", {"reason": "asked for"}
        else:
            probe = [self.graph.plan(self.graph.initial_distribution(), self.graph.max_removable // 2)]
            # a full pass of K on the batched side: per-candidate cost depends on K (caches, occupancy)
            single = _seconds_per_candidate(lambda: [self._masked_measure(p) for p in probe * 2], 2)
            batched = _seconds_per_candidate(lambda: self._batched_passes(probe * self.per_pass),
                                             self.per_pass)
            self.path = "batched" if batched < single else "single"
            self.choice = {"reason": "timed", "single_ms": single * 1e3, "batched_ms": batched * 1e3}
        if self.path == "single":
            self.per_pass = 1
        self.choice.update(path=self.path, candidates_per_pass=self.per_pass, device=str(self.device),
                           precision=self.precision, channels_last=self.channels_last,
                           bn_recalibration=bool(self.bn_batches))

    def _batched_is_exact(self) -> bool:
        """Activation masks against weight masks on a few reward images and two random
        plans (each recalibrated on a few images of every calibration batch, when
        the reward recalibrates): a model whose structure the masks, or the
        per-candidate BN statistics, do not follow is scored singly."""
        rng = np.random.default_rng(0)
        g = self.graph
        plans = [g.plan(rng.dirichlet(np.ones(g.num_groups)), g.max_removable // d) for d in (2, 4)]
        try:
            # (calibration batches of up to 64 images: with a handful, BN statistics of
            # a small feature map are too ill-conditioned for fp32 to agree with itself)
            self.masks.check_exact(self.batches[0][0][:4].float(), plans,
                                   calibration=[x[:64].float() for x in self.bn_batches])
            return True
        except AssertionError:
            return False

    def _fitting_per_pass(self) -> int:
        """K from free memory: what one candidate's batched scoring takes at its
        peak (its BN recalibration pass included), into half the free memory
        (CUDA); a fixed small K elsewhere. Should K still not fit, the passes
        lower it (:meth:`_batched_passes`)."""
        free = _free_bytes(self.device)
        if free is None:
            return 8
        zero = [np.zeros(self.graph.num_groups, np.int64)]
        per_candidate = max(_peak_bytes(self.device, lambda: self._batched_measure(zero)), 1)
        return int(min(MAX_CANDIDATES_PER_PASS, max(1, 0.5 * free // per_candidate)))

    # ------------------------------------------------------------------ scoring
    def plan(self, distribution, *, fraction: float = 1.0, already_removed=None) -> np.ndarray:
        return plan_for_step(self.graph, distribution, self.context, round_to=self.settings["round_to"],
                             fraction=fraction, already_removed=already_removed)

    def score(self, counts: np.ndarray) -> dict:
        """Accuracy (top-1), KL divergence to the base model, cross-entropy, MACs,
        params and reward of the base model minus ``counts``."""
        return self.score_many([counts])[0]

    def score_many(self, plans: list) -> list[dict]:
        """``score`` for each plan, through the scorer's path (same results). A plan
        that names its channels (``plans.exact_plan`` with indices: Torch-Pruning's)
        is scored on the pruned copy of exactly those channels, the network the
        step would apply."""
        counted = [p for p in plans if not isinstance(p, dict)]
        if self.path == "batched":
            measured = self._batched_passes(counted)
        else:
            measured = [self._masked_measure(p) for p in counted]
        for i, p in enumerate(plans):        # (ascending: each lands at its own position)
            if isinstance(p, dict):
                measured.insert(i, self._masked_measure(p["counts"], p["indices"]))
        plans = [p["counts"] if isinstance(p, dict) else p for p in plans]
        if measured:
            measured[0]["macs_executed"] += self.pending_macs
            self.pending_macs = 0
        original = self.context["original"]
        out = []
        for counts, m in zip(plans, measured):
            macs, params = self.graph.cost(counts)
            out.append({"reward": reward_of(quality_of(m, self.settings), macs, params, self.settings, original),
                        **m, "macs": macs, "params": params})
        return out

    def _masked_measure(self, counts, indices=None) -> dict:
        """One candidate's measures, and the compute its passes executed: at the base
        model's full size when masked (zeroed channels still cost), at the pruned
        copy's size otherwise; BN recalibration's share counted apart. With
        ``indices``, on the pruned copy of those channels."""
        started = time.perf_counter()
        bn_macs, bn_s = [0], 0.0
        # masked in place where that is exact, else (LayerNorm over channels ...) a pruned copy
        scored = (self.graph.scored(counts) if indices is None
                  else contextlib.nullcontext(apply_plan(self.graph, counts, indices)))
        with scored as model:
            per_image = self.image_macs if model is self.model else int(round(self.graph.cost(counts)[0]))
            with compute.counting_forwards(model, per_image) as passes, \
                    recalibrated(model, self.bn_batches, self._autocast) as model:
                bn_macs, bn_s = passes[0], (time.perf_counter() - started if self.bn_batches else 0.0)
                measured = self._measure(model, 1)[0]
        return {**measured, "macs_executed": passes[0], "bn_recalibration_macs": bn_macs,
                "bn_recalibration_s": bn_s, "worker_s": time.perf_counter() - started}

    def _batched_passes(self, plans: list) -> list[dict]:
        """``plans`` measured ``per_pass`` at a time. A pass that runs out of device
        memory is retried with half the candidates, and K stays lowered (recorded
        in ``choice``): a K that does not fit slows the search, never ends it."""
        measured, i = [], 0
        while i < len(plans):
            chunk = plans[i:i + self.per_pass]
            try:
                measured += self._batched_measure(chunk)
                i += len(chunk)
                continue
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise           # one candidate does not fit: nothing left to lower
            # (out of the except block: its traceback holds the failed pass's tensors)
            self.choice.setdefault("lowered_from", self.per_pass)
            self.per_pass = max(1, len(chunk) // 2)
            self.choice["candidates_per_pass"] = self.per_pass
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return measured

    def _batched_measure(self, plans: list) -> list[dict]:
        """K candidates in one pass over the reward images repeated K times (after
        one pass per calibration batch, also K times, when BN statistics are
        re-estimated): each candidate's share is exactly 1/K of the passes (full
        size: masks make nothing cheaper)."""
        started = time.perf_counter()
        k = len(plans)
        with compute.counting_forwards(self.model, self.image_macs) as passes, \
                self.masks.applied(plans, self.bn_batches, self._autocast) as model:
            bn_macs, bn_s = passes[0] // k, (time.perf_counter() - started) / k if self.bn_batches else 0.0
            measured = self._measure(model, k)
        share, seconds = passes[0] // k, (time.perf_counter() - started) / k
        return [{**m, "macs_executed": share, "bn_recalibration_macs": bn_macs, "bn_recalibration_s": bn_s,
                 "worker_s": seconds} for m in measured]

    def _autocast(self):
        return autocast(self.device, self.precision)

    def _base_log_probs(self) -> list[torch.Tensor]:
        """The unpruned base model's log-probabilities on the reward batches, once per
        base model: what the KL reward compares every candidate with."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return [torch.log_softmax(self.model(x).float(), -1) for x, _ in self.batches]

    def _measure(self, model, k: int) -> list[dict]:
        """Top-1 (``accuracy``), mean KL(base || candidate) (``kl``) and mean
        cross-entropy (``loss``) of ``k`` candidates whose inputs are the reward
        images repeated ``k`` times (k = 1: the plain masked model), from one pass.
        One host read at the end."""
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        kl = torch.zeros(k, dtype=torch.float64, device=self.device)
        loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        total = 0
        with torch.inference_mode(), autocast(self.device, self.precision):
            for b, (x, y) in enumerate(self.batches):
                log_probs = torch.log_softmax(model(repeat_rows(x, k)).float().view(k, len(y), -1), -1)
                correct += (log_probs.argmax(-1) == y).sum(1)
                loss -= log_probs.gather(-1, y.expand(k, -1).unsqueeze(-1)).sum((1, 2)).double()
                if self.base_log_probs is not None:
                    base = self.base_log_probs[b]
                    kl += (base.exp() * (base - log_probs)).sum((1, 2)).double()
                total += len(y)
        n = max(total, 1)
        return [{"accuracy": a, "kl": d, "loss": c} for a, d, c in
                zip((correct.double() / n).tolist(), (kl / n).tolist(), (loss / n).tolist())]


def _worth_timing(device: torch.device) -> bool:
    """Whether ``auto`` times both paths. Not on a CPU: a pass there is compute-bound,
    so K candidates cost about K passes either way, and a timed choice could differ
    between a run and its resume (the record of the run would then differ too)."""
    return device.type != "cpu"


def _free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (K is then fixed)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _peak_bytes(device: torch.device, fn) -> int:
    """How far ``fn()`` raises the device's allocated memory at its peak."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _seconds_per_candidate(fn, k: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timings of ``fn`` (scoring ``k`` candidates), per candidate:
    the minimum is the least disturbed by other work on a shared machine."""
    fn()                                   # warm-up (kernel selection, caches)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best / k
