"""A workflow runner that spares the sandbox a round trip per payload when nothing needs it.

The SDK converts every payload of every workflow activation and completion (inputs, results,
the summaries an operator reads in the Web UI) through a "command-aware" data converter, which
first asks the workflow instance for the payload's serialization context. Inside the sandbox that
question is a piece of code run in the sandbox's globals with its import restrictions applied:
measured, it was a fifth of the worker's CPU under load. The answer only matters to a converter,
codec or failure converter that reads it (``WithSerializationContext`` that returns a different
instance); ours do not (pydantic JSON, the AES-GCM codec with key ids in the payload metadata),
and with no external storage the store context is unused as well.

So this runner wraps the sandboxed one and answers both questions outside the sandbox: no
context (the SDK then uses the worker's converter as it is, which is what ``with_context`` would
have returned) and no store target. Everything else, the workflow code above all, still runs in
the sandbox. ``fits`` checks the converter the way the SDK does, so a converter that starts to read
the context (or external storage) turns this off by itself.
"""

from __future__ import annotations

from temporalio.bridge.proto.workflow_activation import WorkflowActivation
from temporalio.bridge.proto.workflow_completion import WorkflowActivationCompletion
from temporalio.converter import (
    ActivitySerializationContext,
    DataConverter,
    SerializationContext,
    StorageDriverStoreContext,
    WorkflowSerializationContext,
)
from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.workflow import Info, _Definition

_PROBES: tuple[SerializationContext, ...] = (
    WorkflowSerializationContext(namespace="probe", workflow_id="probe"),
    ActivitySerializationContext(namespace="probe", workflow_id="probe", workflow_type="probe",
                                 activity_type="probe", activity_task_queue="probe",
                                 activity_id="probe", is_local=False),
)


class ContextFreeRunner(WorkflowRunner):
    """Runs workflows in ``inner`` (the sandbox); answers the per-payload context questions
    itself. Only for a converter that ``fits``."""

    def __init__(self, inner: WorkflowRunner) -> None:
        self.inner = inner

    @staticmethod
    def fits(converter: DataConverter) -> bool:
        """True when no serialization context changes what ``converter`` does (the SDK's own
        rule: ``with_context`` returns the same instance) and it stores nothing externally."""
        return converter.external_storage is None and all(
            converter.with_context(probe) is converter for probe in _PROBES)

    def prepare_workflow(self, defn: _Definition) -> None:
        self.inner.prepare_workflow(defn)

    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _ContextFree(self.inner.create_instance(det))

    def set_worker_level_failure_exception_types(self, types: object) -> None:
        self.inner.set_worker_level_failure_exception_types(types)  # type: ignore[arg-type]


class _ContextFree(WorkflowInstance):
    def __init__(self, inner: WorkflowInstance) -> None:
        self.inner = inner

    def activate(self, act: WorkflowActivation) -> WorkflowActivationCompletion:
        return self.inner.activate(act)

    def get_serialization_context(self, command_info: object) -> SerializationContext | None:
        return None

    def get_external_store_context(self, command_info: object) -> StorageDriverStoreContext:
        return StorageDriverStoreContext(target=None)

    def get_info(self) -> Info:
        return self.inner.get_info()

    def get_thread_id(self) -> int | None:
        return self.inner.get_thread_id()
