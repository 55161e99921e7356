"""References: the ids a write names besides the resource it acts on, and what each one needs.

A route row says which id a request acts on. Many writes name other things too: the logged
models a run outputs, the traces linked to a run, the run a model version comes from, a parent
run in a tag, the prompts linked to a trace, the spans of an OTLP export (each one's trace may
already exist elsewhere). Each of those is authorized like the row's own id: resolved to its
policy resource (``experiment:NAME`` / ``model:NAME``) and decided for the action the link
implies. Reading something into one's own resource needs ``read`` there; writing onto it (a
metric on a logged model, an output link that claims a model, spans appended to a trace, a prompt
listed in an experiment) needs ``update``. An id MLflow does not know is refused like a
forbidden one, except a trace id being created (StartTraceV3, OTLP): that one is new.

The table is data, keyed by method and route path without its ``/api`` or ``/ajax-api`` prefix;
each entry says where MLflow reads the value (a body path in either protobuf JSON spelling, or a
tag of a given key), what it names and the action. What the audit found and left alone is in
``LEFT``, each with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from guard.authz import otlp
from guard.authz.identifiers import Unresolved, describe
from guard.authz.resolve import Resolver
from guard.authz.routes import Route
from guard.edge.requestdata import (
    RequestData,
    RequestDataError,
    canonical_experiment_id,
    member,
)
from guard.errors import Refusal

# What a referenced value names, and the policy kind that governs it.
TARGET_KIND: Final = {
    "run": "experiment",
    "logged_model": "experiment",
    "trace": "experiment",
    "new_trace": "experiment",  # a trace id that may be new; if it exists, its experiment
    "experiment": "experiment",
    "prompt": "model",  # prompts are registered models
}
PARENT_RUN: Final = "mlflow.parentRunId"
LINKED_PROMPTS: Final = "mlflow.linkedPrompts"  # JSON [{"name": ..., "version": ...}]
SOURCE_RUN: Final = "mlflow.sourceRun"  # trace metadata
TRACE_MODEL: Final = "mlflow.modelId"  # trace metadata
PROMPT_RUNS: Final = "mlflow.prompt.associatedRunIds"  # comma-separated run ids
PROMPT_EXPERIMENTS: Final = "_mlflow_experiment_ids"  # ",1,2,": the experiments listing a prompt


@dataclass(frozen=True, slots=True)
class Ref:
    """One place a request names something.

    ``path`` is a body path (``models[].model_id``; ``[]`` a list, ``{}`` a JSON object used as
    a protobuf map); with ``tag`` it leads to tags instead: a list of ``{key, value}`` (path
    ``tags[]``), a map (``...tags{}``), or, with an empty path, the body's own ``key``/``value``
    (the set-tag routes). ``form`` says how a value is read: one id, a comma-separated list, the
    JSON list of prompt versions, or the OTLP body itself.
    """

    path: str
    target: str
    action: str
    tag: str | None = None
    form: str = "id"  # id | list | prompts | otlp


def _tags(path: str, key: str, target: str, action: str = "read", form: str = "id") -> Ref:
    return Ref(path, target, action, key, form)


_RUN_TAGS: Final = (
    _tags("tags[]", PARENT_RUN, "run"),
    _tags("tags[]", LINKED_PROMPTS, "prompt", form="prompts"),
)
_TRACE_V2: Final = (
    _tags("request_metadata[]", SOURCE_RUN, "run"),
    _tags("request_metadata[]", TRACE_MODEL, "logged_model"),
    _tags("tags[]", LINKED_PROMPTS, "prompt", form="prompts"),
)
_SET_TRACE_TAG: Final = (_tags("", LINKED_PROMPTS, "prompt", form="prompts"),)

REFERENCES: Final[dict[tuple[str, str], tuple[Ref, ...]]] = {
    # Runs: a parent run and linked prompts in tags; logged models in metrics, inputs, outputs.
    ("POST", "/2.0/mlflow/runs/create"): (_RUN_TAGS[0],),
    ("POST", "/2.0/mlflow/runs/create-promptlab-run"): (_RUN_TAGS[0],),
    ("POST", "/2.0/mlflow/runs/set-tag"): (
        _tags("", PARENT_RUN, "run"),
        _tags("", LINKED_PROMPTS, "prompt", form="prompts"),
    ),
    ("POST", "/2.0/mlflow/runs/log-batch"): (
        *_RUN_TAGS,
        Ref("metrics[].model_id", "logged_model", "update"),  # the metric is the model's too
    ),
    ("POST", "/2.0/mlflow/runs/log-metric"): (Ref("model_id", "logged_model", "update"),),
    ("POST", "/2.0/mlflow/runs/log-inputs"): (Ref("models[].model_id", "logged_model", "read"),),
    ("POST", "/2.0/mlflow/runs/outputs"): (Ref("models[].model_id", "logged_model", "update"),),
    # Logged models: the run they come from; linked prompts.
    ("POST", "/2.0/mlflow/logged-models"): (
        Ref("source_run_id", "run", "read"),
        _tags("tags[]", LINKED_PROMPTS, "prompt", form="prompts"),
    ),
    ("PATCH", "/2.0/mlflow/logged-models/<model_id>/tags"): (
        _tags("tags[]", LINKED_PROMPTS, "prompt", form="prompts"),
    ),
    # Registry: where a version comes from (its `source` address is checked by authorization's
    # artifact-source check); the runs and experiments a prompt is linked to.
    ("POST", "/2.0/mlflow/model-versions/create"): (
        Ref("run_id", "run", "read"),
        Ref("model_id", "logged_model", "read"),
        _tags("tags[]", PROMPT_RUNS, "run", form="list"),
    ),
    ("POST", "/2.0/mlflow/model-versions/set-tag"): (_tags("", PROMPT_RUNS, "run", form="list"),),
    ("POST", "/2.0/mlflow/registered-models/create"): (
        _tags("tags[]", PROMPT_EXPERIMENTS, "experiment", "update", form="list"),
    ),
    ("POST", "/2.0/mlflow/registered-models/set-tag"): (
        _tags("", PROMPT_EXPERIMENTS, "experiment", "update", form="list"),
    ),
    # Traces: links to runs and prompts; the run and logged model a trace says it came from.
    ("POST", "/2.0/mlflow/traces/link-to-run"): (Ref("trace_ids[]", "trace", "read"),),
    ("POST", "/2.0/mlflow/traces/link-prompts"): (Ref("prompt_versions[].name", "prompt", "read"),),
    ("POST", "/2.0/mlflow/traces"): _TRACE_V2,
    ("PATCH", "/2.0/mlflow/traces/<request_id>"): _TRACE_V2,
    ("PATCH", "/2.0/mlflow/traces/<request_id>/tags"): _SET_TRACE_TAG,
    ("PATCH", "/3.0/mlflow/traces/<trace_id>/tags"): _SET_TRACE_TAG,
    ("POST", "/3.0/mlflow/traces"): (
        # MLflow merges a StartTraceV3 into an existing trace of that id, moving it into the
        # new experiment: an existing trace must be one the caller may update.
        Ref("trace.trace_info.trace_id", "new_trace", "update"),
        _tags("trace.trace_info.trace_metadata{}", SOURCE_RUN, "run"),
        _tags("trace.trace_info.trace_metadata{}", TRACE_MODEL, "logged_model"),
        _tags("trace.trace_info.tags{}", LINKED_PROMPTS, "prompt", form="prompts"),
    ),
    # OTLP: spans are appended to the trace of their trace id, wherever it lives.
    ("POST", "/v1/traces"): (Ref("", "new_trace", "update", form="otlp"),),
    # Issues: the run an issue was found in.
    ("POST", "/3.0/mlflow/issues"): (Ref("source_run_id", "run", "read"),),
}

# Found in the audit and deliberately not checked here (field: why).
LEFT: Final = {
    "runs/log-batch metrics[].run_id": "ignored: MLflow logs every metric to the body's run_id",
    "runs/log-model model_json.run_id": "metadata inside the run's own history tag; not read",
    "runs/log-inputs datasets[].dataset.source": "a free-form description, never dereferenced",
    "datasets/create source, datasets/<id>/records records[].source": "free-form descriptions",
    "model-versions/create source": "checked by authorization's artifact-source check",
    "model-versions/create run_link": "a URL shown in the UI; MLflow never follows it",
    "experiments/create artifact_location": "checked by authorization's artifact-source check",
    "traces/<id>/assessments assessment.trace_id": "the path's trace id wins in MLflow",
    "assessments overrides, span_id": "MLflow requires them to be in the same trace",
    "review-queues schema_ids[], items item_ids[]": "MLflow requires the queue's experiment",
    "traces/delete-traces request_ids[]": "MLflow deletes only inside body:experiment_id",
    "traces/batchGet* experiment_ids[]": "narrows a read whose trace ids are all checked",
    "v3 traces spans[].links[].trace_id, OTLP span links": "span content, never dereferenced",
    "OTLP span attributes (mlflow.linkedPrompts, mlflow.traceTag.*)": "span content",
    "scorers serialized_scorer (judge model)": "names an AI-gateway endpoint; those are refused",
    "gateway, webhooks, jobs, prompt-optimization, invoke routes": "refused rows",
}


def route_key(route: Route) -> tuple[str, str]:
    """The table's key for a route row: its method and path without the API prefix."""
    return route.method, route.path.removeprefix("/ajax-api").removeprefix("/api")


def static_needs(route: Route) -> frozenset[tuple[str, str]]:
    """Every (policy kind, action) the route's references could need: a caller allowed all of
    them on every resource of the kind may skip the lookups."""
    return frozenset(
        (TARGET_KIND[r.target], r.action) for r in REFERENCES.get(route_key(route), ())
    )


@dataclass(frozen=True, slots=True)
class Reference:
    """One id a request names: how to say it, the action it needs, and how to resolve it."""

    label: str  # the caller's own words: "models[].model_id 'm-1'"
    action: str
    lookup: Callable[[], Awaitable[list[str]]]


def references(
    route: Route,
    data: RequestData,
    headers: Mapping[str, list[str]],
    resolver: Resolver,
    body: bytes = b"",
    max_body_size: int = 16 * 1024**2,
    max_ids: int | None = None,
) -> list[Reference]:
    """Every secondary id the request names, each once, in the order of the table; malformed
    values, and more than ``max_ids`` of them (``authz.max_ids_per_request``: each may cost a
    lookup in MLflow), are refused (``RequestDataError``) before anything is looked up."""
    found: dict[tuple[str, str, str], Reference] = {}
    for ref in REFERENCES.get(route_key(route), ()):
        if ref.form == "otlp":
            named = [("trace id", t) for t in otlp.trace_ids(body, headers, max_body_size)]
        elif data.from_query or data.body is None:
            continue
        else:
            named = _values(ref, data)
        for field, value in named:
            key = (ref.target, ref.action, value)
            if key not in found:
                found[key] = _reference(ref, field, value, resolver)
        if max_ids is not None and len(found) > max_ids:
            raise RequestDataError(Refusal("too_many_ids", f"The limit is {max_ids}."))
    return list(found.values())


def _reference(ref: Ref, field: str, value: str, resolver: Resolver) -> Reference:
    async def lookup() -> list[str]:
        return await _resolve(ref.target, field, value, resolver)

    return Reference(describe(field, [value]), ref.action, lookup)


async def _resolve(target: str, field: str, value: str, resolver: Resolver) -> list[str]:
    if target == "prompt":
        return [await resolver.model_resource(value)]
    if target == "experiment":
        return [await resolver.experiment_resource(canonical_experiment_id(value))]
    if target == "new_trace":
        experiment_id = await resolver.trace_experiment_if_known(value)
        return [] if experiment_id is None else [await resolver.experiment_resource(experiment_id)]
    lookup = {
        "run": resolver.run_experiment,
        "logged_model": resolver.logged_model_experiment,
        "trace": resolver.trace_experiment_if_known,  # None: no such trace, refused below
    }[target]
    experiment_id = await lookup(value)
    if experiment_id is None:
        raise Unresolved(Refusal("resource_unresolved", f"Unknown {field} {value!r}."))
    return [await resolver.experiment_resource(experiment_id)]


def _values(ref: Ref, data: RequestData) -> list[tuple[str, str]]:
    """(label, value) for every value ``ref`` names in the body."""
    if ref.tag is None:  # an empty string is protobuf's "unset": MLflow reads no id
        return [(ref.path, v) for v in _walk(data.body, ref.path) if _string(v, ref.path)]
    label = f"tag {ref.tag}"
    texts: list[str] = []
    if not ref.path:  # the set-tag routes: the body is one key/value pair
        key = data.single("key")
        if isinstance(key, str) and _same_key(key, ref.tag):
            texts.append(_string(data.single("value"), label))
    else:
        for container in _walk(data.body, ref.path):
            texts += _tag_values(container, ref, label)
    return [(label, value) for text in texts for value in _split(text, ref.form, label)]


def _tag_values(container: Any, ref: Ref, label: str) -> list[str]:
    assert ref.tag is not None  # noqa: S101 - only tag references get here
    if ref.path.endswith("{}"):  # a protobuf map: {key: value}
        return [_string(v, label) for k, v in container.items() if _same_key(k, ref.tag)]
    if not isinstance(container, dict):
        raise _malformed(f"Every {ref.path!r} element must be an object.")
    key = member(container, "key")
    if not isinstance(key, str) or not _same_key(key, ref.tag):
        return []
    return [_string(member(container, "value"), label)]


def _same_key(key: str, wanted: str) -> bool:
    # Where the database ignores case and trailing blanks (MySQL), so does a tag lookup.
    return key.rstrip(" ").lower() == wanted.lower()


def _split(text: str, form: str, label: str) -> list[str]:
    if form == "id":
        return [text] if text else []
    if form == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    try:  # prompts: [{"name": ..., "version": ...}, ...]
        versions = json.loads(text) if text.strip() else []
    except (ValueError, RecursionError):
        raise _malformed(f"{label} is not a JSON list of prompt versions.") from None
    if not isinstance(versions, list) or not all(
        isinstance(v, dict) and isinstance(v.get("name"), str) for v in versions
    ):
        raise _malformed(f"{label} is not a JSON list of prompt versions.")
    return [v["name"] for v in versions]


def _walk(body: Any, path: str) -> list[Any]:
    """Every node at ``path``, each step in either protobuf JSON spelling (both is ambiguous);
    absent or null means the request names nothing there. A step of the wrong type is refused:
    MLflow's parser would refuse it too, or read something else."""
    nodes: list[Any] = [body]
    for segment in path.split("."):
        name, is_list, is_map = (
            segment.strip("[]{}"),
            segment.endswith("[]"),
            segment.endswith("{}"),
        )
        found: list[Any] = []
        for node in nodes:
            if not isinstance(node, dict):
                raise _malformed(f"{path!r} does not lead through JSON objects.")
            value = member(node, name)
            if value is None:
                continue
            if is_list != isinstance(value, list) or (is_map and not isinstance(value, dict)):
                raise _malformed(f"{name!r} has the wrong type.")
            found.extend(value if is_list else [value])
        nodes = found
    return nodes


def _string(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{label} must be a string.")
    return value


def _malformed(message: str) -> RequestDataError:
    return RequestDataError(Refusal("invalid_request_body", message))
