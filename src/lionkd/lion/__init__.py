"""Lion adversarial distillation: the imitation / discrimination / generation loop.

Entry point: `lionkd.lion.loop.run_lion(cfg)`; the referee (`referee.py`) and the novelty filter
(`novelty.py`) are usable on their own.
"""
