"""The training loop that runs inside a job's own process (one per rank for world_size > 1).

It streams batches from the data service, steps the optimiser, checkpoints every
interval, evaluates each epoch and finally exports TorchScript; progress goes to
the worker as small dicts through a ``Report`` callable (a pipe in production).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.training import catalogue, export
from workers.training.batches import DataClient, StreamRequest
from workers.training.checkpoint import JobArtifacts
from workers.training.metrics import Accumulator, loss_fn
from workers.training.spec import DEFAULT_GAMMA, DEFAULT_MOMENTUM, Plan

Report = Callable[[dict[str, Any]], None]
EVAL_BATCH_SIZE = 512


class TrainingFailed(Exception):
    """The run cannot go on (non-finite loss, bad data); the message is the job's reason."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a training process needs; picklable, so it crosses a spawn."""

    job_id: str
    spec: bytes  # serialized JobSpec
    dataset: bytes  # serialized Dataset (resolved version)
    plan: Plan
    data_address: str
    artifacts_url: str
    device: str  # "cpu" or "cuda"
    #: CPU threads per rank; 0 shares the machine's cores among the ranks.
    threads: int = 0
    #: Across hosts (``workers.training.nodes``): the rendezvous every node's ranks join
    #: (``tcp://host:port``) and the global ranks this node runs; None: every rank here.
    init_method: str | None = None
    ranks: tuple[int, ...] | None = None

    def job_spec(self) -> training_pb2.JobSpec:
        return training_pb2.JobSpec.FromString(self.spec)

    def dataset_meta(self) -> data_pb2.Dataset:
        return data_pb2.Dataset.FromString(self.dataset)


def build_network(spec: training_pb2.JobSpec, dataset: data_pb2.Dataset) -> nn.Module:
    sig = catalogue.signature_of(dataset.schema)
    mean = std = None
    if spec.standardize:
        stats = {s.name: s for s in dataset.feature_stats}
        if sig.input_name not in stats:
            raise TrainingFailed(
                f"standardize: dataset {dataset.name!r} has no statistics for {sig.input_name!r}"
            )
        mean, std = list(stats[sig.input_name].mean), list(stats[sig.input_name].std)
    return catalogue.build(spec.architecture, sig, mean, std)


def build_optimizer(spec: training_pb2.JobSpec, params: Any) -> torch.optim.Optimizer:
    opt = spec.optimizer
    lr, wd = opt.learning_rate, opt.weight_decay
    if opt.kind == training_pb2.OPTIMIZER_KIND_SGD:
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if opt.kind == training_pb2.OPTIMIZER_KIND_SGD_MOMENTUM:
        return torch.optim.SGD(
            params, lr=lr, momentum=opt.momentum or DEFAULT_MOMENTUM, weight_decay=wd
        )
    if opt.kind == training_pb2.OPTIMIZER_KIND_ADAM:
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def lr_factor(schedule: training_pb2.Schedule, plan: Plan, step: int) -> float:
    """Multiplier of the base learning rate before optimiser step ``step`` (0-based)."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == training_pb2.SCHEDULE_KIND_STEP:
        decays = step // (schedule.step_size * plan.steps_per_epoch)
        return float((schedule.gamma or DEFAULT_GAMMA) ** decays)
    if schedule.kind == training_pb2.SCHEDULE_KIND_COSINE:
        span = max(1, plan.total_steps - schedule.warmup_steps)
        progress = min(1.0, (step - schedule.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    client: DataClient,
    dataset: data_pb2.Dataset,
    split: int,
    device: torch.device,
) -> dict[str, float]:
    """loss plus accuracy/precision/recall/f1 or mse of ``model`` on a whole split."""
    return accumulate(model, client, dataset, split, device).result()


def accumulate(
    model: Callable[[torch.Tensor], torch.Tensor],
    client: DataClient,
    dataset: data_pb2.Dataset,
    split: int,
    device: torch.device,
) -> Accumulator:
    """Runs ``model`` over a whole split, summing what the metrics need."""
    sig = catalogue.signature_of(dataset.schema)
    acc = Accumulator(sig.is_classification, sig.num_classes)
    request = StreamRequest(dataset.name, dataset.version, split, EVAL_BATCH_SIZE)
    with torch.no_grad():
        for batch in client.batches(request):
            outputs = model(batch[sig.input_name].to(device))
            acc.add(outputs, batch[sig.label_name])
    return acc


def _labels(batch: dict[str, torch.Tensor], sig: catalogue.Signature) -> torch.Tensor:
    return batch[sig.label_name]


def train(config: RunConfig, rank: int, report: Report) -> None:
    """Runs (or resumes) the job on this rank; rank 0 reports, checkpoints and exports."""
    spec, dataset, plan = config.job_spec(), config.dataset_meta(), config.plan
    world = plan.world_size
    lead = rank == 0
    sig = catalogue.signature_of(dataset.schema)
    if config.device == "cuda":
        device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // world))

    # Same seed on every rank: identical initial weights (DDP would broadcast anyway).
    torch.manual_seed(spec.seed)
    model = build_network(spec, dataset).to(device)
    optimizer = build_optimizer(spec, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(spec.schedule, plan, s)
    )
    artifacts = JobArtifacts(config.artifacts_url, config.job_id)
    step = 0
    epoch_loss_sum, epoch_examples = 0.0, 0
    state = artifacts.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        epoch_loss_sum, epoch_examples = (
            float(state["epoch_loss_sum"]),
            int(state["epoch_examples"]),
        )
        if lead:
            torch.set_rng_state(state["rng_cpu"])
            if device.type == "cuda" and "rng_cuda" in state:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
    if not lead or state is None:
        # Dropout differs per rank (and, after a resume, from the pre-crash stream).
        torch.manual_seed(spec.seed + 1_000_003 * rank + step)
    if lead:
        report({"type": "started", "resumed_from": step if state is not None else -1})

    network: nn.Module = model
    if world > 1:
        network = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )

    def save(epoch_loss: float, epoch_n: int) -> None:
        checkpoint: dict[str, Any] = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch_loss_sum": epoch_loss,
            "epoch_examples": epoch_n,
            "rng_cpu": torch.get_rng_state(),
        }
        if device.type == "cuda":
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state(device)
        uri = artifacts.save_checkpoint(checkpoint)
        report({"type": "checkpoint", "step": step, "uri": uri})

    client = DataClient(config.data_address)
    try:
        window_loss, window_steps, window_examples = 0.0, 0, 0
        window_start = time.perf_counter()
        first_epoch = step // plan.steps_per_epoch
        for epoch in range(first_epoch, spec.epochs):
            done_in_epoch = step - epoch * plan.steps_per_epoch
            if done_in_epoch == 0:
                epoch_loss_sum, epoch_examples = 0.0, 0
            network.train()
            request = StreamRequest(
                dataset.name,
                dataset.version,
                data_pb2.SPLIT_TRAIN,
                spec.batch_size,
                shuffle=True,
                seed=spec.seed,
                epoch=epoch,
                num_shards=world,
                shard_index=rank,
            )
            for index, batch in enumerate(client.batches(request)):
                if index >= plan.steps_per_epoch:
                    break  # shards differ by at most one example; every rank stops together
                if index < done_in_epoch:
                    continue  # resumed mid-epoch: the same shuffle, so skip what was trained
                inputs = batch[sig.input_name].to(device, non_blocking=True)
                labels = _labels(batch, sig).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(network(inputs), labels, sig.is_classification)
                loss.backward()  # type: ignore[no-untyped-call]
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingFailed(
                        f"loss became {value} at step {step + 1} (epoch {epoch + 1}); "
                        f"try a smaller optimizer.learning_rate"
                    )
                optimizer.step()
                scheduler.step()
                step += 1
                n = int(inputs.shape[0])
                epoch_loss_sum += value * n
                epoch_examples += n
                window_loss += value
                window_steps += 1
                window_examples += n
                if lead and (step % plan.log_every == 0 or step == plan.total_steps):
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    report(
                        {
                            "type": "step",
                            "step": step,
                            "epoch": epoch + 1,
                            "loss": window_loss / window_steps,
                            "learning_rate": scheduler.get_last_lr()[0],
                            # Every rank trains a batch per step: global throughput.
                            "examples_per_second": window_examples * world / elapsed,
                            "eta_seconds": (plan.total_steps - step) * elapsed / window_steps,
                        }
                    )
                    window_loss, window_steps, window_examples = 0.0, 0, 0
                    window_start = time.perf_counter()
                if lead and step % plan.checkpoint_every == 0 and step < plan.total_steps:
                    save(epoch_loss_sum, epoch_examples)
            if lead:
                model.eval()
                val = evaluate(model, client, dataset, data_pb2.SPLIT_VALIDATION, device)
                metrics = {"train_loss": epoch_loss_sum / max(1, epoch_examples)}
                metrics.update({f"val_{k}": v for k, v in val.items()})
                report({"type": "epoch", "epoch": epoch + 1, "step": step, "metrics": metrics})
                window_start = time.perf_counter()  # evaluation is not training throughput
        if lead:
            model.eval()
            final = evaluate(model, client, dataset, data_pb2.SPLIT_VALIDATION, device)
            scripted = export.to_torchscript(model.cpu())
            artifacts.write_atomic(artifacts.export_path, scripted)
            report(
                {"type": "done", "step": step, "metrics": {f"val_{k}": v for k, v in final.items()}}
            )
    finally:
        client.close()
