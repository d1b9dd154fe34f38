"""Validates a JobSpec and resolves its defaults into a frozen plan the trainer runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import InvalidArgument
from protos.meshserve.data.v1 import data_pb2
from protos.meshserve.training.v1 import training_pb2
from workers.training import catalogue

DEFAULT_LOG_EVERY = 10
DEFAULT_MOMENTUM = 0.9
DEFAULT_GAMMA = 0.1
DEVICES = ("cpu", "cuda")
OPTIMIZERS = {
    training_pb2.OPTIMIZER_KIND_SGD,
    training_pb2.OPTIMIZER_KIND_SGD_MOMENTUM,
    training_pb2.OPTIMIZER_KIND_ADAM,
    training_pb2.OPTIMIZER_KIND_ADAMW,
}
SCHEDULES = {
    training_pb2.SCHEDULE_KIND_UNSPECIFIED,
    training_pb2.SCHEDULE_KIND_CONSTANT,
    training_pb2.SCHEDULE_KIND_STEP,
    training_pb2.SCHEDULE_KIND_COSINE,
}
MODEL_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
#: A model name is a directory of the repository (filesystems allow 255 bytes): bounded
#: as dataset names are (workers/data/schema.py).
MAX_MODEL_NAME = 128
MAX_WORLD_SIZE = 64


def validate_spec(spec: training_pb2.JobSpec) -> None:
    """Checks everything that needs no dataset; raises InvalidArgument naming the field."""
    name = spec.model_name
    if not name or not set(name) <= MODEL_NAME_CHARS or name.startswith("."):
        raise InvalidArgument(
            f"model_name: must be letters, digits, '.', '_' or '-' and not start with '.', "
            f"got {name!r}"
        )
    if len(name) > MAX_MODEL_NAME:
        raise InvalidArgument(f"model_name: at most {MAX_MODEL_NAME} characters, got {len(name)}")
    if spec.architecture.WhichOneof("kind") is None:
        raise InvalidArgument(
            "architecture: unknown or missing; choose one of mlp, cnn, transformer"
        )
    if not spec.dataset.name:
        raise InvalidArgument("dataset.name: must be set")
    opt = spec.optimizer
    if opt.kind not in OPTIMIZERS:
        raise InvalidArgument(
            f"optimizer.kind: unknown optimiser {opt.kind}; choose SGD, SGD_MOMENTUM, ADAM or ADAMW"
        )
    if not (opt.learning_rate > 0 and math.isfinite(opt.learning_rate)):
        raise InvalidArgument(f"optimizer.learning_rate: must be positive, got {opt.learning_rate}")
    if opt.momentum < 0 or opt.momentum >= 1:
        raise InvalidArgument(f"optimizer.momentum: must be in [0, 1), got {opt.momentum}")
    if opt.weight_decay < 0:
        raise InvalidArgument(f"optimizer.weight_decay: must be >= 0, got {opt.weight_decay}")
    sched = spec.schedule
    if sched.kind not in SCHEDULES:
        raise InvalidArgument(f"schedule.kind: unknown schedule {sched.kind}")
    if sched.kind == training_pb2.SCHEDULE_KIND_STEP and sched.step_size <= 0:
        raise InvalidArgument(
            f"schedule.step_size: must be positive for STEP, got {sched.step_size}"
        )
    if not 0 <= sched.gamma <= 1:
        raise InvalidArgument(f"schedule.gamma: must be in (0, 1], got {sched.gamma}")
    if sched.warmup_steps < 0:
        raise InvalidArgument(f"schedule.warmup_steps: must be >= 0, got {sched.warmup_steps}")
    if spec.epochs <= 0:
        raise InvalidArgument(f"epochs: must be positive, got {spec.epochs}")
    if spec.batch_size <= 0:
        raise InvalidArgument(f"batch_size: must be positive, got {spec.batch_size}")
    if spec.checkpoint_interval_steps < 0:
        raise InvalidArgument(
            f"checkpoint_interval_steps: must be >= 0, got {spec.checkpoint_interval_steps}"
        )
    if not 0 <= spec.world_size <= MAX_WORLD_SIZE:
        raise InvalidArgument(
            f"world_size: must be in [0, {MAX_WORLD_SIZE}], got {spec.world_size}"
        )
    if spec.log_every_steps < 0:
        raise InvalidArgument(f"log_every_steps: must be >= 0, got {spec.log_every_steps}")
    if spec.device and spec.device not in DEVICES:
        raise InvalidArgument(f"device: must be cpu, cuda or empty, got {spec.device!r}")


def validate_against(spec: training_pb2.JobSpec, dataset: data_pb2.Dataset) -> catalogue.Signature:
    """Checks that the architecture fits the dataset's schema and that there is data."""
    sig = catalogue.signature_of(dataset.schema)
    catalogue.validate(spec.architecture, sig)
    world = max(1, spec.world_size)
    if dataset.num_train < world:
        raise InvalidArgument(
            f"world_size: {world} processes need at least {world} training examples, "
            f"dataset {dataset.name!r} has {dataset.num_train}"
        )
    if dataset.num_validation <= 0:
        raise InvalidArgument(
            f"dataset: {dataset.name!r} version {dataset.version!r} has no validation split"
        )
    return sig


@dataclass(frozen=True)
class Plan:
    """How many steps a job takes, fixed at submission so every rank agrees."""

    world_size: int
    steps_per_epoch: int
    total_steps: int
    log_every: int
    checkpoint_every: int


def plan(spec: training_pb2.JobSpec, dataset: data_pb2.Dataset) -> Plan:
    """Steps per epoch for each rank: every rank takes the same number, or DDP would hang.

    Shard i holds examples i, i+W, ...; the smallest shard has num_train // W examples,
    so every rank stops after ceil((num_train // W) / batch_size) batches.
    """
    world = max(1, spec.world_size)
    per_rank = dataset.num_train // world
    steps = max(1, math.ceil(per_rank / spec.batch_size))
    return Plan(
        world_size=world,
        steps_per_epoch=steps,
        total_steps=steps * spec.epochs,
        log_every=spec.log_every_steps or DEFAULT_LOG_EVERY,
        checkpoint_every=spec.checkpoint_interval_steps or steps,
    )
