# Phase 1 on Austen: alpha from 0 to 1 over the first 130 steps.
max_iters = 170
transition_iters = 130
learning_rate = 1e-3
