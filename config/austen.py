# The main job on text: python train.py config/austen.py. Jane Austen's novels as characters
# (data/austen, made on first use), a 2-layer model looped 4 times; the three phases and a
# 1-loop baseline go to out/austen-loop, -transition, -distill and -base. What differs per
# phase is in config/austen/<phase>.py. These settings run in about 15 minutes on 2 CPU cores.
recipe = 'austen'
dataset = 'austen'
block_size = 64
batch_size = 32
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 96
n_hidden = 256
loops = 4
chunk_size = 4  # 16 chunks per row (the paper: 500 of 10,000 tokens); 16 here decodes 0.2 nats worse (README)
eval_interval = 200
eval_iters = 20
log_interval = 100
warmup_iters = 50
