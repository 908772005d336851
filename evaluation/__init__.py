"""Evaluation: prompt sets, fixed-seed generation and scorers (T2I-CompBench BLIP-VQA, CLIPScore, FID,
the shapes analyzer). ``evaluate.py`` is the command; ``evaluation.runner`` does the work."""
