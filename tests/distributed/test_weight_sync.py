"""Weight sync strategies move every tensor bit-exactly and refuse a mismatched model."""

import pytest
import torch
import torch.distributed as dist

from asyncflow.launch import PlacementConfig, build_meshes
from asyncflow.models import ModelConfig, build_model
from asyncflow.weights import WeightSyncConfig, build_weight_sync, iter_state, weight_specs

from ._mp import run_ranks

CFG = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=24,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


class RecordingEngine:
    def __init__(self):
        self.staged, self.committed = {}, []

    def load_weights(self, named):
        for n, t in named:
            self.staged[n] = t.clone()

    def commit_weights(self, version):
        self.committed.append(version)


def _sync(rank, world, kind, tmp, hidden_on_receiver):
    model = build_model(ModelConfig.from_hf_dict(CFG))
    model.init_weights(seed=rank)  # the receiver starts from other weights
    if rank == 1 and hidden_on_receiver != CFG["hidden_size"]:
        model = build_model(ModelConfig.from_hf_dict({**CFG, "hidden_size": hidden_on_receiver}))
    cfg = WeightSyncConfig(kind=kind, bucket_mb=0.01)  # several buckets
    sync = build_weight_sync(
        cfg, weight_specs(model), dist.group.WORLD, 0, torch.device("cpu"), run_dir=tmp
    )
    if rank == 0:
        for version in (1, 2):
            with torch.no_grad():
                model.model.norm.weight.fill_(float(version))
            sync.send(iter_state(model), version)
        torch.save(dict(iter_state(model)), tmp / "sent.pt")
    else:
        engine = RecordingEngine()
        assert sync.receive(engine) == 1
        assert engine.staged["model.norm.weight"].eq(1.0).all()
        assert sync.receive(engine) == 2
        torch.save({"staged": engine.staged, "committed": engine.committed}, tmp / "got.pt")


@pytest.mark.parametrize("kind", ["broadcast", "disk"])
def test_every_tensor_arrives_bit_exact(tmp_path, kind):
    run_ranks(_sync, 2, kind=kind, tmp=tmp_path, hidden_on_receiver=CFG["hidden_size"])
    sent, got = torch.load(tmp_path / "sent.pt"), torch.load(tmp_path / "got.pt")
    assert got["committed"] == [1, 2]
    assert sorted(sent) == sorted(got["staged"]) and "lm_head.weight" not in sent  # tied
    for name, t in sent.items():
        assert torch.equal(t, got["staged"][name]), name


def test_broadcast_refuses_a_different_model(tmp_path):
    with pytest.raises(AssertionError, match="(?s)rank 1:.*rollout and train models differ"):
        run_ranks(_sync, 2, timeout_s=10, kind="broadcast", tmp=tmp_path, hidden_on_receiver=48)


def _split_meshes_on_cpu(rank, world):
    """The groups a split run builds with the trainer and the engine on CPU, then one sync."""
    placement = PlacementConfig(kind="split", rollout_ranks=[0], train_ranks=[1])
    m = build_meshes(placement, 20, torch.device("cpu"), data_plane=True, engine_device="cpu")
    backends = {name: dist.get_backend(getattr(m, name))
                for name in ("sync_group", "data_group", "metrics_group")}
    model = build_model(ModelConfig.from_hf_dict(CFG))
    model.init_weights(seed=rank)
    sync = build_weight_sync(WeightSyncConfig(bucket_mb=0.01), weight_specs(model), m.sync_group,
                             m.sync_src, m.sync_device)
    if m.is_train:
        sync.send(iter_state(model), 1)
        return backends, m.sync_device.type, None
    engine = RecordingEngine()
    sync.receive(engine)
    sender = build_model(ModelConfig.from_hf_dict(CFG))
    sender.init_weights(seed=1)
    exact = all(torch.equal(t, engine.staged[n]) for n, t in iter_state(sender))
    return backends, m.sync_device.type, exact


def test_on_cpu_the_sync_and_data_groups_are_gloo_and_weights_arrive():
    out = run_ranks(_split_meshes_on_cpu, 2)
    for rank in (0, 1):
        backends, sync_device, _ = out[rank]
        assert backends == dict.fromkeys(("sync_group", "data_group", "metrics_group"), "gloo")
        assert sync_device == "cpu"
    assert out[0][2] is True  # the rollout rank got train rank 1's weights, bit for bit
