"""The shapes world: scenes, their rendering, the caption grammar (llm4gen.shapes.world)."""
