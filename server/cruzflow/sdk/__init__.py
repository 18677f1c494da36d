"""The authoring API: what workflow code is written against.

It imports nothing of the server (no grpc, no database driver, no engine):
``WorkflowStep`` hands each step to a ``StepRuntime`` that the engine
implements. Authors import it through ``cruzflow.workflows``.
"""
