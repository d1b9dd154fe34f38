"""A failed job tells its client the kind of failure, never the worker's file paths."""

from __future__ import annotations

import errno

import pytest

from mesh.errors import Unavailable
from protos.meshserve.training.v1 import training_pb2
from workers.model_repo import RepositoryError
from workers.training.failures import job_failure, os_failure, publication_failure

from .conftest import Worker, finished, mlp_spec

SECRET_PATH = "/srv/meshserve/state/models/demo/.tmp-0123"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EROFS, "the file system is read-only"),
        (errno.ENAMETOOLONG, "a file name is too long for the file system"),
        (errno.ENOSPC, "no space left on the device"),
        (errno.EACCES, "permission denied"),
        (errno.ENOTDIR, "a file stands where a directory belongs"),
        (errno.EXDEV, "Invalid cross-device link"),  # an unlisted kind: strerror alone
    ],
)
def test_os_errors_name_their_kind_without_the_path(code: int, kind: str) -> None:
    exc = OSError(code, "ignored", SECRET_PATH)
    assert SECRET_PATH in str(exc)  # what the catch-all used to send
    assert os_failure(exc) == kind
    for message in (publication_failure("demo", exc), job_failure(exc)):
        assert kind in message and "/srv" not in message and "Errno" not in message


def test_other_failures_say_whose_and_keep_domain_messages() -> None:
    assert job_failure(Unavailable("data service: no healthy endpoint")) == (
        "data service: no healthy endpoint"
    )
    internal = job_failure(KeyError(SECRET_PATH))
    assert "KeyError" in internal and "log" in internal and "/srv" not in internal
    layout = publication_failure("demo", RepositoryError(f"{SECRET_PATH}: bad config"))
    assert "/srv" not in layout and "'demo'" in layout


async def test_a_job_that_cannot_publish_fails_naming_the_kind_not_the_path(
    worker: Worker,
) -> None:
    """A file where the model's folder belongs: publication fails with ENOTDIR, whose
    text carried the repository's path to the client ("worker error: [Errno 20] Not a
    directory: '/…/models/blobs-mlp/config.pbtxt'")."""
    worker.model_repo.mkdir(parents=True, exist_ok=True)
    (worker.model_repo / "blobs-mlp").write_text("not a model folder")
    job = await worker.stub.SubmitJob(training_pb2.SubmitJobRequest(spec=mlp_spec(epochs=1)))
    done = await finished(worker.stub, job.id)
    assert done.state == training_pb2.JOB_STATE_FAILED, done
    assert done.message == (
        "publishing model 'blobs-mlp' into the model repository failed: "
        "a file stands where a directory belongs"
    )
    assert str(worker.model_repo.parent) not in done.message
