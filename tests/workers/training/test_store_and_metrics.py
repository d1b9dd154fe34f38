"""LocalJobStore persistence (atomic jobs, torn-tolerant event log) and evaluation metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protos.meshserve.training.v1 import training_pb2
from workers.training.jobstore import LocalJobStore
from workers.training.manager import catch_up
from workers.training.metrics import Accumulator, classification_metrics


def job(job_id: str, created: int) -> training_pb2.Job:
    j = training_pb2.Job(id=job_id, state=training_pb2.JOB_STATE_QUEUED)
    j.created_at.seconds = created
    return j


async def test_jobs_upsert_and_list_newest_first(tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path)
    await store.put(job("a", 10))
    await store.put(job("b", 20))
    updated = job("a", 10)
    updated.state = training_pb2.JOB_STATE_RUNNING
    await store.put(updated)
    assert [j.id for j in await store.list()] == ["b", "a"]
    # A fresh store on the same directory sees the same jobs (it survives restarts).
    again = LocalJobStore(tmp_path)
    got = await again.get("a")
    assert got is not None and got.state == training_pb2.JOB_STATE_RUNNING
    assert await again.get("missing") is None
    assert await again.get("../a") is None
    assert not list(tmp_path.glob(".*tmp"))


async def test_events_from_a_sequence_and_a_torn_last_line(tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path)
    for seq in range(1, 6):
        await store.append_event("j", training_pb2.JobEvent(sequence=seq))
    assert [e.sequence for e in await store.events("j", 0)] == [1, 2, 3, 4, 5]
    assert [e.sequence for e in await store.events("j", 4)] == [4, 5]
    # A crash mid-append leaves half a line: it is skipped, and the next append is whole.
    with open(tmp_path / "j.events", "ab") as f:
        f.write(b"CAgS")
    assert [e.sequence for e in await store.events("j", 0)] == [1, 2, 3, 4, 5]
    await store.append_event("j", training_pb2.JobEvent(sequence=6))
    assert [e.sequence for e in await store.events("j", 5)] == [5, 6]
    assert await store.events("other", 0) == []


def test_classification_metrics_are_macro_averaged() -> None:
    # true class rows, predicted class columns
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    m = classification_metrics(confusion)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # precision: class 0 = 3/3, class 1 = 2/3, class 2 has no predictions = 0
    assert m["precision"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # recall: class 0 = 3/4, class 1 = 2/2, class 2 has no examples = 0
    assert m["recall"] == pytest.approx((0.75 + 1 + 0) / 3)
    f1_0 = 2 * 1 * 0.75 / 1.75
    f1_1 = 2 * (2 / 3) * 1 / (5 / 3)
    assert m["f1"] == pytest.approx((f1_0 + f1_1) / 3)


def test_accumulator_merges_batches() -> None:
    acc = Accumulator(classification=False)
    acc.add(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [0.0]]))
    acc.add(torch.tensor([[0.0]]), torch.tensor([[3.0]]))
    result = acc.result()
    assert result["mse"] == pytest.approx((0 + 4 + 9) / 3)
    assert result["loss"] == pytest.approx(result["mse"])
    cls = Accumulator(classification=True, num_classes=2)
    cls.add(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    assert cls.result()["accuracy"] == 0.5
    assert Accumulator(classification=True, num_classes=2).result() == {}


def test_catch_up_applies_events_the_saved_job_missed() -> None:
    # The worker died after appending these events but before saving the job.
    saved = training_pb2.Job(id="j", state=training_pb2.JOB_STATE_RUNNING, step=50, last_event=9)
    missed = [
        training_pb2.JobEvent(sequence=10, step_loss=training_pb2.StepLoss(step=55)),
        training_pb2.JobEvent(
            sequence=11,
            epoch_metrics=training_pb2.EpochMetrics(epoch=3, step=60, metrics={"val_loss": 0.5}),
        ),
    ]
    catch_up(saved, missed)
    assert (saved.last_event, saved.step, saved.epoch) == (11, 60, 3)
    assert saved.metrics["val_loss"] == 0.5
    catch_up(
        saved,
        [
            training_pb2.JobEvent(
                sequence=12,
                state_changed=training_pb2.StateChanged(
                    state=training_pb2.JOB_STATE_FAILED, message="x"
                ),
            )
        ],
    )
    assert saved.state == training_pb2.JOB_STATE_FAILED and saved.message == "x"
