from llm4gen.pipelines.llm4gen_pipeline import LLM4GenPipeline, LLM4GenXLPipeline, load_pipeline, pipeline_from_module

__all__ = ["LLM4GenPipeline", "LLM4GenXLPipeline", "load_pipeline", "pipeline_from_module"]
