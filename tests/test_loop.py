"""loop.train_stream, the clock both engines follow, driven by an engine that only writes down what it is
asked to do."""
import torch

from trainability.loop import train_stream

# 2 tasks x 2 epochs x 3 minibatches (600 images at B = 256: 256, 256, 88), a decision every 4th step
CFG = {"n_tasks": 2, "epochs_per_task": 2, "epochs_factor": 1.0, "batch_size": 256,
       "stream": {"n_images": 600, "drop_last": False}, "measure": {"every": 4}}


class Diary:
    """An engine that logs each call; `diverge_in` names (task, epoch) pairs whose NaN check fails."""
    device = torch.device("cpu")
    measuring = True

    task_epochs = [2]

    def __init__(self, diverge_in=()):
        self.log, self.diverge_in, self.done = [], set(diverge_in), None

    def start_task(self, tasks):
        self.t, self.epoch = tasks[0], -1
        self.log.append(("start", self.t))

    def minibatches(self, epoch):
        self.epoch = epoch
        return ["a", "b", "c"]

    def step(self, idx, *, step, frac, decide):
        self.log.append(("step", self.t, self.epoch, idx, step, frac and frac[0], decide))

    def ramp(self, epochs):
        self.log.append(("ramp", epochs[0]))

    def end_epoch(self, *, steps):
        return (self.t, self.epoch) in self.diverge_in

    def end_task(self, tasks, *, steps, wall_s, step):
        self.log.append(("end", tasks[0], steps[0], step))
        return [0] if (tasks[0], self.epoch) in self.diverge_in else []

    def task_line(self):
        return ""

    def state_dict(self):
        return {"log": list(self.log)}

    def load_state_dict(self, s):
        self.log = s["log"] + [("resumed",)]

    def finish(self, completed):
        self.done = completed


def test_the_clock_of_a_stream(tmp_path):
    """Tasks, epochs and minibatches in order; the global step and the task fraction; a decision at every
    4th step of the run, across epochs and tasks; the ramp after each epoch's first step."""
    e = Diary()
    train_stream(e, CFG, tmp_path / "ckpt.pt", ["k"], progress=False)
    steps = [x for x in e.log if x[0] == "step"]
    assert [s[4] for s in steps] == list(range(12))
    assert [s[3] for s in steps[:6]] == list("abcabc")
    assert [s[4] for s in steps if s[6]] == [3, 7, 11] and [s[5] for s in steps if s[6]] == [3 / 6, 1 / 6, 5 / 6]
    assert e.log[:3] == [("start", 0), steps[0], ("ramp", 0)] and e.log.count(("ramp", 1)) == 2
    assert [x for x in e.log if x[0] in ("start", "end")] == [("start", 0), ("end", 0, 6, 6),
                                                              ("start", 1), ("end", 1, 6, 12)]
    assert e.done is True and not (tmp_path / "ckpt.pt").exists()


def test_a_failed_nan_check_ends_the_task_and_a_dead_engine_the_stream(tmp_path):
    e = Diary(diverge_in={(0, 0)})
    train_stream(e, CFG, tmp_path / "ckpt.pt", ["k"], progress=False)
    assert [x for x in e.log if x[0] in ("start", "end")] == [("start", 0), ("end", 0, 3, 3)]
    assert e.done is True


def test_an_interrupted_stream_resumes_where_it_stopped(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    first = Diary()
    train_stream(first, CFG, ckpt, ["k"], progress=False, stop_after_task=0)
    assert first.done is False and ckpt.exists()
    again = Diary()
    train_stream(again, CFG, ckpt, ["k"], progress=False)
    whole = Diary()
    train_stream(whole, CFG, tmp_path / "other.pt", ["k"], progress=False)
    assert again.log == whole.log[:whole.log.index(("start", 1))] + [("resumed",)] + \
        whole.log[whole.log.index(("start", 1)):]
    # a checkpoint written under another key (changed configs, older engine) is ignored, with a warning
    train_stream(Diary(), CFG, ckpt, ["k"], progress=False, stop_after_task=0)
    other = Diary()
    train_stream(other, CFG, ckpt, ["changed"], progress=False)
    assert other.log == whole.log and "ignoring" in capsys.readouterr().err


class TwoClocks(Diary):
    """Two models with tasks of 1 and 2 epochs in one engine."""
    def __init__(self):
        super().__init__()
        self.task_epochs = [1, 2]

    def start_task(self, tasks):
        self.t, self.epoch = 0, -1
        self.log.append(("start", tasks))

    def end_task(self, tasks, *, steps, wall_s, step):
        self.log.append(("end", tasks, steps, step))
        return []

    def keep(self, models):
        self.log.append(("keep", models))
        self.task_epochs = [self.task_epochs[m] for m in models]

    def finish(self, completed):
        self.log.append(("finish", completed))


def test_each_model_keeps_its_task_clock_and_ended_runs_leave_the_stack(tmp_path):
    """Tasks of 1 and 2 epochs (3 steps each): model 0's two tasks end at epochs 1 and 2; at epoch 2 both
    models are at a task boundary, so the engine keeps model 1 (now model 0) and a checkpoint is written
    there; an interruption at it resumes with the kept model only."""
    e = TwoClocks()
    train_stream(e, CFG, tmp_path / "ckpt.pt", ["k"], progress=False)
    moments = [x for x in e.log if x[0] != "step" and x[0] != "ramp"]
    assert moments == [("start", {0: 0, 1: 0}), ("end", {0: 0}, {0: 3}, 3), ("start", {0: 1}),
                       ("end", {0: 1, 1: 0}, {0: 3, 1: 6}, 6), ("keep", [1]),
                       ("start", {0: 1}), ("end", {0: 1}, {0: 6}, 12), ("finish", True)]
    steps = [x for x in e.log if x[0] == "step"]
    assert [s[5] for s in steps if s[6]] == [0.0, 1 / 6, 5 / 6]   # model 0's task fraction at decisions
    first = TwoClocks()
    train_stream(first, CFG, tmp_path / "ckpt.pt", ["k"], progress=False, stop_after_task=0)
    assert first.log[-1] == ("finish", False) and (tmp_path / "ckpt.pt").exists()
    again = TwoClocks()
    train_stream(again, CFG, tmp_path / "ckpt.pt", ["k"], progress=False)
    cut = e.log.index(("keep", [1])) + 1   # the checkpoint's log, then the kept model's last task
    assert again.log == e.log[:cut] + [("resumed",)] + e.log[cut:] and again.task_epochs == [2]


def test_stack_phases_predict_where_the_loop_shrinks_the_stack(tmp_path):
    """planning.stack_phases (runtimes, projections, the dry run) follows the loop's rule: tasks of 3 and
    4 epochs, 5 tasks. The 3-epoch run ends at epoch 15, mid-task for the other; the stack shrinks at
    epoch 16, the next task end where every run still going is at a boundary (a rule that also waited
    for the ended run's boundaries would say 20, the other run's end)."""
    from trainability.planning import stack_phases
    cfg = dict(CFG, n_tasks=5)
    e = TwoClocks()
    e.task_epochs = [3, 4]
    steps_at_keep = []
    e.keep = lambda models: steps_at_keep.append((models, sum(x[0] == "step" for x in e.log)))
    train_stream(e, cfg, tmp_path / "ckpt.pt", ["k"], progress=False)
    assert steps_at_keep == [([1], 16 * 3)]   # 3 steps an epoch
    phases = stack_phases([dict(cfg, epochs_per_task=3), dict(cfg, epochs_per_task=4)])
    assert [(models, epochs) for models, epochs, _ in phases] == [([0, 1], 16), ([1], 4)]
    # task ends: epochs 3, 4, 6, 8, 9, 12, 15, 16, then 20
    assert [ends for _, _, ends in phases] == [8, 1]


def test_a_resumed_stream_says_from_which_task(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    train_stream(Diary(), CFG, ckpt, ["k"], progress=False, stop_after_task=0)
    capsys.readouterr()
    train_stream(Diary(), CFG, ckpt, ["k"], progress=False)
    assert f"resuming from task 1 of 2 ({ckpt}: epoch 2, step 6)" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_with_the_remedy(tmp_path):
    """A truncated checkpoint, or another file in its place: one error naming the file and --fresh,
    nothing trained over it."""
    import pytest

    from trainability.record import DamagedFileError
    ckpt = tmp_path / "ckpt.pt"
    train_stream(Diary(), CFG, ckpt, ["k"], progress=False, stop_after_task=0)
    whole = ckpt.read_bytes()
    for damage in (whole[:len(whole) // 2], b"not a checkpoint", b""):
        ckpt.write_bytes(damage)
        engine = Diary()
        with pytest.raises(DamagedFileError, match=rf"{ckpt} is damaged \(.*\): rerun with --fresh, or delete it"):
            train_stream(engine, CFG, ckpt, ["k"], progress=False)
        assert engine.log == []
    torch.save([1, 2], ckpt)
    with pytest.raises(DamagedFileError, match="not a checkpoint of this project"):
        train_stream(Diary(), CFG, ckpt, ["k"], progress=False)
