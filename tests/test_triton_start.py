"""`cmdeploy triton` start-up: PyTriton's instance-handshake race is retried, nothing else is."""

from __future__ import annotations

import pytest

from cmdeploy.triton_server import START_ATTEMPTS, _start_triton, handshake_race

# what tritonserver reported when a second instance's stub was refused by the handshake socket
RACE = (
    "[400] load failed for model 'cmdeploy': version 1 is at UNAVAILABLE state: Internal: "
    "TritonModelException: Model initialize error: Traceback (most recent call last):\n"
    '  File "/tmp/folderJYzM7U/1/model.py", line 425, in initialize\n'
    "    inference_handler_config = get_config_from_handshake_server(handshake_socket)\n"
    '  File "/tmp/folderJYzM7U/1/communication.py", line 550, in get_config_from_handshake_server\n'
    "    sock.connect(socket_path.as_posix())\n"
    "ConnectionRefusedError: [Errno 111] Connection refused\n"
)
TIMEOUT = (
    "Model initialize error: ... in get_config_from_handshake_server\n"
    "TimeoutError: Timeout occurred while waiting for config file /tmp/w/cmdeploy-config.sock"
)


class FakeTriton:
    """Records bind/run/stop; ``run`` raises the next queued error, if any."""

    def __init__(self, errors: list[BaseException], events: list[str], tmp_path) -> None:
        self._errors, self.events = errors, events
        self._workspace = type("W", (), {"path": tmp_path / f"ws{len(events)}"})()

    def bind(self) -> None:
        self.events.append("bind")

    def run(self) -> None:
        self.events.append("run")
        if self._errors:
            raise self._errors.pop(0)

    def stop(self) -> None:
        self.events.append("stop")


def start(errors, tmp_path, attempts=START_ATTEMPTS):
    events: list[str] = []
    logs: list[str] = []
    triton = _start_triton(
        lambda: FakeTriton(errors, events, tmp_path), lambda t: t.bind(), logs.append, attempts
    )
    return triton, events, logs


def test_handshake_race_is_recognised_and_nothing_else():
    assert handshake_race(RuntimeError(RACE))
    assert handshake_race(RuntimeError(TIMEOUT))
    assert not handshake_race(RuntimeError("load failed for model 'cmdeploy': bad config"))
    assert not handshake_race(RuntimeError("ConnectionRefusedError: [Errno 111] Connection refused"))


def test_a_start_that_hits_the_race_is_stopped_and_tried_again(tmp_path):
    triton, events, logs = start([RuntimeError(RACE), RuntimeError(TIMEOUT)], tmp_path)
    assert isinstance(triton, FakeTriton)
    assert events == ["bind", "run", "stop", "bind", "run", "stop", "bind", "run"]
    assert len(logs) == 2 and all("handshake" in m and "starting again" in m for m in logs)
    assert logs[0].startswith(f"Triton start 1/{START_ATTEMPTS}")


def test_the_race_every_time_is_raised_after_the_last_attempt(tmp_path):
    with pytest.raises(RuntimeError, match="Connection refused"):
        start([RuntimeError(RACE)] * 3, tmp_path, attempts=2)


@pytest.mark.parametrize("error", [RuntimeError("port 8000 already in use"), KeyboardInterrupt()])
def test_other_failures_are_raised_at_once_with_the_server_stopped(tmp_path, error):
    events: list[str] = []
    with pytest.raises(type(error)):
        _start_triton(lambda: FakeTriton([error], events, tmp_path), lambda t: t.bind(), print)
    assert events == ["bind", "run", "stop"]
