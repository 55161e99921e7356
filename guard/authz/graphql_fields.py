"""MLflow's GraphQL schema as the gateway reads it: the fields of ``Query`` and which ids in their
input name a resource, the nested fields with a resolver of their own, and every object-valued
field a selection may descend into (``guard.authz.graphql`` walks documents against them).

Data, not logic, like the route table: a test checks these tables against the installed MLflow
schema, so an upgrade cannot add a field silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Need:
    field: str  # "experiment_id" | "run_id" | "model_name" | "all:experiment" | "all:model"
    value: str  # the id or name; "" for the "all:*" kinds (read on every resource of that kind)


@dataclass(frozen=True, slots=True)
class RootField:
    """A field of MLflow's ``Query`` type: what it returns and which ids in ``input`` it reads."""

    returns: str  # the GraphQL type its selection is read as
    need: str  # the Need.field its ids become, or a fixed "all:*" need, or "" for none
    why: str
    ids: tuple[str, ...] = ()  # input fields naming it (two spellings must agree)
    many: bool = False  # the id field is a list ([String])
    inputs: frozenset[str] = frozenset()  # every field of its input type
    arguments: frozenset[str] = frozenset({"input"})


_RUN_INPUT: Final = frozenset({"runId", "runUuid"})

# field -> needs. Experiment ids are read as MLflow's store reads them (int(); "" is experiment 0).
ROOT_FIELDS: Final[dict[str, RootField]] = {
    "mlflowGetExperiment": RootField(
        "MlflowGetExperimentResponse", "experiment_id", "one experiment, by id",
        ids=("experimentId",), inputs=frozenset({"experimentId"}),
    ),
    "mlflowGetRun": RootField(
        "MlflowGetRunResponse", "run_id", "one run; MLflow reads runId, else runUuid",
        ids=("runId", "runUuid"), inputs=_RUN_INPUT,
    ),
    "mlflowListArtifacts": RootField(
        "MlflowListArtifactsResponse", "run_id", "the artifact listing of one run",
        ids=("runId", "runUuid"), inputs=_RUN_INPUT | {"path", "pageToken"},
    ),
    "mlflowGetMetricHistoryBulkInterval": RootField(
        "MlflowGetMetricHistoryBulkIntervalResponse", "run_id", "metrics of each listed run",
        ids=("runIds",), many=True,
        inputs=frozenset({"runIds", "metricKey", "startStep", "endStep", "maxResults"}),
    ),
    "mlflowSearchRuns": RootField(
        "MlflowSearchRunsResponse", "experiment_id", "runs of the listed experiments only",
        ids=("experimentIds",), many=True,
        inputs=frozenset(
            {"experimentIds", "filter", "runViewType", "maxResults", "orderBy", "pageToken"}
        ),
    ),
    "mlflowSearchModelVersions": RootField(
        "MlflowSearchModelVersionsResponse", "all:model", "a filter, not ids: any model's versions",
        inputs=frozenset({"filter", "maxResults", "orderBy", "pageToken"}),
    ),
    "test": RootField(
        "Test", "", "echoes its argument; reads nothing", arguments=frozenset({"inputString"})
    ),
}  # fmt: skip

# Nested fields with a resolver of their own: (type, field) -> the need it adds (None: none).
NESTED_FIELDS: Final[dict[tuple[str, str], tuple[Need | None, str]]] = {
    ("MlflowRunExtension", "modelVersions"): (
        Need("all:model", ""),
        "a search by run_id: versions of any registered model (filtered when `name` is selected)",
    ),
    ("MlflowRunExtension", "experiment"): (None, "the run's own experiment, read for the run"),
    ("MlflowMetricExtension", "value"): (None, "the metric's own value (NaN becomes null)"),
}

# Every object-valued field reachable from Query, by parent type; all other fields are leaves of
# the parent's own record. A selection set on any field not listed here is refused.
OBJECT_FIELDS: Final[dict[str, dict[str, str]]] = {
    "ApiError": {"errorDetails": "ErrorDetail"},
    "MlflowGetExperimentResponse": {"experiment": "MlflowExperiment", "apiError": "ApiError"},
    "MlflowExperiment": {"tags": "MlflowExperimentTag"},
    "MlflowGetMetricHistoryBulkIntervalResponse": {
        "metrics": "MlflowMetricWithRunId", "apiError": "ApiError",
    },
    "MlflowGetRunResponse": {"run": "MlflowRunExtension", "apiError": "ApiError"},
    "MlflowSearchRunsResponse": {"runs": "MlflowRunExtension", "apiError": "ApiError"},
    "MlflowRunExtension": {
        "info": "MlflowRunInfo", "data": "MlflowRunData", "inputs": "MlflowRunInputs",
        "outputs": "MlflowRunOutputs", "experiment": "MlflowExperiment",
        "modelVersions": "MlflowModelVersion",
    },
    "MlflowRunData": {
        "metrics": "MlflowMetricExtension", "params": "MlflowParam", "tags": "MlflowRunTag",
    },
    "MlflowRunInputs": {"datasetInputs": "MlflowDatasetInput", "modelInputs": "MlflowModelInput"},
    "MlflowDatasetInput": {"tags": "MlflowInputTag", "dataset": "MlflowDataset"},
    "MlflowRunOutputs": {"modelOutputs": "MlflowModelOutput"},
    "MlflowListArtifactsResponse": {"files": "MlflowFileInfo", "apiError": "ApiError"},
    "MlflowSearchModelVersionsResponse": {
        "modelVersions": "MlflowModelVersion", "apiError": "ApiError",
    },
    "MlflowModelVersion": {
        "tags": "MlflowModelVersionTag", "modelParams": "MlflowModelParam",
        "modelMetrics": "MlflowModelMetric",
        "deploymentJobState": "MlflowModelVersionDeploymentJobState",
    },
}  # fmt: skip
