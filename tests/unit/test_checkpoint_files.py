"""Checkpoint directories: manifests catch truncation and corruption, the newest complete one wins,
half-written ones are invisible, resume choices are validated."""

import json
import logging

import pytest

from asyncflow.checkpoint import (
    CheckpointCorrupt,
    check_fresh_run_dir,
    latest_complete,
    resolve_resume,
    supersede_newer,
    truncate_jsonl,
    verify,
    write_manifest,
)


def _ckpt(root, step, payload=b"weights" * 100):
    d = root / f"step_{step}"
    (d / "train").mkdir(parents=True)
    (d / "train" / "__0_0.distcp").write_bytes(payload)
    (d / "train" / ".metadata").write_bytes(b"dcp metadata")
    (d / "queue.pt").write_bytes(b"queue")
    (d / "rng_train0.pt").write_bytes(b"rng")
    (d / "meta.json").write_text(json.dumps({"step": step}))
    write_manifest(d)
    return d


def test_a_manifest_must_list_every_file_of_the_checkpoint(tmp_path):
    d = _ckpt(tmp_path, 3)
    (d / "manifest.json").write_text(json.dumps({"files": {}}))  # vouches for nothing
    with pytest.raises(CheckpointCorrupt, match="does not list meta.json"):
        verify(d)
    d = _ckpt(tmp_path, 4)
    files = json.loads((d / "manifest.json").read_text())["files"]
    del files["train/__0_0.distcp"]  # a shard the manifest does not vouch for
    (d / "manifest.json").write_text(json.dumps({"files": files}))
    with pytest.raises(CheckpointCorrupt, match="does not list train/"):
        verify(d)
    d = _ckpt(tmp_path, 5)
    (d / "train" / "__1_0.distcp").write_bytes(b"stray")  # on disk, not in the manifest
    with pytest.raises(CheckpointCorrupt, match="does not list train/__1_0.distcp"):
        verify(d)


def test_verify_names_the_truncated_or_corrupted_file(tmp_path):
    d = _ckpt(tmp_path, 3)
    verify(d)
    shard = d / "train" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="__0_0.distcp: CRC32 differs"):
        verify(d)
    shard.write_bytes(bytes(data[:50]))
    with pytest.raises(CheckpointCorrupt, match="__0_0.distcp: 50 bytes, manifest says 700"):
        verify(d)
    shard.unlink()
    with pytest.raises(CheckpointCorrupt, match="missing"):
        verify(d)


def test_latest_complete_skips_corrupted_and_half_written_checkpoints(tmp_path, caplog):
    _ckpt(tmp_path, 2)
    _ckpt(tmp_path, 4)
    newest = _ckpt(tmp_path, 6)
    (tmp_path / ".step_8.tmp").mkdir()  # a save that was interrupted: never considered
    (tmp_path / "step_10").mkdir()  # renamed without manifest (cannot happen, still refused)
    assert latest_complete(tmp_path) == newest
    (newest / "meta.json").write_text("{}")  # size changes
    with caplog.at_level(logging.WARNING, logger="asyncflow"):
        assert latest_complete(tmp_path) == tmp_path / "step_4"
    assert any("step_6" in r.getMessage() and "skipping corrupted" in r.getMessage()
               for r in caplog.records)
    assert latest_complete(tmp_path / "nothing_here") is None


def test_resume_choices(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume("auto", run) is None  # nothing yet: start fresh
    d = _ckpt(run / "checkpoints", 5)
    assert resolve_resume("auto", run) == d
    assert resolve_resume(str(d), tmp_path / "other") == d
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        resolve_resume(str(tmp_path / "missing"), run)
    (d / "meta.json").write_text("changed")
    with pytest.raises(CheckpointCorrupt):
        resolve_resume(str(d), run)  # an explicit path is not silently replaced


def test_resume_auto_refuses_to_start_over_when_every_checkpoint_is_corrupted(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        (_ckpt(run / "checkpoints", step) / "queue.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointCorrupt, match="every checkpoint under .* is corrupted"):
        resolve_resume("auto", run)


def test_fresh_start_refuses_an_existing_run_unless_overwrite(tmp_path):
    check_fresh_run_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match="already holds a run and resume=false"):
        check_fresh_run_dir(tmp_path / "old", overwrite=False)
    check_fresh_run_dir(tmp_path / "old", overwrite=True)


def test_truncate_jsonl_keeps_the_steps_before_the_resume_point(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(6)))
    assert truncate_jsonl(f, 4) == 2
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [0, 1, 2, 3]
    assert truncate_jsonl(tmp_path / "absent.jsonl", 0) == 0


def test_checkpoints_past_a_resumed_step_are_set_aside_when_it_saves(tmp_path):
    """A run resumed from step_4 in its own directory writes step_6: the step_8 of the future it
    left must not be what resume=auto picks next, nor outrank step_6 when pruning."""
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        _ckpt(root, step)
    (root / "step_12.superseded").mkdir()  # set aside by an earlier rollback
    _ckpt(root, 6)
    moved = supersede_newer(root, 6)
    assert [p.name for p in moved] == ["step_12.superseded", "step_8.superseded"]
    assert latest_complete(root) == root / "step_6"
    assert sorted(p.name for p in root.iterdir()) == [
        "step_12.superseded", "step_4", "step_6", "step_8.superseded"]
    assert supersede_newer(root, 6) == []
