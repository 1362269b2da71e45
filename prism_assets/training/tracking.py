"""The experiment trackers a DPO run reports to (`report_to`, as TRL's): TensorBoard and MLflow.

Owns the one interface of a tracker (`Tracker`: start with the run's settings and tags, log a curve row at its step,
log the summary metrics, finish), an implementation per tracker, and `Trackers`, those of one run, which records
their runs in the run directory (`tracking.json`) so that a resumed attempt continues them instead of starting others.

What a run reports: its settings (TensorBoard: hparams and text; MLflow: params), its tags (experiment, cell, split,
group, seed, run id, run directory), each curve row at its step (`train/<column>`, and where the held-out pairs were
evaluated `eval/<column>`) and its summary metrics, the numbers of metrics.json (MLflow: under their own names;
TensorBoard: `summary/<name>`), at the last step.

Every step is in each tracker once, whatever the attempts. A row is logged before the checkpoint that holds it is
written, so a resumed attempt's trackers hold every row up to the step it resumes at. TensorBoard's run is reopened
with purge_step just after that step: rows a stopped attempt logged past its checkpoint are dropped and logged again.
MLflow keeps every value it was given, so the resumed attempt logs only the steps its run lacks: a row a stopped
attempt logged past its checkpoint keeps that attempt's values, which the resumed attempt computes again (bit for bit
on CPU, to float noise on CUDA).

A tracker whose server cannot be reached fails the run before it loads anything (MLflow's client would retry for
minutes first). A tracker that cannot start, or fails while the run trains, fails the run with an error naming it, as
TRL's callbacks do: the run's checkpoints are kept, and a relaunch resumes from them into the same tracker runs. Job
side: imports no Dagster, and a tracker's package only where a run reports to it.
"""

import contextlib
import fcntl
import hashlib
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prism_assets.training.metrics import EVALUATED, HELDOUT_METRICS, SAMPLING_ERRORS
from prism_assets.training.run_folder import TRACKING_FILE, write_atomic
from prism_assets.training.settings import RunConfig

INSTALL = "pip install -e '.[trackers]'"
HELDOUT_COLUMNS = (*HELDOUT_METRICS, *SAMPLING_ERRORS)
LABEL_TAGS = ("experiment", "cell", "split", "group", "seed", "run_id")
Outcome = Literal["finished", "stopped", "failed"]
CONNECT_TIMEOUT_S = 5.0  # how long a tracking server has to accept a connection, its name resolved included


class TrackerError(RuntimeError):
    """A tracker the run reports to cannot be used; the run stops, naming it."""


def metric_name(column: str) -> str:
    """A curve column's name in the trackers: `train/loss`, `eval/heldout_acc`."""
    return f"eval/{column}" if column in HELDOUT_COLUMNS else f"train/{column}"


def curve_metrics(row: dict) -> dict[str, float]:
    """A curve row as metrics: the training columns, and the held-out ones where they were evaluated."""
    evaluated = row.get(EVALUATED, True)
    return {
        metric_name(column): float(value)
        for column, value in row.items()
        if column not in ("step", EVALUATED) and (evaluated or column not in HELDOUT_COLUMNS)
    }


def summary_numbers(summary: dict) -> dict[str, float]:
    """The numbers of a run's summary (metrics.json): what the trackers log as its summary metrics."""
    return {
        name: float(value)
        for name, value in summary.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """What a run is, as the trackers tag it: its label (experiment, cell, split, group, seed, run id; those it has)
    and its directory."""
    tags = {key: str(cfg.label[key]) for key in LABEL_TAGS if cfg.label.get(key) is not None}
    return {**tags, "seed": str(cfg.seed), "run_dir": str(Path(cfg.output_dir).resolve())}


def run_name(cfg: RunConfig) -> str:
    """`<experiment>-<cell>-seed<seed>` (of the label, what it has)."""
    return "-".join([*(str(cfg.label[k]) for k in ("experiment", "cell") if cfg.label.get(k)), f"seed{cfg.seed}"])


def run_settings(cfg: RunConfig) -> dict[str, Any]:
    """The run's settings as the trackers log them: every field of its config but the label (its tags)."""
    return {name: value for name, value in cfg.model_dump().items() if name != "label"}


def text_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text) or "_"


class Tracker(ABC):
    """One experiment tracker's run of a DPO run."""

    name: str
    where = ""  # what start opened, for the log

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def check(self) -> None:  # noqa: B027  # most trackers write to a local store: nothing to reach
        """Raise ConnectionError, naming where, if what the tracker writes to cannot be reached."""

    @abstractmethod
    def start(self, record: dict | None, rows: list[dict], step: int) -> dict:
        """Start the run's tracker run with its settings and tags, or continue the one an earlier attempt's start
        returned (`record`, None for none) from `step`, the step this attempt resumes at; log the rows so far
        (`rows`, the curve up to `step`) it lacks. Returns what a later attempt needs to continue it."""

    @abstractmethod
    def log(self, row: dict) -> None:
        """Log a curve row at its step."""

    @abstractmethod
    def summary(self, summary: dict) -> None:
        """Log the run's summary metrics (the contents of metrics.json) at its last step."""

    @abstractmethod
    def finish(self, outcome: Outcome) -> None:
        """Close the tracker run: the run finished, stopped to be resumed, or failed."""


class TensorBoardTracker(Tracker):
    """Event files in a directory per run, `<tracking_dir>/<experiment>/<cell>/seed<seed>-<run id>`, through torch's
    SummaryWriter; the settings and tags as hparams (the HParams dashboard compares runs by them) and as text."""

    name = "tensorboard"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class = SummaryWriter
        self.root = Path(cfg.tracking_dir or Path(cfg.output_dir) / "tracking" / "tensorboard").resolve()

    def _new_log_dir(self) -> Path:
        label = self.cfg.label
        run = str(label.get("run_id") or hashlib.sha256(str(Path(self.cfg.output_dir).resolve()).encode()).hexdigest())
        base = (
            self.root
            / _slug(str(label.get("experiment", "runs")))
            / _slug(str(label.get("cell", "runs")))
            / f"seed{self.cfg.seed}-{run[:8]}"
        )
        # A directory there is another training of the run (one retrained from scratch): its events stay its own.
        candidates = (base.with_name(f"{base.name}-{n}") if n > 1 else base for n in range(1, 10_000))
        return next(path for path in candidates if not path.exists())

    def start(self, record, rows, step):
        from torch.utils.tensorboard.summary import hparams

        earlier = record or {}
        continued = earlier.get("tracking_dir") == str(self.root) and Path(earlier.get("log_dir", "")).is_dir()
        if continued:
            log_dir = Path(earlier["log_dir"])
            # Every row up to `step` is there already; what an earlier attempt logged past it is dropped.
            self.writer = self._writer_class(str(log_dir), purge_step=step + 1)
        else:
            log_dir = self._new_log_dir()
            self.writer = self._writer_class(str(log_dir))
            tags, settings = run_tags(self.cfg), run_settings(self.cfg)
            values = {name: text_value(v) if isinstance(v, list | dict) else v for name, v in settings.items()}
            _, session_start, _ = hparams({k: v for k, v in {**values, **tags}.items() if v is not None}, {})
            self.writer.file_writer.add_summary(session_start)  # type: ignore[attr-defined]  # torch infers it as None
            self.writer.add_text("run/tags", _markdown(tags), 0)
            self.writer.add_text("run/settings", _markdown({k: text_value(v) for k, v in settings.items()}), 0)
            for row in rows:
                self.log(row)
        self.writer.flush()
        self.where = f"{'continuing ' if continued else ''}{log_dir}" + (f" from step {step}" if continued else "")
        return {"tracking_dir": str(self.root), "log_dir": str(log_dir)}

    def log(self, row):
        for name, value in curve_metrics(row).items():
            self.writer.add_scalar(name, value, row["step"])
        self.writer.flush()  # a row is on disk before the checkpoint that holds it

    def summary(self, summary):
        for name, value in summary_numbers(summary).items():
            self.writer.add_scalar(f"summary/{name}", value, self.cfg.max_steps)

    def finish(self, outcome):
        if outcome == "finished":
            from torch.utils.tensorboard.summary import hparams

            _, _, session_end = hparams({}, {})  # status: success
            self.writer.file_writer.add_summary(session_end)  # type: ignore[attr-defined]  # torch infers it as None
        self.writer.close()


class MlflowTracker(Tracker):
    """A run in `mlflow_experiment` of the store at `mlflow_tracking_uri` (a database, or a tracking server), through
    MlflowClient: named `<experiment>-<cell>-seed<seed>`, tagged, its settings as params, each row's metrics at its
    step, the summary metrics at the last step, and its status (FINISHED; KILLED while stopped to be resumed)."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
    PROBE = "train/loss"  # logged with every row: its history says which steps a run has

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        from mlflow import MlflowClient  # needs mlflow-skinny (or mlflow)
        from mlflow.entities import Metric, Param

        self._client_class, self._metric, self._param = MlflowClient, Metric, Param
        fallback = Path(cfg.output_dir).resolve() / "tracking" / "mlflow.db"
        self.uri = cfg.mlflow_tracking_uri or f"sqlite:///{fallback}"

    def check(self):
        parts = urllib.parse.urlsplit(self.uri)
        if parts.scheme not in ("http", "https"):  # a database: opened by start
            return
        if not parts.hostname:
            raise ConnectionError(f"the MLflow tracking URI {self.uri} names no host: fix mlflow_tracking_uri")
        target = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(parts.hostname):  # the client connects to the proxy instead
            proxied = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            target = proxied.hostname or "", proxied.port or 80
        problem = connect_problem(*target, CONNECT_TIMEOUT_S)
        if problem:
            raise ConnectionError(
                f"the MLflow tracking server at {self.uri} cannot be reached ({target[0]}:{target[1]}: {problem}): "
                "start it, or fix mlflow_tracking_uri (DPO_MLFLOW_TRACKING_URI)"
            )

    def start(self, record, rows, step):
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        with _database_lock(self.uri):  # creating the store's tables and the experiment: once, whoever comes first
            self.client = self._client_class(tracking_uri=self.uri)
            experiment_id = self._experiment_id()
            run = None
            if record and record.get("tracking_uri") == self.uri and record.get("experiment_id") == experiment_id:
                with contextlib.suppress(MlflowException):  # a run deleted since: a new one
                    found = self.client.get_run(record["run_id"])
                    run = found if found.info.lifecycle_stage == "active" else None
            tags = run_tags(self.cfg)
            if run is None:
                run = self.client.create_run(experiment_id, run_name=run_name(self.cfg), tags=tags)
        self.run_id = run.info.run_id
        continued = record is not None and record.get("run_id") == self.run_id
        if continued:
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)
        if not run.data.params:  # logged once: a resumed attempt may run with other paths or devices
            params = [
                self._param(name, text_value(value)[:MAX_PARAM_VAL_LENGTH])
                for name, value in run_settings(self.cfg).items()
            ]
            for first in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, params=params[first : first + MAX_PARAMS_TAGS_PER_BATCH])
        self.logged = {m.step for m in self.client.get_metric_history(self.run_id, self.PROBE)} if continued else set()
        for row in rows:
            self.log(row)
        self.where = (
            f"{'continuing ' if continued else ''}run {self.run_id} ({run.info.run_name}) of experiment "
            f"{self.cfg.mlflow_experiment!r} at {self.uri}"
        )
        return {"tracking_uri": self.uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.cfg.mlflow_experiment)
        if found is not None:
            return found.experiment_id
        artifacts = None
        if self.uri.startswith("sqlite:///"):  # beside the database, not wherever the first run's process was
            artifacts = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlflow-artifacts").as_uri()
        try:
            return self.client.create_experiment(self.cfg.mlflow_experiment, artifact_location=artifacts)
        except MlflowException:  # a server's: another run created it meanwhile
            found = self.client.get_experiment_by_name(self.cfg.mlflow_experiment)
            if found is None:
                raise
            return found.experiment_id

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])

    def log(self, row):
        if row["step"] in self.logged:  # an earlier attempt's: MLflow would keep both
            return
        self._log_metrics(curve_metrics(row), row["step"])  # one request: a step's metrics are all there or none
        self.logged.add(row["step"])

    def summary(self, summary):
        self._log_metrics(summary_numbers(summary), self.cfg.max_steps)
        for key in ("data_version", "attention_kernel"):
            if summary.get(key):
                self.client.set_tag(self.run_id, key, str(summary[key]))

    def finish(self, outcome):
        self.client.set_terminated(self.run_id, status=self.STATUS[outcome])


IMPLEMENTATIONS: dict[str, Callable[[RunConfig], Tracker]] = {  # one per name of settings.TRACKERS
    TensorBoardTracker.name: TensorBoardTracker,
    MlflowTracker.name: MlflowTracker,
}


def connect_problem(host: str, port: int, timeout_s: float) -> str | None:
    """Why `host:port` does not accept a TCP connection within `timeout_s`, or None where it does. The name is
    resolved in the same time (a resolver that gets no answer would take longer than the connection)."""
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    thread = threading.Thread(target=connect, daemon=True, name="tracker-connect")
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer in {timeout_s:.0f} s"
    error = outcome[0]
    return None if error is None else f"{type(error).__name__}: {error}"


class Trackers:
    """The trackers of one run, as its `report_to` names them (none: each method does nothing). Made before the run
    loads anything: a tracker whose package is missing, or whose server cannot be reached, is an error at once."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.trackers: list[Tracker] = []
        self.started: list[Tracker] = []  # those that started and have not failed
        self.done = False
        for name in cfg.report_to:
            try:
                self.trackers.append(IMPLEMENTATIONS[name](cfg))
            except ImportError as error:
                raise TrackerError(
                    f"report_to names {name}, but its package is not installed for {sys.executable} "
                    f"({error}): install the trackers extra ({INSTALL}), or leave {name} out of report_to"
                ) from None
        for tracker in self.trackers:
            try:
                tracker.check()
            except ConnectionError as error:
                raise TrackerError(f"report_to {tracker.name}: {error}") from None

    def start(self, rows: list[dict], step: int, log: Callable[[str], None]) -> None:
        """Start each tracker, or continue the run an earlier attempt of this run started (`rows`: the curve up to
        `step`, where this attempt starts), recording it in the run directory as soon as it has started."""
        if not self.trackers:
            return
        path = Path(self.cfg.output_dir) / TRACKING_FILE
        trajectory = hashlib.sha256(json.dumps(self.cfg.trajectory(), sort_keys=True).encode()).hexdigest()[:16]
        records = _read_records(path, log)
        if records.get("trajectory") != trajectory:  # an earlier run's, under other settings: nothing to continue
            records = {"trajectory": trajectory}
        for tracker in self.trackers:
            with self._failing(tracker, "start"):
                records[tracker.name] = tracker.start(records.get(tracker.name), rows, step)
            self.started.append(tracker)
            write_atomic(path, json.dumps(records, indent=2))
            log(f"report_to {tracker.name}: {tracker.where}")

    def log(self, row: dict) -> None:
        for tracker in list(self.started):
            with self._failing(tracker, f"logging step {row['step']}"):
                tracker.log(row)

    def summary(self, summary: dict) -> None:
        for tracker in list(self.started):
            with self._failing(tracker, "logging the summary"):
                tracker.summary(summary)

    def finish(self, outcome: Outcome) -> None:
        """Close every started tracker (once). A finished run whose tracker cannot close fails; a run that stopped
        (to be requeued) or failed closes each as far as it can, saying what could not be: its own exit (the requeue,
        its error) is what counts, and its next attempt reopens the tracker runs."""
        if self.done:
            return
        self.done = True
        for tracker in list(self.started):
            if outcome == "finished":
                with self._failing(tracker, "finishing"):
                    tracker.finish(outcome)
                continue
            try:
                tracker.finish(outcome)
            except Exception as error:
                print(f"report_to {tracker.name}: closing the {outcome} run failed: {error}", file=sys.stderr)

    @contextlib.contextmanager
    def _failing(self, tracker: Tracker, action: str) -> Iterator[None]:
        """A tracker's error as the run's, naming it; the tracker is not used again (nor closed: it may hang)."""
        try:
            yield
        except Exception as error:
            if tracker in self.started:
                self.started.remove(tracker)
            raise TrackerError(
                f"report_to {tracker.name}: {action} failed: {type(error).__name__}: {str(error)[:1000]}"
            ) from error


def _markdown(values: dict[str, str]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {str(v).replace('|', '/')} |\n" for k, v in values.items())


def _read_records(path: Path, log: Callable[[str], None]) -> dict:
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError) as error:
        log(f"{path} cannot be read ({error}): the trackers start new runs")
        return {}


@contextlib.contextmanager
def _database_lock(uri: str) -> Iterator[None]:
    """Held while a run opens an MLflow sqlite database (its directory made first): the runs trained at once create
    its tables and the experiment once, not each at the same time."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(f"{database.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
