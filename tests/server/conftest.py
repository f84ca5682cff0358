import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def server_task_identity(monkeypatch):
    """Flower stamps each instruction Message with the running task's identity,
    which its runtime sets before app code runs; a bare test process sets it here."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
