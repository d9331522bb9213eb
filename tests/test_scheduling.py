"""hpc.scheduling: a job graph run to the end on the debug and local executors."""

from __future__ import annotations

import functools
import os
import subprocess

import pytest

from sepnet.core.errors import SubmissionError
from sepnet.hpc.executors import make_executor
from sepnet.hpc.resources import ExecutorConfig
from sepnet.hpc.scheduling import GraphJob, pid_alive, run_graph


class Record:
    """A task appending its name to a shared list (debug executor: runs in this process)."""

    def __init__(self, log: list[str], name: str, *, fail: bool = False):
        self.log, self.name, self.fail = log, name, fail

    def __call__(self) -> str:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} broke\nValueError: the cause of {self.name}")
        return self.name


@pytest.fixture
def debug(tmp_path):
    return make_executor(ExecutorConfig(kind="debug"), folder=tmp_path / "logs", name="graph")


def test_dependencies_run_first_and_outside_names_count_as_done(debug):
    log: list[str] = []
    graph = [GraphJob("c", Record(log, "c"), debug, after=["b"]),
             GraphJob("b", Record(log, "b"), debug, after=["a", "finished-earlier"]),
             GraphJob("a", Record(log, "a"), debug),
             GraphJob("d", Record(log, "d"), debug)]
    events, submitted = [], []
    run = run_graph(graph, in_process=True, on_event=lambda n, w, k: events.append((n, w, k)),
                    on_submit=lambda n, j: submitted.append(n))
    assert run.ok and run.finished == {"a", "b", "c", "d"}
    assert log.index("a") < log.index("b") < log.index("c") and sorted(log) == ["a", "b", "c", "d"]
    assert sorted(submitted) == sorted(run.jobs) == ["a", "b", "c", "d"]
    assert [k for n, w, k in events if w == "done"] == [1, 2, 3, 4]  # finished count grows by one


def test_a_failure_skips_its_dependants_only(debug):
    log: list[str] = []
    graph = [GraphJob("a", Record(log, "a", fail=True), debug),
             GraphJob("b", Record(log, "b"), debug, after=["a"]),
             GraphJob("c", Record(log, "c"), debug, after=["b"]),
             GraphJob("d", Record(log, "d"), debug)]
    run = run_graph(graph, in_process=True)
    assert not run.ok and sorted(log) == ["a", "d"]
    assert set(run.failed) == {"a"} and "ValueError: the cause of a" in run.failed["a"]
    assert run.skipped == {"b": "a job it depends on failed", "c": "a job it depends on failed"}
    assert "FAILED a" in run.summary() and "skipped c" in run.summary()


def test_a_cycle_is_refused(debug):
    graph = [GraphJob("a", Record([], "a"), debug, after=["b"]), GraphJob("b", Record([], "b"), debug, after=["a"])]
    with pytest.raises(SubmissionError, match="cannot progress"):
        run_graph(graph, in_process=True)
    with pytest.raises(SubmissionError, match="same name"):
        run_graph([GraphJob("a", Record([], "a"), debug)] * 2, in_process=True)


def test_local_executor_runs_parallel_jobs_at_once(tmp_path):
    ex = make_executor(ExecutorConfig(kind="local", time_min=5), folder=tmp_path / "logs", name="graph")
    stamps = tmp_path / "stamps"

    def task(name: str):
        script = f"echo start {name} >> {stamps}; sleep 2; echo end {name} >> {stamps}"
        return functools.partial(subprocess.run, ["sh", "-c", script], check=True)

    graph = [GraphJob("a", task("a"), ex), GraphJob("b", task("b"), ex), GraphJob("c", task("c"), ex, after=["a"])]
    run = run_graph(graph, parallel=2, poll_s=0.2)
    assert run.ok, run.failed
    lines = stamps.read_text().split("\n")
    # a and b both started before either ended; c started after a ended
    assert {lines[0], lines[1]} == {"start a", "start b"}
    assert lines.index("end a") < lines.index("start c")


def test_pid_alive():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert pid_alive(os.getpid()) and not pid_alive(proc.pid)


class FakeSlurm:
    """Records what submit_graph_slurm queues: batches (arrays) with their sbatch dependency."""

    cluster = "slurm"

    def __init__(self, name: str, queued: list):
        self.name, self.queued, self.next_id = name, queued, [100]
        self._executor = type("Inner", (), {"parameters": {"additional_parameters": {"reservation": "r"}}})()
        self.batching: list | None = None

    def update_parameters(self, *, slurm_additional_parameters):
        self._executor.parameters["additional_parameters"] = slurm_additional_parameters

    def batch(self):
        import contextlib

        @contextlib.contextmanager
        def _batch():
            self.batching = []
            yield
            deps = self._executor.parameters["additional_parameters"].get("dependency")
            self.queued.append((self.name, [t.name for t in self.batching], deps))
            self.batching = None

        return _batch()

    def submit(self, task):
        self.batching.append(task)
        self.next_id[0] += 1
        return type("Job", (), {"job_id": f"{self.name}{self.next_id[0]}"})()


def test_slurm_graph_queues_one_array_per_stage_and_dependencies():
    from sepnet.hpc.scheduling import submit_graph_slurm

    queued: list = []
    pre, train, ev = FakeSlurm("p", queued), FakeSlurm("t", queued), FakeSlurm("e", queued)
    task = lambda n: type("T", (), {"name": n})()  # noqa: E731
    graph = [GraphJob("pre0", task("pre0"), pre), GraphJob("pre1", task("pre1"), pre),
             GraphJob("a", task("a"), train, after=["pre0", "pre1", "finished-earlier"]),
             GraphJob("b", task("b"), train, after=["pre0", "pre1"]),
             GraphJob("eval", task("eval"), ev, after=["a", "b"])]
    jobs = submit_graph_slurm(graph)
    assert queued == [("p", ["pre0", "pre1"], None),
                      ("t", ["a", "b"], "afterok:p101:p102"),
                      ("e", ["eval"], "afterok:t101:t102")]
    assert set(jobs) == {"pre0", "pre1", "a", "b", "eval"}
    # the executor's own sbatch options are back after each dependent array
    assert train._executor.parameters["additional_parameters"] == {"reservation": "r"}
