"""Activation checkpointing recomputes each block in backward: same loss and gradients, bit for
bit on CPU, and the recomputation really happens (the blocks run twice)."""

import torch

from asyncflow.models import ModelConfig, build_model

CFG = dict(architectures=["Qwen2ForCausalLM"], vocab_size=32, hidden_size=32,
           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)


def _grads(checkpointing: bool):
    model = build_model(ModelConfig.from_hf_dict(CFG))
    model.init_weights(seed=0)
    model.model.activation_checkpointing = checkpointing
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1))
    loss = torch.log_softmax(model(ids), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    loss, grads, calls = _grads(False)
    loss_ckpt, grads_ckpt, calls_ckpt = _grads(True)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    assert (calls, calls_ckpt) == (1, 2)  # the block ran again in backward

