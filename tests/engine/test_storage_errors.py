"""A checkpoint store that stopped answering is found in Ray Train's errors and said in one message."""

from __future__ import annotations

import pickle

import ray.train

from detkd.config import Config
from detkd.engine.storage_errors import StorageUnreachable, storage_outage

REFUSED = (
    "When getting information for key 'runs/tiny-1/.validate_storage_marker' in bucket 'ckpts': AWS Error "
    "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server"
)


def config(**run) -> Config:
    return Config.model_validate({"run": run})


def test_a_refused_upload_in_a_worker_is_named_with_the_store_and_what_to_do():
    cfg = config(storage_path="s3://ckpts/runs?secret_key=hunter2", storage_endpoint="http://minio:9000")
    error = ray.train.WorkerGroupError("Training failed due to worker errors", {0: OSError(REFUSED)})
    found = storage_outage(error, cfg)
    assert isinstance(found, StorageUnreachable)
    assert str(found).startswith("checkpoint storage s3://ckpts/runs?secret_key=*** at http://minio:9000 did not")
    assert "curlCode: 7, Could not connect to server" in str(found) and "hunter2" not in str(found)
    assert "run the same command again" in str(found)
    assert str(pickle.loads(pickle.dumps(found))) == str(found)  # crosses to a pipeline's or a trial's driver


def test_a_failed_snapshot_write_in_the_controller_is_found_through_the_errors_raised_after_it():
    snapshot = OSError(
        "When initiating multiple part upload for key 'runs/tiny-1/checkpoint_manager_snapshot.json' in bucket "
        "'ckpts': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, Could not connect"
    )
    try:
        raise RuntimeError("the MLflow run ended as FAILED") from ray.train.ControllerError(snapshot)
    except RuntimeError as wrapped:
        found = storage_outage(wrapped, config(storage_path="s3://ckpts/runs"))
    assert found is not None and found.storage == "s3://ckpts/runs"
    assert found.detail.startswith("When initiating multiple part upload") and "CreateMultipartUpload" in found.detail


def test_other_errors_are_not_storage_outages():
    cfg = config(storage_path="s3://ckpts/runs")
    assert storage_outage(OSError(28, "No space left on device"), cfg) is None
    denied = OSError("When reading information for key 'x': AWS Error ACCESS_DENIED during HeadObject operation")
    assert storage_outage(ray.train.WorkerGroupError("failed", {0: denied}), cfg) is None
