"""The sweep's cost stage: each architecture signature timed once, alone on its node, and kept in
the cost table (`segtune.tracking.costs`) for every trial of this sweep and of later ones.

A model's latency, FLOPs, parameters and size depend on its structure, the measured input, the
threads, the precision, the machine and torch, never on its trained weights. So the driver times
every signature of a sweep before the first trial starts, while no work of the sweep runs: in
its own process for its own node, and as a Ray task holding all the CPUs and GPUs of one node
of each other kind. A trial then takes its cost from the table. A trial whose signature could not
be known in advance (a sampled width, a node that joined later) times itself, and says so.

Every CPU timing records how steady the machine was: the spread of the timed runs, the cores that
other processes kept busy meanwhile (the machine's CPU counters through psutil), and the load
averages. A timing whose spread is over 10%, or that shared its cores, is tried again after a
pause and marked noisy if it stays so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from segtune.config.sweep import BenchSection
from segtune.config.trial import TrialConfig, parse_hw
from segtune.models import MODEL_KEYS, build_model
from segtune.models.cost import (
    Cost,
    cpu_latency_runs,
    cpu_name,
    gpu_cost,
    gpu_skip_reason,
    static_cost,
)
from segtune.tracking.costs import find_cost, record_cost

log = logging.getLogger(__name__)

MAX_CV = 0.10  # spread (stdev / mean) of the timed runs above which a timing is not trusted
MIN_NOISE_MS = 1.0  # ... unless the spread is below the clock's and the scheduler's jitter
MAX_OTHER_CORES = 0.3  # cores other processes may keep busy while a timing runs
ATTEMPTS = 3  # tries of a noisy timing before it is recorded as noisy
RETRY_WAIT_S = 5.0  # pause between tries: let a passing load end


@dataclass(frozen=True)
class NodeKind:
    """What a latency depends on besides the model: the CPU model and the GPU ("" for none)."""

    cpu: str
    gpu: str


def node_kind(gpu: bool = True) -> NodeKind:
    """This process's node; `gpu=False` when GPU latency is not wanted (bench.gpu: false)."""
    usable = gpu and gpu_skip_reason() is None
    return NodeKind(cpu_name(), torch.cuda.get_device_name() if usable else "")


def model_key(cfg: TrialConfig) -> tuple[Any, ...]:
    """Trials equal on this key build the same network."""
    return tuple(getattr(cfg, k) for k in MODEL_KEYS)


def signature(model: nn.Module, bench: BenchSection, kind: NodeKind) -> str:
    """The cost table's key: the network's structure (its module tree, which holds every layer's
    shape, stride and dilation), the measured input, threads, precision, machine and torch."""
    fields = {
        "structure": hashlib.sha256(repr(model).encode()).hexdigest(),
        "input": bench.input,
        "threads": bench.threads,
        "cpu": kind.cpu,
        "gpu": kind.gpu,
        "precision": "float32",
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds so far of the whole machine on this process's CPUs, and of this process."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = [t for i, t in enumerate(per_cpu) if allowed is None or i in allowed]
    busy = sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
               for t in chosen)  # fmt: skip
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def steady_cpu_latency(
    model: nn.Module, input_hw: Sequence[int], threads: int, warmup: int, repeats: int
) -> Cost:
    """CPU latency with its conditions; tried again while noisy (ATTEMPTS, RETRY_WAIT_S apart),
    and the steadiest try kept, marked `noisy` with the reason if none was steady."""
    best: Cost | None = None
    for attempt in range(1, ATTEMPTS + 1):
        load_before = os.getloadavg()[0]
        started, busy0, own0 = time.monotonic(), *_cpu_seconds()
        runs = cpu_latency_runs(model, input_hw, threads, warmup, repeats)
        busy1, own1 = _cpu_seconds()
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(time.monotonic() - started, 1e-6)
        spread = statistics.stdev(runs) if len(runs) > 1 else 0.0
        cv = spread / statistics.mean(runs)
        cost = Cost(
            infer_ms_cpu=statistics.median(runs),
            bench_threads=threads,
            bench_warmup=warmup,
            bench_repeats=repeats,
            cpu_cv=round(cv, 4),
            other_cores=round(others, 2),
            load_before=round(load_before, 2),
            load_after=round(os.getloadavg()[0], 2),
            cpu_attempts=attempt,
        )
        reasons = []
        if cv > MAX_CV and spread > MIN_NOISE_MS:
            reasons.append(f"runs spread {cv:.0%} (over {MAX_CV:.0%})")
        if others > MAX_OTHER_CORES:
            reasons.append(f"other processes kept {others:.1f} cores busy")
        if not reasons:
            return cost
        cost["noisy"] = "; ".join(reasons)
        if best is None or (others, cv) < (best["other_cores"], best["cpu_cv"]):
            best = cost
        if attempt < ATTEMPTS:
            log.info("CPU timing noisy (%s): trying again in %.0f s", cost["noisy"], RETRY_WAIT_S)
            time.sleep(RETRY_WAIT_S)
    assert best is not None
    best["cpu_attempts"] = ATTEMPTS
    return best


def measure_alone(model: nn.Module, bench: BenchSection, kind: NodeKind) -> Cost:
    """Every cost of `model` under `bench`, with a GPU latency where `kind` has a GPU."""
    input_hw = parse_hw(bench.input)
    cost = static_cost(model, input_hw)
    cost.update(steady_cpu_latency(model, input_hw, bench.threads, bench.warmup, bench.repeats))
    if kind.gpu:
        cost.update(gpu_cost(model, input_hw))
    else:
        cost["gpu_skip_reason"] = gpu_skip_reason() or (
            "not timed here (bench.gpu: false, or a CPU trial beside the trials that use the GPU)"
        )
    return cost


def measure_missing(
    configs: Sequence[TrialConfig],
    bench: BenchSection,
    tracking_uri: str,
    before_timing: Callable[[], None] | None = None,
) -> dict[tuple[Any, ...], Cost]:
    """On this node: the cost of each configuration's network, from the cost table where it holds
    a steady one, else timed now and recorded. Keyed by `model_key`. `before_timing` is called
    once, before the first network is timed (the driver quiets its own processes there)."""
    client = MlflowClient(tracking_uri)
    kind = node_kind(bench.gpu)
    unique = {model_key(cfg): cfg for cfg in configs}
    costs: dict[tuple[Any, ...], Cost] = {}
    for i, (key, cfg) in enumerate(unique.items(), 1):
        label = cfg.model_label()
        model = build_model(cfg.model_copy(update={"pretrained": "none"}))
        sig = signature(model, bench, kind)
        found = find_cost(client, sig)
        if found is not None and "noisy" not in found[1]:
            run_id, cost = found
            cost.update(source="reused", run_id=run_id)
            log.info("cost %d/%d %s: reused (cost run %s)", i, len(unique), label, run_id)
        else:
            if before_timing is not None:
                before_timing()
                before_timing = None
            started = time.perf_counter()
            cost = measure_alone(model, bench, kind)
            cost["signature"] = sig
            cost.update(source="measured", run_id=record_cost(client, sig, label, cost))
            log.info(
                "cost %d/%d %s: CPU %.1f ms (spread %.0f%%, %s) in %.1f s",
                i,
                len(unique),
                label,
                cost["infer_ms_cpu"],
                100 * cost["cpu_cv"],
                cost.get("noisy", "steady"),
                time.perf_counter() - started,
            )
        costs[key] = cost
    return costs


def run_cost_stage(
    configs: Sequence[TrialConfig],
    bench: BenchSection,
    tracking_uri: str,
    *,
    joined: bool,
    before_timing: Callable[[], None] | None = None,
) -> tuple[dict[tuple[Any, ...], Cost], dict[str, str]]:
    """The cost stage of a sweep, before its first trial: every network of `configs` on every
    kind of node, in the driver for its own machine, else one Ray task per node kind that
    holds all of that node's CPUs and GPUs. Returns the costs of the first node kind by
    `model_key` (to order the trials), and `measured` or `reused` by signature (for the
    trials' record). `before_timing` is called before anything is timed on the driver's
    machine: before the first network timed here, or before the tasks of a cluster."""
    if not configs:
        return {}, {}
    if not joined:
        results = [measure_missing(configs, bench, tracking_uri, before_timing)]
    else:
        if before_timing is not None:  # the driver's machine may be one of the nodes
            before_timing()
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
        probe = ray.remote(num_cpus=0)(cpu_name)
        names = ray.get(
            [
                probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], False)
                ).remote()
                for n in nodes
            ]
        )
        kinds: dict[tuple[Any, ...], dict[str, Any]] = {}
        for node, name in zip(nodes, names, strict=True):
            resources = node["Resources"]
            accelerators = sorted(k for k in resources if k.startswith("accelerator_type:"))
            kinds.setdefault((name, resources.get("GPU", 0), *accelerators), node)
        task = ray.remote(measure_missing)
        results = ray.get(
            [
                task.options(
                    num_cpus=node["Resources"]["CPU"],
                    num_gpus=int(node["Resources"].get("GPU", 0)),
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], False),
                ).remote(configs, bench, tracking_uri)
                for node in kinds.values()
            ]
        )
    sources = {c["signature"]: c["source"] for costs in results for c in costs.values()}
    return results[0], sources


def trial_cost(
    model: nn.Module,
    bench: BenchSection,
    device: torch.device,
    tracking_uri: str,
    measured: Mapping[str, str],
    gpu_shared: bool,
) -> Cost:
    """A finished trial's cost: its signature's entry in the cost table (`source` says whether
    this sweep's cost stage `measured` it or `reused` an older one), else timed here, inside the
    trial (`source: trial`), with the noisy mark if other work shared the CPUs or the GPU."""
    kind = node_kind(bench.gpu)
    sig = signature(model, bench, kind)
    found = find_cost(MlflowClient(tracking_uri), sig)
    if found is not None:
        run_id, cost = found
        cost.update(source=measured.get(sig, "reused"), run_id=run_id)
        return cost
    own_gpu = kind.gpu if device.type == "cuda" else ""
    cost = measure_alone(model, bench, NodeKind(kind.cpu, own_gpu))
    cost.update(signature=sig, source="trial")
    if own_gpu and gpu_shared:
        cost["noisy"] = "; ".join(filter(None, [cost.get("noisy"), "GPU shared with other trials"]))
    return cost
