"""Unit tests for training/resume.py (resume state, sampler offsets, checks) and the StepGuard
of training/faults.py across two gloo ranks. In-process, tiny models; the end-to-end kill, signal
and dead-rank runs are in tests/test_faults.py."""

import json
import os
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import REPO, run_ranks
from segment_anything.training.resume import (
    RESUME_FORMAT, Geometry, ResumeError, check_model_keys, check_resume, keep_global_batch, load_state, make_state,
    restore, trains_batch_norm,
)
from segment_anything.utils.data.samplers import ResumableSampler
from segment_anything.training.config import TrainConfig
from segment_anything.training.engine import Training
from segment_anything.training.faults import _test_fault


def test_sampler_skips_the_first_batches_without_yielding_them():
    data = list(range(11))
    full = [list(ResumableSampler(data, 2, num_replicas=2, rank=r, shuffle=True, seed=3)) for r in range(2)]
    for rank in range(2):
        sampler = ResumableSampler(data, 2, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(0, start=2)
        assert list(sampler) == full[rank][4:] and len(sampler) == len(full[rank]) - 4
        assert sampler.steps_per_epoch == 3  # 6 samples per rank (padded), batches of 2
    # The global order is what the shards are cut from (DistributedSampler: rank::world).
    order = ResumableSampler(data, 2, num_replicas=2, rank=0, seed=3).global_order(0)
    assert sorted(order) == data and full[0][:5] == order[0:10:2] and full[1][:5] == order[1:10:2]
    later = ResumableSampler(data, 2, num_replicas=2, rank=0, seed=3)
    later.set_epoch(1)
    assert later.global_order(1) != order and list(later)[:5] == later.global_order(1)[0:10:2]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)
        self.b.requires_grad_(False)


def tiny_run(steps_per_epoch: int = 4, epochs: int = 2):
    """An engine.Training with what resume needs: a model, optimizer, cosine schedule, counters."""
    torch.manual_seed(0)
    sam = Tiny()
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=0.1)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))
    cfg = TrainConfig(checkpoint="none", train_dir="x")
    return Training(cfg=cfg, sam=sam, model=sam, optimizer=opt, scheduler=sched,
                    scaler=torch.amp.GradScaler("cpu", enabled=False), amp_dtype=None, task=None, cache=None)


def train_steps(run, n):
    for _ in range(n):
        run.optimizer.zero_grad()
        run.sam.b(run.sam.a(torch.ones(1, 3))).sum().backward()
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1


def saved_state(world: int, batch: int = 1, epoch: int = 0, step: int = 3):
    run = tiny_run()
    train_steps(run, step)
    run.epoch = epoch
    sampler = ResumableSampler(list(range(8)), batch, num_replicas=world, rank=0, seed=1)
    meters = [torch.tensor([float(r)]) for r in range(world)]
    return run, make_state(run, sampler, meters, [{"r": r} for r in range(world)])


def test_restore_with_the_same_world_size_is_exact():
    run, state = saved_state(world=2)
    fresh = tiny_run()
    sampler = ResumableSampler(list(range(8)), 1, num_replicas=2, rank=1, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        restored_rng = []
        mp.setattr("segment_anything.training.resume.set_rng_state", restored_rng.append)
        sums = restore(fresh, state, "last.pth", sampler, rank=1)
    assert restored_rng == [{"r": 1}] and sums.item() == 1.0  # rank 1's own RNG and epoch sums
    assert fresh.step == 3 and fresh.scheduler.last_epoch == 3
    for a, b in zip(run.sam.parameters(), fresh.sam.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    train_steps(run, 1), train_steps(fresh, 1)  # the optimizer moments came back too
    torch.testing.assert_close(run.sam.a.weight, fresh.sam.a.weight, rtol=0, atol=0)


def test_relaxed_resume_maps_the_position_through_the_samples_seen():
    _, state = saved_state(world=2, epoch=1, step=1)  # 1 step x 2 ranks x batch 1 = 2 samples of epoch 2
    fresh = tiny_run(steps_per_epoch=8)
    sampler = ResumableSampler(list(range(8)), 1, num_replicas=1, rank=0, seed=1)
    assert restore(fresh, state, "last.pth", sampler, rank=0) is None
    assert fresh.step == 2 and fresh.epoch == 1 and fresh.scheduler.last_epoch == 8 + 2
    expected = 0.1 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 16)).item())
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_another_world_size_keeps_the_global_batch_with_accumulate_or_is_refused_naming_why():
    four = Geometry(world_size=4, batch_size=2, accumulate=1)  # global batch 8
    assert keep_global_batch(four, 4, 2, 1, relaxed=False, path="run/last.pth") is None
    with pytest.raises(ResumeError, match=r"--accumulate 1 \(now 2\) on the same world size"):
        keep_global_batch(four, 4, 2, 2, relaxed=False, path="run/last.pth")
    for saved, world, fitted in ((four, 2, 2), (four, 1, 4), (Geometry(2, 2, 2), 4, 1)):
        change = keep_global_batch(saved, world, 2, saved.accumulate, relaxed=False, path="p")
        assert change.exact and change.accumulate == fitted, (saved, world, change)
    change = keep_global_batch(four, 2, 2, 7, relaxed=True, path="p")  # exact wins over relaxed and any asked value
    assert change.exact and change.accumulate == 2
    assert "--accumulate 2 keeps its global batch of 8 (2 x batch 2 x 2)" in change.message
    # 3 processes x batch 2: no whole number of batches of 6 makes 8.
    with pytest.raises(ResumeError, match=r"global batch 8\); with 3 process\(es\) x batch 2 no whole --accumulate .*"
                                          r"world size of 1, 2, 4, or add --resume_relaxed True"):
        keep_global_batch(four, 3, 2, 1, relaxed=False, path="run/last.pth")
    relaxed = keep_global_batch(four, 3, 2, 1, relaxed=True, path="run/last.pth")
    assert not relaxed.exact and relaxed.accumulate == 1 and "NOT reproduced" in relaxed.message


def test_restore_on_another_world_size_with_the_global_batch_kept_continues_the_step():
    run, state = saved_state(world=2, step=3)
    state["rng"] = [{"r": 0}, {"r": 0}]
    fresh = tiny_run()
    sampler = ResumableSampler(list(range(8)), 1, accumulate=2, num_replicas=1, rank=0, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        restored_rng = []
        mp.setattr("segment_anything.training.resume.set_rng_state", restored_rng.append)
        sums = restore(fresh, state, "last.pth", sampler, rank=0)
    assert restored_rng == [{"r": 0}] and sums.item() == 0.0 + 1.0  # both old ranks' sums on rank 0
    assert fresh.step == 3 and fresh.scheduler.last_epoch == 3  # the same steps: nothing remapped
    torch.testing.assert_close(run.sam.a.weight, fresh.sam.a.weight, rtol=0, atol=0)
    with pytest.MonkeyPatch.context() as mp:  # two ranks of batch 1 x 2 would start with nothing summed on rank 1
        mp.setattr("segment_anything.training.resume.set_rng_state", lambda s: None)
        other = ResumableSampler(list(range(8)), 1, accumulate=2, num_replicas=2, rank=1, seed=1)
        state_four = dict(state, world_size=4, accumulate=1, steps_per_epoch=2, rng=[{"r": 0}] * 4, meter=[torch.ones(1)] * 4)
        four_to_two = tiny_run()
        assert restore(four_to_two, state_four, "last.pth", other, rank=1) is None and four_to_two.step == 3
    # Ranks whose generators disagree (something drew per rank) are said, not hidden.
    state["rng"] = [{"r": 0}, {"r": 1}]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("segment_anything.training.resume.set_rng_state", lambda s: None)
        logged = []
        mp.setattr("segment_anything.training.resume.get_logger", lambda: SimpleNamespace(warning=logged.append))
        restore(tiny_run(), state, "last.pth", sampler, rank=0)
    assert logged and "rank 1's random generator state differs from rank 0's" in logged[0]
    # BatchNorm statistics depend on the split of the global batch: said when such a layer trains.
    norm = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert trains_batch_norm(norm) and not trains_batch_norm(norm.requires_grad_(False)) and not trains_batch_norm(Tiny())


def test_every_key_and_shape_is_checked():
    own = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    check_model_keys(dict(own), own, "f")
    with pytest.raises(ResumeError, match=r"missing from the file \(1\): a.bias"):
        check_model_keys({"a.weight": torch.zeros(2, 3)}, own, "f")
    with pytest.raises(ResumeError, match=r"not trained by this run \(1\): x"):
        check_model_keys(dict(own, x=torch.zeros(1)), own, "f")
    with pytest.raises(ResumeError, match=r"a.weight \(3, 3\) \(model \(2, 3\)\)"):
        check_model_keys(dict(own, **{"a.weight": torch.zeros(3, 3)}), own, "f")


def test_changed_data_is_refused():
    _, state = saved_state(world=2)
    sampler = ResumableSampler(list(range(9)), 1, num_replicas=2, rank=0, seed=1)
    with pytest.raises(ResumeError, match="training set is not the one"):
        restore(tiny_run(), state, "last.pth", sampler, rank=0)


def test_truncated_or_foreign_resume_files_are_named(tmp_path):
    _, state = saved_state(world=1)
    torch.save(state, tmp_path / "last.pth")
    data = (tmp_path / "last.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResumeError, match="cut.pth.*truncated"):
        load_state(tmp_path / "cut.pth")
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(ResumeError) as err:  # one line, and not torch's advice to load it unsafely
        load_state(tmp_path / "notes.txt")
    assert str(err.value) == (f"--resume: {tmp_path / 'notes.txt'} is not a PyTorch checkpoint (neither torch.save's "
                              "zip format nor a pickle; it starts with b'x\\n'); expected a last.pth written by run.py")
    torch.save({"model": {}}, tmp_path / "best.pth")
    with pytest.raises(ResumeError, match="best.pth is not a resume file"):
        load_state(tmp_path / "best.pth")


def write_run(folder, **args):
    folder.mkdir()
    saved = dict(TrainConfig(checkpoint="none", train_dir="t").to_dict(), **args)
    (folder / "args.json").write_text(json.dumps(saved))
    torch.save({"format": RESUME_FORMAT, "args": saved}, folder / "last.pth")


def test_resume_alone_takes_the_saved_flags_and_flags_beside_it_are_checked(tmp_path):
    run = tmp_path / "run"
    write_run(run, image_size=64, epoch=3, train_dir="data/train", output_dir=str(run))
    cfg = TrainConfig.from_args(["--resume", str(run)])
    assert (cfg.image_size, cfg.epoch, cfg.checkpoint, cfg.train_dir) == (64, 3, "none", "data/train")
    assert cfg.resume == str(run) and check_resume(cfg) == run
    # auto: the --output_dir's last.pth
    assert TrainConfig.from_args(["--resume", "auto", "--output_dir", str(run)]).image_size == 64
    changed = TrainConfig.from_args(["--resume", str(run), "--epoch", "5", "--num_workers", "2"])
    assert changed.num_workers == 2
    with pytest.raises(ResumeError, match=r"--epoch 3 \(now 5\)"):
        check_resume(changed)


def test_loss_size_is_kept_where_it_cuts_the_steps(tmp_path):
    """--objects_per_step cuts steps by a cost that follows --loss_size: changing it is refused
    there, and only there."""
    for per, refused in ((0, False), (8, True)):
        run = tmp_path / f"run{per}"
        write_run(run, image_size=64, train_dir="data/train", output_dir=str(run), objects_per_step=per)
        changed = TrainConfig.from_args(["--resume", str(run), "--loss_size", "low_res"])
        if refused:
            with pytest.raises(ResumeError, match=r"--loss_size original \(now low_res\)"):
                check_resume(changed)
        else:
            assert check_resume(changed) == run


def test_resume_auto_needs_an_output_dir(capsys):
    with pytest.raises(SystemExit):
        TrainConfig.from_args(["--resume", "auto"])
    assert "--resume auto continues the run in --output_dir" in capsys.readouterr().err


def test_test_fault_spec():
    os.environ["SAM_TEST_FAULT"] = "nan:1:2,hang:0:5+"
    try:
        assert [_test_fault(1, s) for s in range(4)] == [None, None, "nan", None]
        assert [_test_fault(0, s) for s in (4, 5, 9)] == [None, "hang", "hang"]
    finally:
        del os.environ["SAM_TEST_FAULT"]


GUARD_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from segment_anything.training.config import TrainConfig
    from segment_anything.training.engine import Training
    from segment_anything.utils.distributed import DistInfo
    from segment_anything.training.faults import StepGuard

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainConfig(checkpoint="none", train_dir="x", max_bad_steps=5, save_every=0, save_every_minutes=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    run = Training(cfg, model.module, model, opt, sched, scaler, amp_dtype=None, task=None, cache=None)
    guard = StepGuard(run, DistInfo(rank=rank, world_size=2), save=lambda s: None, resume_hint="")
    decisions = []
    for step in range(3):
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum()
        loss.backward()
        if rank == 1 and step == 1:  # after DDP's averaging: only this rank's gradient is bad
            model.module.weight.grad[0, 0] = float("nan")
        ok = guard.check(loss, opt, scaler)
        if ok:
            opt.step()
        sched.step()
        guard.end_step(None)
        decisions.append(ok)
    print("RESULT " + json.dumps({"ok": decisions, "weight": model.module.weight.tolist(), "skipped": run.skipped}))
    # As run.py's workers do: free DDP before its group goes, or torch can abort at exit.
    del model, opt, sched, guard, run
    import gc; gc.collect()
    dist.destroy_process_group()
    """
)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    results = run_ranks(GUARD_SCRIPT, tmp_path)
    assert results[0]["ok"] == results[1]["ok"] == [True, False, True]
    assert results[0]["skipped"] == results[1]["skipped"] == 1
    assert results[0]["weight"] == results[1]["weight"]  # the ranks did not diverge


SHARE_SCRIPT = textwrap.dedent(
    """
    import datetime, json, sys
    import torch, torch.distributed as dist
    from torch import nn
    from segment_anything.utils.distributed import share_buffers

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    model = nn.parallel.DistributedDataParallel(nn.BatchNorm1d(3), forward_sync_buffers=True)
    model(torch.full((4, 3), float(rank)) + torch.arange(4.0)[:, None])  # each rank updates its own copy
    before = model.module.running_mean.tolist()
    share_buffers(model.module)
    print("RESULT " + json.dumps({"before": before, "after": model.module.running_mean.tolist()}))
    del model
    import gc; gc.collect()
    dist.destroy_process_group()
    """
)


def test_share_buffers_gives_every_rank_rank_0s_batchnorm_statistics(tmp_path):
    """DDP copies rank 0's buffers before a forward, which then updates each rank's copy with
    its own batch: the ranks differ until share_buffers (run before validation) copies rank 0's."""
    results = run_ranks(SHARE_SCRIPT, tmp_path)
    assert results[0]["before"] != results[1]["before"]  # the forward made the ranks differ
    assert results[0]["after"] == results[1]["after"] == results[0]["before"]


def test_resume_auto_starts_a_new_folder_and_continues_one_with_last_pth(tmp_path):
    new = TrainConfig.from_args(["--resume", "auto", "--output_dir", str(tmp_path / "new"), "--train_dir", "t"])
    assert new.resume is None and new.output_dir == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert TrainConfig.from_args(["--resume", "auto", "--output_dir", str(tmp_path / "empty")]).resume is None
    run = tmp_path / "run"
    write_run(run, image_size=64, output_dir=str(run))
    cfg = TrainConfig.from_args(["--resume", "auto", "--output_dir", str(run)])
    assert cfg.resume == str(run) and cfg.image_size == 64 and check_resume(cfg) == run


def test_resume_auto_never_writes_over_a_folder_without_last_pth(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        TrainConfig.from_args(["--resume", "auto", "--output_dir", str(tmp_path / "other")])
    assert "holds files but no last.pth" in capsys.readouterr().err


def test_resuming_drops_metrics_lines_of_epochs_last_pth_does_not_hold(tmp_path):
    """Killed after epoch 2's metrics line but before epoch 2's last.pth: the resumed run trains
    epoch 2 again, so its old line (and a torn one) must go, or epoch 2 would be recorded twice."""
    import json

    from segment_anything.training.engine import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"epoch": e, "val_iou": e / 10}) + "\n" for e in (0, 1, 2)) + '{"epoch": 3, "va')
    assert drop_records_after(path, 1) == 2
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    assert drop_records_after(path, 1) == 0 and drop_records_after(tmp_path / "none.jsonl", 0) == 0
