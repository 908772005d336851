from llm4gen.adapters.cross_adapter import CrossAdapter, convert_released_state_dict

__all__ = ["CrossAdapter", "convert_released_state_dict"]
