"""Multi-step pipelines over data rows (issue 32): each row flows through a graph of prompt steps, one step's answer
feeding the next. This first part is the pipeline file and its checks (``spec``, ``inferpool pipeline validate``);
running pipelines is not built yet."""

from inferpool.pipelines.spec import Pipeline, PipelineStep, load_pipeline

__all__ = ["Pipeline", "PipelineStep", "load_pipeline"]
