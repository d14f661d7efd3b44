# Phase 2 on Austen: KL to the frozen LoopLM and attention alignment.
max_iters = 260
learning_rate = 5e-4
gate_lr = 5e-3
