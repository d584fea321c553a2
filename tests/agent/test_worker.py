"""The agent in worker mode as a real process on pipes (as under the process runtime, without a shim): a worker
restored from a template takes its new sandbox's identity and says hello again as that sandbox; the backend's
own code (a template's pre-imports) runs there and is answered."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import cloudpickle
import pytest

from snapkernel.fanout.capture import pack
from snapkernel.protocol.frames import FrameBuffer, decode, encode
from snapkernel.protocol.v1 import backend_pb2 as pb


class Agent:
    def __init__(self) -> None:
        env = {**os.environ, "SNAPKERNEL_AGENT_MODE": "worker", "SNAPKERNEL_SANDBOX_ID": "sb-template"}
        self.proc = subprocess.Popen([sys.executable, "-m", "snapkernel.agent"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.frames = FrameBuffer()
        self.got: list[pb.AgentMessage] = []

    def send(self, msg: pb.AgentMessage) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode(msg))
        self.proc.stdin.flush()

    def next(self, kind: str) -> pb.AgentMessage:
        """The next message of this kind (the others are skipped)."""
        assert self.proc.stdout is not None
        while True:
            while self.got:
                msg = self.got.pop(0)
                if msg.WhichOneof("kind") == kind:
                    return msg
            data = os.read(self.proc.stdout.fileno(), 1 << 16)
            assert data, f"the worker ended before sending {kind}"
            self.got += [decode(body) for body in self.frames.feed(data)]


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent()
    try:
        yield a
    finally:
        a.proc.kill()
        a.proc.wait()


def test_a_restored_worker_takes_its_identity_and_says_hello_as_its_new_sandbox(agent: Agent) -> None:
    assert agent.next("worker_hello").worker_hello.sandbox_id == "sb-template"
    agent.send(pb.AgentMessage(identity=pb.Identity(id="r1", env={"SNAPKERNEL_SANDBOX_ID": "sb-new"})))
    assert agent.next("code_result").code_result == pb.CodeResult(id="r1", ok=True)
    hello = agent.next("worker_hello").worker_hello
    assert hello.sandbox_id == "sb-new" and hello.python == sys.version.split()[0]

    def sandbox(_: int) -> str:
        import os

        return os.environ["SNAPKERNEL_SANDBOX_ID"]

    payload = pack(sandbox)
    agent.send(pb.AgentMessage(worker_function=pb.WorkerFunction(hash=payload.digest, data=payload.data)))
    agent.send(pb.AgentMessage(worker_tasks=pb.WorkerTasks(job=1, function_hash=payload.digest, items=[
        pb.MapItem(index=0, data=cloudpickle.dumps(((0,), {})))])))
    (result,) = agent.next("worker_results").worker_results.results
    assert result.ok and cloudpickle.loads(result.data) == "sb-new"  # the user's code sees it too


def test_the_backends_own_code_runs_in_a_worker_and_is_answered(agent: Agent) -> None:
    agent.next("worker_hello")
    agent.send(pb.AgentMessage(run_code=pb.RunCode(id="a", code="pass\nimport json")))
    assert agent.next("code_result").code_result == pb.CodeResult(id="a", ok=True)
    agent.send(pb.AgentMessage(run_code=pb.RunCode(id="b", code="import no_such_module_here")))
    failed = agent.next("code_result").code_result
    assert failed.id == "b" and not failed.ok and failed.error.startswith("ModuleNotFoundError: No module named")
    agent.send(pb.AgentMessage(run_code=pb.RunCode(id="c", code="pass")))  # and it goes on
    assert agent.next("code_result").code_result.ok
