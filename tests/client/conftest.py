import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app


@pytest.fixture
def flower_task(monkeypatch):
    """A ClientApp reply needs Flower's task identity, which a SuperNode's runtime
    sets before app code runs; a bare test process sets it here (and the site's
    log lines stay local). Tests that call ``client.app.app`` in-process use it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(client_app, "log_through_flower", lambda *a: None)
