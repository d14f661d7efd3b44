# Phase 1 on Austen: alpha from 0 to 1 over the first 150 steps.
max_iters = 200
transition_iters = 150
learning_rate = 1e-3
