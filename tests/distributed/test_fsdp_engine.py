"""FSDP2 train engine: streaming equals full batch; 2 train ranks equal 1 (gloo, fork); rows that
share a prompt, packed to read it once, equal the same rows packed one by one."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from asyncflow.algorithms import policy_loss, sequence_weights
from asyncflow.engines.fsdp_engine import FSDPTrainEngine, OptimConfig
from asyncflow.engines.sequences import SharedPromptBatch, pack, pack_shared
from asyncflow.models import ModelConfig, build_model, save_pretrained

from ._mp import run_ranks

NUM_ROWS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    cfg = ModelConfig.from_hf_dict(
        dict(
            architectures=["Qwen2ForCausalLM"],
            vocab_size=24,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=64,
        )
    )
    model = build_model(cfg)
    model.init_weights(seed=3)
    save_pretrained(model, tmp / "model")
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(NUM_ROWS):
        P, R = (
            torch.randint(2, 7, (1,), generator=g).item(),
            torch.randint(1, 8, (1,), generator=g).item(),
        )
        rows.append(
            dict(
                prompt=torch.randint(0, 24, (P,), generator=g),
                response=torch.randint(0, 24, (R,), generator=g),
                advantage=torch.randn((), generator=g),
                noise=0.1 * torch.randn(R, generator=g),
            )
        )
    return tmp, rows


def _train_one_step(rank, world, tmp, rows, micro_batch, aggregation, out_name, packer=pack):
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    eng = FSDPTrainEngine(
        str(tmp / "model"), mesh, OptimConfig(lr=1.0, warmup_steps=0, max_grad_norm=1e9)
    )
    # SGD with lr 1: the weight change IS the normalised gradient, so comparing weights after the
    # real step() path compares gradients (AdamW's first step ~ lr*sign(g) would amplify noise).
    eng.optimizer = torch.optim.SGD(eng.model.parameters(), lr=1.0)
    eng.scheduler = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, lambda s: 1.0)
    mine = rows[rank::world]  # this rank's shard of the step's rows
    normaliser, loss_sum = 0.0, 0.0
    for i in range(0, len(mine), micro_batch):
        mb = mine[i : i + micro_batch]
        batch = packer([r["prompt"] for r in mb], [r["response"] for r in mb])
        assert packer is pack or isinstance(batch, SharedPromptBatch)
        # behaviour log-probs: the current policy's, perturbed (as if from a slightly other engine)
        lp_now = batch.gather_response(eng.logprobs(batch))
        behaviour_BT = batch.scatter_response([lp + r["noise"] for lp, r in zip(lp_now, mb, strict=True)])
        weights_BT = sequence_weights(batch.response_mask_BT, aggregation)
        adv_B = torch.stack([r["advantage"] for r in mb])
        stats = eng.forward_backward(
            batch, lambda lp, b=behaviour_BT, a=adv_B, w=weights_BT: policy_loss(lp, b, a, w)
        )
        loss_sum += stats["loss/sum"]
        normaliser += batch.num_response_tokens if aggregation == "token-mean" else len(mb)
    metrics = eng.step(normaliser)
    full = {n: t.clone() for n, t in eng.full_weights()}
    total_loss = torch.tensor([loss_sum])
    dist.all_reduce(total_loss)
    if rank == 0:
        torch.save(
            {
                "params": full,
                "loss": total_loss.item() / metrics["optim/normaliser"],
                "grad_norm": metrics["optim/grad_norm"],
                "version": eng.policy_version,
            },
            tmp / out_name,
        )


def _kw(tmp, rows, micro_batch, aggregation, out_name, packer=pack):
    return dict(tmp=tmp, rows=rows, micro_batch=micro_batch, aggregation=aggregation,
                out_name=out_name, packer=packer)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean"])
def test_streaming_and_two_ranks_equal_full_batch(setup, aggregation):
    tmp, rows = setup
    run_ranks(_train_one_step, 1, **_kw(tmp, rows, NUM_ROWS, aggregation, "full.pt"))
    run_ranks(_train_one_step, 1, **_kw(tmp, rows, 1, aggregation, "stream.pt"))
    run_ranks(_train_one_step, 2, **_kw(tmp, rows, 2, aggregation, "fsdp2.pt"))
    full, stream, fsdp2 = (torch.load(tmp / n) for n in ("full.pt", "stream.pt", "fsdp2.pt"))
    assert full["version"] == 1
    _assert_same_step(full, ((stream, 1e-6), (fsdp2, 1e-5)))


def _assert_same_step(full, others):
    for other, tol in others:
        assert abs(other["loss"] - full["loss"]) <= tol * max(1.0, abs(full["loss"]))
        assert abs(other["grad_norm"] - full["grad_norm"]) <= tol * max(1.0, full["grad_norm"])
        for name, p in full["params"].items():
            diff = (other["params"][name] - p).abs().max().item()
            assert diff <= tol, f"{name}: {diff}"
    assert full["grad_norm"] > 1e-3 and full["loss"] != 0


def test_rows_sharing_a_prompt_train_as_rows_packed_one_by_one(setup):
    """Every other row repeats row 0's or row 1's prompt, so each micro-batch of a rank shares one:
    `pack_shared` (one and two ranks, FSDP2 for two) against `pack` on one rank."""
    tmp, rows = setup
    rows = [dict(r, prompt=rows[i % 2]["prompt"]) for i, r in enumerate(rows)]
    run_ranks(_train_one_step, 1, **_kw(tmp, rows, NUM_ROWS, "token-mean", "full_rows.pt"))
    run_ranks(_train_one_step, 1, **_kw(tmp, rows, NUM_ROWS, "token-mean", "shared.pt",
                                        pack_shared))
    run_ranks(_train_one_step, 2, **_kw(tmp, rows, 2, "token-mean", "shared2.pt", pack_shared))
    full, shared, shared2 = (torch.load(tmp / n) for n in ("full_rows.pt", "shared.pt",
                                                           "shared2.pt"))
    _assert_same_step(full, ((shared, 1e-6), (shared2, 1e-5)))


def _nonfinite_steps(rank, world, tmp, rows, out_name):
    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    eng = FSDPTrainEngine(str(tmp / "model"), mesh,
                          OptimConfig(lr=1e-2, warmup_steps=0, max_nonfinite_steps=2))
    batch = pack([rows[rank]["prompt"]], [rows[rank]["response"]])
    before = {n: t.clone() for n, t in eng.full_weights()}
    log = []
    # rank 1 alone produces NaN: the global grad norm makes every rank skip the same step
    poison = [False, True, False, True, True]
    for bad in poison:
        eng.forward_backward(batch, lambda lp, bad=bad: (
            lp.sum() * (float("nan") if bad and rank == world - 1 else 1.0), {}))
        try:
            m = eng.step(1.0)
            log.append((m["optim/skipped"], m["alarm/nonfinite_streak"], eng.policy_version))
        except FloatingPointError as e:
            log.append(str(e))
        if len(log) == 2:  # after one good and one skipped step: the skip left weights alone
            after_good = {n: t.clone() for n, t in eng.full_weights()}
        if len(log) == 1:
            first = {n: t.clone() for n, t in eng.full_weights()}
    if rank == 0:
        same = all(first[n].equal(after_good[n]) for n in first)
        moved = any(not before[n].equal(first[n]) for n in first)
        torch.save({"log": log, "skip_kept_weights": same, "good_step_moved": moved},
                   tmp / out_name)


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_when_repeated(setup):
    tmp, rows = setup
    run_ranks(_nonfinite_steps, 2, tmp=tmp, rows=rows, out_name="nonfinite.pt")
    out = torch.load(tmp / "nonfinite.pt")
    log = out["log"]
    assert log[0] == (0.0, 0, 1)  # good step
    assert log[1] == (1.0, 1, 2)  # skipped, yet the version moves on (one version per step)
    assert log[2] == (0.0, 0, 3)  # a good step resets the streak
    assert log[3] == (1.0, 1, 4)
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in log[4]
    assert out["skip_kept_weights"] and out["good_step_moved"]


def _resume_unfused_checkpoint(rank, world, tmp, rows):
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from asyncflow.checkpoint import CheckpointConfig, Checkpointer

    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    old = FSDPTrainEngine(str(tmp / "model"), mesh, OptimConfig(warmup_steps=0))
    for g in old.optimizer.param_groups:  # as written before AdamW was fused
        g["fused"] = None
    mine = rows[rank::world]
    batch = pack([r["prompt"] for r in mine], [r["response"] for r in mine])
    old.forward_backward(batch, lambda lp: ((-lp * batch.response_mask_BT).sum(), {}))
    old.step(batch.num_response_tokens)
    path = tmp / "unfused_ckpt"
    model_sd, optim_sd = get_state_dict(old.model, old.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "train"))
    if rank == 0:
        (path / "meta.json").write_text(json.dumps({
            "step": 1, "scheduler": old.scheduler.state_dict(), "nonfinite_streak": 0}))
    dist.barrier()
    new = FSDPTrainEngine(str(tmp / "model"), mesh, OptimConfig(warmup_steps=0))
    Checkpointer(tmp / "ckpts", CheckpointConfig(), dist.group.WORLD, rank).load(path, new)
    if rank == 0:
        torch.save({"fused": [g["fused"] for g in new.optimizer.param_groups],
                    "state": len(new.optimizer.state), "version": new.policy_version},
                   tmp / "resumed_unfused.pt")


def test_a_checkpoint_of_an_unfused_optimizer_resumes_fused(setup):
    tmp, rows = setup
    run_ranks(_resume_unfused_checkpoint, 2, tmp=tmp, rows=rows)
    out = torch.load(tmp / "resumed_unfused.pt")
    assert out["fused"] and all(out["fused"])
    assert out["state"] > 0 and out["version"] == 1  # the state itself was restored
