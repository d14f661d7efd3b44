# The LoopLM on Austen (and the 1-loop baseline, at loops = 1): Ouro's objective, since text has no hop counts.
max_iters = 1200
learning_rate = 3e-3
