"""How job-side code (the trainer, the reference precompute) reports: dagster-pipes when a launcher started it."""


class Reporter:
    """Progress and results through dagster-pipes when launched by Dagster, to stdout otherwise."""

    def __init__(self):
        from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

        launched_by_dagster = PipesEnvVarParamsLoader().is_dagster_pipes_process()
        self._pipes_cm = open_dagster_pipes() if launched_by_dagster else None
        self.pipes = self._pipes_cm.__enter__() if self._pipes_cm else None

    def info(self, message: str) -> None:
        if self.pipes:
            self.pipes.log.info(message)
        print(message, flush=True)

    def report(self, metadata: dict, data_version: str) -> None:
        if self.pipes:
            self.pipes.report_asset_materialization(metadata=metadata, data_version=data_version)

    def close(self, error: BaseException | None = None) -> None:
        if self._pipes_cm:
            self._pipes_cm.__exit__(type(error) if error else None, error, error.__traceback__ if error else None)
