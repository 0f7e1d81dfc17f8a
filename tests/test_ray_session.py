"""``ray_session``: Ray starts only when the job connects, locally without a dashboard, and stops after."""

import ray

from jobs.ray_session import ray_session


def test_local_ray_starts_on_connect_without_dashboard_and_stops(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session() as connect:
        assert not ray.is_initialized()  # a bad input fails before Ray starts
        connect()
        assert ray.is_initialized()
        assert not ray._private.worker.global_worker.node.address_info.get("webui_url")
    assert not ray.is_initialized()


def test_nothing_to_stop_when_never_connected():
    with ray_session():
        pass
    assert not ray.is_initialized()
