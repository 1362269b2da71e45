"""Where the DPO side keeps things (`DpoStorage`): run folders, the tiny base models, reports, trackers' stores."""

import sys
from pathlib import Path

import dagster as dg
from pydantic import Field

from prism_assets.training import tiny_model
from prism_assets.training.settings import TrainingSettings


class DpoStorage(dg.ConfigurableResource):
    """Where DPO runs, base models and reports live, and the interpreter that runs the jobs."""

    models_dir: str = Field(default="storage/models", description="where the tiny base models are built")
    runs_dir: str = Field(default="storage/runs", description="run folders, <runs_dir>/<run id>/seed<seed>/")
    reports_dir: str = Field(default="storage/reports", description="the report's files (tables, plots)")
    python: str = Field(
        default=sys.executable,
        description="the interpreter that runs the trainer (on the cluster for "
        "SLURM: a venv where this project is installed)",
    )

    def resolved_tracking(self, settings: TrainingSettings) -> dict[str, str]:
        """Where a run's trackers write (`report_to`), absolute: the settings' tracking_dir and mlflow_tracking_uri,
        or beside the runs: <storage>/tracking/tensorboard and sqlite:///<storage>/tracking/mlflow.db."""
        root = Path(self.runs_dir).resolve().parent / "tracking"
        tensorboard = Path(settings.tracking_dir).resolve() if settings.tracking_dir else root / "tensorboard"
        return {
            "tracking_dir": str(tensorboard),
            "mlflow_tracking_uri": settings.mlflow_tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
        }

    def resolved_base_model(self, base_model: str) -> str:
        """A tiny model's name built to its directory; any other model as named."""
        layers = tiny_model.tiny_layers(base_model)
        if layers is None:
            return base_model
        return str(
            tiny_model.build_tiny_qwen2(
                tiny_model.tiny_model_dir(self.models_dir, base_model), layers=layers
            ).resolve()
        )
