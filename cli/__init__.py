"""Entry points: thin wirings of library functions, installed as the llm4gen-* console scripts."""
