"""The shared pieces of the DPO recipes (``recipes/``), each small and tested.

    losses.py        every preference loss, one short class each (DPO, IPO, SimPO, ...), the formula in its docstring
    logprobs.py      per-pair log-probs of a batch without the [N, L, V] logits
    reference.py     the reference, decided once per recipe: adapters off, frozen copy, precomputed cache, none
    settings.py      the recipes' shared config keys: parsed, defaulted and checked once
    metrics.py       what a step logs (TRL's names) and peak memory
    precision.py     fp32 master weights under bf16 compute (one device; FSDP2's policy), the lost-update guard
    samples.py       eval-time samples of policy and reference: text, true reward, KL
    distributed.py   what the FSDP2 recipes share: rank-0 work, rank slices, metric all-reduce, sharded loading
    data/            preference data: row formats, chat formats, the dataset builder, collators, batch order
    checkpointing/   HF-layout checkpoints written atomically, PEFT adapters, resume, the FSDP2 writer/reader
    models/          fixes and extensions of torchtune's model families (and the list of torchtune internals patched)
    tools/           plots, experiment sweeps, the reward/KL frontier
    tiny/            the tiny model, tokenizers and synthetic task that make everything run on a laptop CPU
"""
