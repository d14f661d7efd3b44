# Phase 1 of MELT's post-training (python train.py --phase=transition): MELT from the
# LoopLM's weights and new gates, alpha 0 -> 1 over transition_iters. These values replace
# those at the top of train.py; flags on the command line replace these.
init_from = 'out/loop'
max_iters = 400
learning_rate = 1e-3
