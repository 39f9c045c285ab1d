"""Tensor, sequence and pipeline parallelism, and compilation, applied from outside pipeline/model.py.

    groups.py   process groups and the `mpu` DeepSpeed takes (ParallelState)
    ulysses.py  apply_sp: DeepSpeed-Ulysses sequence parallelism (parallel.sp)
    compile.py  apply_compile: torch.compile of each transformer block (train.compile)
    layers.py   column/row-parallel linears, vocab-parallel embedding and cross-entropy
    random.py   the RNG rule for dropout under tensor parallelism
    tp.py       apply_tp, and the state-dict rules: shard_for_tp, merge_tp_shards, strip_vocab_padding
    pipe.py     the PipelineModule cut, and pipe_layer_to_names (checkpoint layer files → our names)

For checkpoint conversion (no GPU, no process group needed):
    merge_tp_shards([sd_tp0, sd_tp1, ...], cfg) -> full state dict (vocab padded for that tp)
    shard_for_tp(full_sd, cfg, tp_rank, tp)     -> that rank's state dict (input vocab padded or not)
    strip_vocab_padding(sd, cfg)                -> embed_tokens/lm_head cut to model.vocab_size rows
    pipe_layer_to_names(cfg)                    -> {layer index: {key in layer_XX file: our name}}
    pipe_state_to_model(layer, sd, cfg)         -> one layer file's state dict under our names
"""
from .pipe import pipe_layer_to_names, pipe_state_to_model
from .tp import merge_tp_shards, padded_vocab, shard_for_tp, split_dim, strip_vocab_padding

__all__ = ["merge_tp_shards", "shard_for_tp", "strip_vocab_padding", "padded_vocab", "split_dim",
           "pipe_layer_to_names", "pipe_state_to_model"]
