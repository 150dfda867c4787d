"""A test master: the REST calls Determined 0.38.1's harness makes for a trial, answered and recorded.

Test code only, and the one place a master is imitated. Determined's own code runs unmodified against
it: ``determined.exec.prep_container`` (rendezvous), ``determined.launch.torch_distributed`` (with
``torch.distributed.run`` and the pid server), ``core.init()`` with its REST bindings and
``pytorch.Trainer.fit``'s cluster branch, with ``model_def/train.py`` as the script and the
environment an agent gives a trial container (``harness/determined/_info.py``).

What it answers (paths from ``harness/determined/common/api/bindings.py`` and ``core/*.py``):
rendezvous, run preparation, trial metrics, progress, runner state, checkpoint reports and lookups,
the preemption long poll and its acknowledgement, the experiment's best validation, run metadata,
trial source info, task logs. Anything else is answered 404 and recorded in ``unknown``, so a test
can assert that the harness asked for nothing the master does not serve.

What it enforces, as the real master does where a trial would fail or be retried there:
- a validation must carry the searcher metric and, for ``adaptive_asha``, the searcher's
  ``time_metric`` as numbers (``master/pkg/searcher/asha_stopping.go``, ``getMetric``: "error parsing
  searcher metric" / "error parsing searcher time metric" fail the experiment's searcher);
- progress must lie in [0, 1] (``master/internal/api_trials.go``, ``ReportTrialProgress``);
- a reported checkpoint's ``resources`` must be the files in storage, with their sizes
  (``master/internal/api_checkpoint.go``, checkpoints are GC'd and restored by that list);
- preemption: ``signals/preemption`` answers ``preempt: true`` once the trial has reported
  ``preempt_at_batch`` training batches (``master/internal/task/allocation_service.go``,
  ``WatchPreemption``), and the trial must acknowledge it (``AckAllocationPreemptionSignal``);
- a searcher's early stop: after ``stop_after_validations`` validations the trial's state is
  ``STATE_STOPPING_COMPLETED`` and nothing is sent to the trial, as 0.38.1 does for an ASHA stop
  (``master/internal/experiment.go``, ``searcher.Stop`` -> ``trial.PatchSearcherState``;
  ``master/internal/trial.go``, ``transition`` signals only canceled, killed and errored stops).
Violations are answered HTTP 400 (the harness raises) and kept in ``violations``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class TestMaster:
    """One experiment with one trial; ``storage`` is the experiment's ``directory`` checkpoint storage."""

    storage: Path
    searcher: dict[str, Any]
    preempt_at_batch: int | None = None
    stop_after_validations: int | None = None
    slots: int = 1
    calls: list[Call] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    preemption_acked: bool = False
    best: float | None = None

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.port = free_port()
        master = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the calls are recorded instead
                pass

            def _answer(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw.strip() else None
                status, reply = master.handle(self.command, url.path, parse_qs(url.query), body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> TestMaster:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- what the trial reported -------------------------------------------------------------

    def metrics(self, group: str) -> list[dict[str, Any]]:
        """Each report of ``group`` (training, validation): ``{"steps": N, **metrics}``."""
        out = []
        for call in self.calls:
            if call.method == "POST" and call.path.endswith("/metrics") and call.body["group"] == group:
                m = call.body["metrics"]
                out.append({"steps": m["stepsCompleted"], **m["metrics"]["avgMetrics"]})
        return out

    def progress(self) -> list[float]:
        return [c.body["progress"] for c in self.calls if c.path.endswith("/progress")]

    def reported_checkpoints(self) -> list[dict[str, Any]]:
        return [c.body for c in self.calls if c.method == "POST" and c.path == "/api/v1/checkpoints"]

    # ---- the routes --------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        with self.lock:
            self.calls.append(Call(method, path, query, body))
        route = (method, re.sub(r"/\d+(?=/|$)", "/ID", path))
        if re.fullmatch(r"/api/v1/allocations/[^/]+/resources/[^/]+/rendezvous", path):
            return 200, {"rendezvousInfo": {"addresses": ["127.0.0.1"], "rank": 0, "slots": [self.slots]}}
        if re.fullmatch(r"/api/v1/allocations/[^/]+/signals/preemption", path):
            return 200, {"preempt": self.should_preempt()}
        if re.fullmatch(r"/api/v1/allocations/[^/]+/signals/ack_preemption", path):
            self.preemption_acked = True
            return 200, {}
        if re.fullmatch(r"/api/v1/allocations/[^/]+/(acceleratorData|proxy_address)", path):
            return 200, {}
        handler = ROUTES.get(route)
        if handler is None:
            self.unknown.append(f"{method} {path}")
            return 404, {"error": {"error": f"test master: no route {method} {path}"}}
        problem, reply = handler(self, path, body)
        if problem:
            self.violations.append(problem)
            return 400, {"error": {"error": problem}, "code": 3, "message": problem}
        return 200, reply

    def should_preempt(self) -> bool:
        if self.preempt_at_batch is None:
            return False
        trained = [m["steps"] for m in self.metrics("training")]
        return bool(trained) and max(trained) >= self.preempt_at_batch

    def _run_start(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {"storageId": 1}

    def _metrics(self, path: str, body: Any) -> tuple[str | None, Any]:
        if body["group"] != "validation":
            return None, {}
        values = body["metrics"]["metrics"]["avgMetrics"]
        wanted = [self.searcher["metric"]]
        if self.searcher.get("name") == "adaptive_asha":
            wanted.append(self.searcher["time_metric"])
        for key in wanted:
            value = values.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"error parsing searcher metric ({key}) from validation metrics: {values}", None
        value = float(values[self.searcher["metric"]])
        smaller = bool(self.searcher.get("smaller_is_better", True))
        if self.best is None or (value < self.best if smaller else value > self.best):
            self.best = value
        return None, {}

    def _progress(self, path: str, body: Any) -> tuple[str | None, Any]:
        progress = body.get("progress")
        if not isinstance(progress, (int, float)) or not 0 <= progress <= 1:
            return f"progress {progress!r} outside [0, 1]", None
        return None, {}

    def _report_checkpoint(self, path: str, body: Any) -> tuple[str | None, Any]:
        uuid = body["uuid"]
        folder = self.storage / uuid
        # Determined lists folders too, as "name/" of size 0 (storage.StorageManager._list_directory).
        on_disk = {
            p.relative_to(folder).as_posix() + ("/" if p.is_dir() else ""): str(0 if p.is_dir() else p.stat().st_size)
            for p in folder.rglob("*")
        }
        if on_disk != body.get("resources"):
            return f"checkpoint {uuid}: resources {body.get('resources')} are not the files in storage {on_disk}", None
        self.checkpoints[uuid] = body
        return None, {}

    def _get_checkpoint(self, path: str, body: Any) -> tuple[str | None, Any]:
        uuid = path.rsplit("/", 1)[1]
        reported = self.checkpoints.get(uuid)
        if reported is None:
            return f"checkpoint {uuid} was never reported", None
        checkpoint = {
            **reported,
            "state": "STATE_COMPLETED",
            "reportTime": "2026-01-01T00:00:00Z",
            "training": {"trialId": 1, "experimentId": 1},
        }
        return None, {"checkpoint": checkpoint}

    def _best(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {"metric": self.best if self.best is not None else 0.0}

    def _trial(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {"trial": {"id": 1, "experimentId": 1, "latestValidation": None, "state": self.trial_state()}}

    def trial_state(self) -> str:
        stop = self.stop_after_validations
        validated = len(self.metrics("validation"))
        return "STATE_STOPPING_COMPLETED" if stop is not None and validated >= stop else "STATE_ACTIVE"

    def _context_directory(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {"b64Tgz": context_tgz(CONTEXT_DIR)}

    def _ok(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {}

    def _metadata(self, path: str, body: Any) -> tuple[str | None, Any]:
        return None, {"metadata": (body or {}).get("metadata", {})}


ROUTES = {
    ("POST", "/api/v1/runs/start"): TestMaster._run_start,
    ("POST", "/api/v1/trials/ID/metrics"): TestMaster._metrics,
    ("POST", "/api/v1/trials/ID/progress"): TestMaster._progress,
    ("POST", "/api/v1/trials/ID/runner/metadata"): TestMaster._ok,
    ("GET", "/api/v1/trials/ID"): TestMaster._trial,
    ("PATCH", "/api/v1/trials/ID"): TestMaster._ok,
    ("POST", "/api/v1/trials/ID/early_exit"): TestMaster._ok,
    ("POST", "/api/v1/checkpoints"): TestMaster._report_checkpoint,
    ("PATCH", "/api/v1/checkpoints"): TestMaster._ok,
    ("GET", "/api/v1/experiments/ID/searcher/best_searcher_validation_metric"): TestMaster._best,
    ("POST", "/api/v1/runs/ID/metadata"): TestMaster._metadata,
    ("GET", "/api/v1/runs/ID/metadata"): TestMaster._metadata,
    ("POST", "/api/v1/trial-source-info"): TestMaster._ok,
    ("POST", "/task-logs"): TestMaster._ok,
    ("POST", "/api/v1/webhooks/custom"): TestMaster._ok,
    ("GET", "/api/v1/tasks/1.test-task/context_directory"): TestMaster._context_directory,
}

CONTEXT_DIR = Path(__file__).resolve().parent.parent / "model_def"


def context_tgz(context: Path) -> str:
    """The context directory as ``det experiment create`` uploads it: ``.detignore`` applied."""
    import base64
    import io
    import shutil
    import tarfile
    import tempfile

    from determined.common.detignore import make_shutil_ignore

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "context"
        shutil.copytree(context, copy, ignore=make_shutil_ignore(context))
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for item in sorted(copy.iterdir()):
                tar.add(item, arcname=item.name)
    return base64.b64encode(buffer.getvalue()).decode()


# The files Determined's container entrypoint writes and det.get_cluster_info() reads (harness/determined/_info.py).
INFO_DIR = Path("/run/determined/info")


def trial_env(
    master: TestMaster,
    exp_conf: dict[str, Any],
    hparams: dict[str, Any],
    slots: int = 1,
    seed: int = 777,
    latest_checkpoint: str | None = None,
    steps_completed: int = 0,
) -> dict[str, str]:
    """The environment a Determined agent gives a trial container (``_info.py``, ``prep_container.py``)."""
    master.slots = slots
    env = {
        "DET_MASTER": master.url,
        "DET_CLUSTER_ID": "test-cluster",
        "DET_AGENT_ID": "test-agent",
        "DET_SLOT_IDS": json.dumps(list(range(slots))),
        "DET_TASK_ID": "1.test-task",
        "DET_ALLOCATION_ID": "1.test-task.1",
        "DET_SESSION_TOKEN": "test-token",
        "DET_USER": "determined",
        "DET_TASK_TYPE": "TRIAL",
        "DET_RESOURCES_ID": "test-resources",
        "DET_RESOURCES_TYPE": "docker-container",
        "DET_TRIAL_ID": "1",
        "DET_EXPERIMENT_ID": "1",
        "DET_TRIAL_RUN_ID": "1",
        "DET_TRIAL_SEED": str(seed),
        "DET_HPARAMS": json.dumps(hparams),
        "DET_EXPERIMENT_CONFIG": json.dumps(exp_conf),
        "DET_STEPS_COMPLETED": str(steps_completed),
        "C10D_PORT": str(free_port()),
    }
    if latest_checkpoint:
        env["DET_LATEST_CHECKPOINT"] = latest_checkpoint
    return env


def full_config(exp: dict[str, Any], storage: Path, slots: int) -> dict[str, Any]:
    """The experiment config as the master hands it to a trial: the user's, with the defaults it fills in."""
    return {
        "name": "test",
        "max_restarts": 0,
        "reproducibility": {"experiment_seed": 777},
        "checkpoint_storage": {
            "type": "directory",
            "container_path": str(storage),
            "save_experiment_best": 0,
            "save_trial_best": 1,
            "save_trial_latest": 1,
        },
        "environment": {},
        "optimizations": {},
        "profiling": {"enabled": False},
        "debug": False,
        **exp,
        "resources": {"slots_per_trial": slots},
    }


def clear_info() -> None:
    for name in ("cluster.json", "trial.json", "rendezvous.json", "resources.json"):
        (INFO_DIR / name).unlink(missing_ok=True)


def prepare_container(env: dict[str, str], python: str, workdir: Path) -> None:
    """What the container entrypoint runs first: the info files, the rendezvous with the master, and
    the context directory downloaded into the working directory (and /run/determined/train/model)."""
    import shutil
    import subprocess

    clear_info()
    INFO_DIR.mkdir(parents=True, exist_ok=True)
    shutil.rmtree("/run/determined/train/model", ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [python, "-m", "determined.exec.prep_container", "--rendezvous", "--resources", "--download_context_directory"],
        env={**os.environ, **env},
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
