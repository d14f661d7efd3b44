# Phase 2 of MELT's post-training (python train.py --phase=distill): the MELT student from
# the transition, the frozen LoopLM (teacher = 'out/loop', top of train.py) as teacher.
# These values replace those at the top of train.py; flags on the command line replace these.
init_from = 'out/transition'
max_iters = 1000
learning_rate = 5e-4
gate_lr = 5e-3
