"""The renderer's scheduler: weighted fair share between classes, aging, tenant round-robin, micro-batches,
preemption decisions and partition removal. Pure logic with a fake clock."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from gpu_consumers.scheduler import CLASSES, Pick, Scheduler
from gpu_consumers.tasks import Task
from schemas.records import LatentRecipe, RenderTask

WEIGHTS = {"HIGH": 16.0, "NORMAL": 4.0, "LOW": 1.0}
AGING_S = 30.0
BATCH_WAIT_S = 0.125  # a power of two: the fake clock adds it up exactly
_ids = itertools.count()


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_task(
    priority: str,
    tenant: str = "t1",
    frames: int = 1,
    received_at: float = 1000.0,
    steps: int = 4,
    width: int = 64,
    model: str = "m",
    partition: int = 0,
    topic: str | None = None,
) -> Task:
    n = next(_ids)
    record = RenderTask(
        task_id=f"r{n}.0",
        request_id=f"r{n}",
        tenant_id=tenant,
        priority=priority,
        kind="IMAGE",
        pool="gpu",
        model=model,
        prompt="p",
        width=width,
        height=64,
        steps=steps,
        guidance_scale=7.5,
        scheduler=None,
        seed=n,
        frame_start=0,
        frame_end=frames,
        frame_count=frames,
        recipe=LatentRecipe(seed_start=n, seed_end=n, positions=[0.0] * frames),
        output_format="PNG",
        created_at=0,
        accepted_at=0,
        enqueued_at=0,
    )
    return Task(record, topic or f"aigc.render.gpu.{priority.lower()}", partition, n, {}, received_at)


def make_scheduler(
    clock: FakeClock | None = None,
    weights: dict[str, float] | None = None,
    batch_wait_s: float = BATCH_WAIT_S,
) -> tuple[Scheduler, FakeClock]:
    clock = clock or FakeClock()
    return Scheduler(weights or WEIGHTS, AGING_S, batch_wait_s, clock=clock), clock


def must_pick(scheduler: Scheduler, max_frames: int, above: str | None = None) -> Pick:
    pick = scheduler.pick(max_frames, above=above)
    assert pick is not None
    return pick


# -- between classes --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_a_class_alone_is_always_served_whatever_its_pass(cls: str) -> None:
    scheduler, clock = make_scheduler()
    scheduler.charge(cls, 10_000)  # far behind every other class in fair-share terms
    for _ in range(3):
        scheduler.add(make_task(cls, received_at=clock.now))
    for _ in range(3):
        assert must_pick(scheduler, 1).cls == cls
    assert scheduler.pick(1) is None


def test_with_equal_passes_the_more_urgent_class_goes_first() -> None:
    scheduler, clock = make_scheduler()
    for cls in ("LOW", "NORMAL", "HIGH"):
        scheduler.add(make_task(cls, received_at=clock.now))
    assert [must_pick(scheduler, 1).cls for _ in range(3)] == ["HIGH", "NORMAL", "LOW"]


def saturate(scheduler: Scheduler, clock: FakeClock, classes: tuple[str, ...], depth: int) -> None:
    """Keep at least ``depth`` one-frame tasks buffered in every class of ``classes``."""
    for cls in classes:
        while scheduler.queues[cls].tasks < depth:
            scheduler.add(make_task(cls, received_at=clock.now))


@pytest.mark.parametrize("weights", [WEIGHTS, {"HIGH": 3.0, "NORMAL": 2.0, "LOW": 1.0}])
def test_saturated_classes_share_frames_by_weight(weights: dict[str, float]) -> None:
    scheduler, clock = make_scheduler(weights=weights)
    frames: Counter[str] = Counter()
    for _ in range(2000):
        saturate(scheduler, clock, CLASSES, 8)
        pick = must_pick(scheduler, 4)
        assert pick.frames == 4
        frames[pick.cls] += pick.frames
        clock.now += 0.001
    total = sum(frames.values())
    for cls in CLASSES:
        expected = weights[cls] / sum(weights.values())
        assert abs(frames[cls] / total - expected) < 0.02, (cls, frames[cls] / total, expected)


def test_a_class_that_was_idle_earns_no_credit() -> None:
    scheduler, clock = make_scheduler()
    for _ in range(500):  # HIGH alone for a long time
        saturate(scheduler, clock, ("HIGH",), 4)
        must_pick(scheduler, 4)
    # LOW arrives and both stay saturated: LOW gets its share from now on, not a burst of 500/16 catch-up.
    served: list[str] = []
    for _ in range(42):
        saturate(scheduler, clock, ("HIGH", "LOW"), 8)
        served.append(must_pick(scheduler, 1).cls)
    assert 1 <= served.count("LOW") <= 3


def test_bounded_starvation_of_low_under_saturated_high() -> None:
    """The docstring: a LOW batch of n frames waits at most n * w_HIGH / w_LOW HIGH frames."""
    low_frames = 4
    bound = low_frames * WEIGHTS["HIGH"] / WEIGHTS["LOW"]
    scheduler, clock = make_scheduler()
    for _ in range(100):  # HIGH is saturated for a while first
        saturate(scheduler, clock, ("HIGH",), 4)
        must_pick(scheduler, 4)
    high_before_first_low = None
    high_run = 0
    longest_run = 0
    for _ in range(2000):
        saturate(scheduler, clock, ("HIGH",), 4)
        if scheduler.queues["LOW"].tasks == 0:
            scheduler.add(make_task("LOW", frames=low_frames, received_at=clock.now))
        pick = must_pick(scheduler, low_frames)
        if pick.cls == "HIGH":
            high_run += pick.frames
            continue
        assert pick.frames == low_frames
        if high_before_first_low is None:
            high_before_first_low = high_run
        longest_run = max(longest_run, high_run)
        high_run = 0
    assert high_before_first_low is not None
    assert high_before_first_low <= bound
    assert longest_run <= bound
    # ...and the bound is what the weights give, not far more than needed.
    assert longest_run >= bound / 2


def test_a_task_older_than_aging_s_is_served_next_whatever_the_passes() -> None:
    scheduler, clock = make_scheduler()
    old = make_task("LOW", received_at=clock.now)
    scheduler.add(old)
    scheduler.charge("LOW", 1_000)  # LOW's pass is far ahead: fair share alone would serve HIGH for ages
    clock.now += AGING_S - 0.5
    saturate(scheduler, clock, ("HIGH",), 4)
    assert must_pick(scheduler, 1).cls == "HIGH"
    clock.now += 0.5  # the LOW task has now waited exactly aging_s
    saturate(scheduler, clock, ("HIGH",), 4)
    pick = must_pick(scheduler, 1)
    assert pick.cls == "LOW"
    assert pick.tasks == [old]
    assert must_pick(scheduler, 1).cls == "HIGH"


def test_among_aged_classes_the_oldest_task_goes_first() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("HIGH", received_at=clock.now + 5))
    scheduler.add(make_task("LOW", received_at=clock.now))
    scheduler.add(make_task("NORMAL", received_at=clock.now + 2))
    clock.now += AGING_S + 10
    assert [must_pick(scheduler, 1).cls for _ in range(3)] == ["LOW", "NORMAL", "HIGH"]


# -- inside a class ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["HIGH", "LOW"])
def test_tenants_take_turns_inside_a_class(cls: str) -> None:
    scheduler, clock = make_scheduler()
    for _ in range(50):
        scheduler.add(make_task(cls, tenant="A", received_at=clock.now))
    for _ in range(5):
        scheduler.add(make_task(cls, tenant="B", received_at=clock.now + 1))
    clock.now += 1
    order = [must_pick(scheduler, 1).tasks[0].tenant_id for _ in range(55)]
    assert order[:10] == ["A", "B"] * 5
    assert order[10:] == ["A"] * 45


def test_each_tenant_keeps_its_own_fifo() -> None:
    scheduler, clock = make_scheduler()
    a = [make_task("HIGH", tenant="A", received_at=clock.now) for _ in range(3)]
    b = [make_task("HIGH", tenant="B", received_at=clock.now) for _ in range(3)]
    for task in a + b:
        scheduler.add(task)
    picked = [must_pick(scheduler, 1).tasks[0] for _ in range(6)]
    assert [t for t in picked if t.tenant_id == "A"] == a
    assert [t for t in picked if t.tenant_id == "B"] == b


def test_a_batch_takes_one_task_per_tenant_per_round() -> None:
    scheduler, clock = make_scheduler()
    for _ in range(6):
        scheduler.add(make_task("HIGH", tenant="A", received_at=clock.now))
    for _ in range(2):
        scheduler.add(make_task("HIGH", tenant="B", received_at=clock.now))
    pick = must_pick(scheduler, 4)
    assert [t.tenant_id for t in pick.tasks] == ["A", "B", "A", "B"]


# -- micro-batches ----------------------------------------------------------------------------------


def test_a_batch_groups_only_compatible_tasks_up_to_max_frames() -> None:
    scheduler, clock = make_scheduler()
    first = make_task("HIGH", received_at=clock.now)
    other_steps = make_task("HIGH", steps=8, received_at=clock.now)
    other_size = make_task("HIGH", width=128, received_at=clock.now)
    other_model = make_task("HIGH", model="m2", received_at=clock.now)
    same = [make_task("HIGH", received_at=clock.now) for _ in range(5)]
    for task in [first, other_steps, other_size, other_model, *same]:
        scheduler.add(task)
    pick = must_pick(scheduler, 4)
    assert pick.tasks == [first, *same[:3]]
    assert len({t.key for t in pick.tasks}) == 1
    # The rest, batch by batch: each batch one key.
    rest = [must_pick(scheduler, 4) for _ in range(4)]
    assert [p.tasks for p in rest] == [[other_steps], [other_size], [other_model], same[3:]]
    assert scheduler.pick(4) is None


def test_a_batch_never_mixes_classes() -> None:
    scheduler, clock = make_scheduler(batch_wait_s=0.0)
    for cls in ("HIGH", "NORMAL", "HIGH", "LOW", "NORMAL"):
        scheduler.add(make_task(cls, received_at=clock.now))
    while (pick := scheduler.pick(8)) is not None:
        assert {t.priority for t in pick.tasks} == {pick.cls}
    assert scheduler.buffered_tasks() == 0


def test_multi_frame_tasks_fill_a_batch_without_exceeding_max_frames() -> None:
    scheduler, clock = make_scheduler()
    three_a = make_task("HIGH", frames=3, received_at=clock.now)
    three_b = make_task("HIGH", frames=3, received_at=clock.now)
    one = make_task("HIGH", frames=1, tenant="t2", received_at=clock.now)
    for task in (three_a, three_b, one):
        scheduler.add(task)
    pick = must_pick(scheduler, 4)
    assert pick.tasks == [three_a, one]
    assert pick.frames == 4
    assert must_pick(scheduler, 4).tasks == [three_b]


def test_a_task_larger_than_max_frames_runs_alone() -> None:
    scheduler, clock = make_scheduler()
    big = make_task("HIGH", frames=6, received_at=clock.now)
    scheduler.add(big)
    scheduler.add(make_task("HIGH", received_at=clock.now))
    pick = must_pick(scheduler, 4)
    assert pick.tasks == [big]
    assert scheduler.buffered_frames("HIGH") == 1


@pytest.mark.parametrize("cls", ["NORMAL", "LOW"])
def test_a_partial_batch_waits_up_to_batch_wait_s(cls: str) -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task(cls, received_at=clock.now))
    scheduler.add(make_task(cls, received_at=clock.now))
    assert scheduler.pick(4) is None
    assert scheduler.wait_hint() == pytest.approx(BATCH_WAIT_S)
    clock.now += BATCH_WAIT_S / 2
    assert scheduler.pick(4) is None
    assert scheduler.wait_hint() == pytest.approx(BATCH_WAIT_S / 2)
    clock.now += BATCH_WAIT_S / 2
    pick = must_pick(scheduler, 4)
    assert pick.cls == cls
    assert pick.frames == 2


@pytest.mark.parametrize("cls", ["NORMAL", "LOW"])
def test_a_full_batch_does_not_wait(cls: str) -> None:
    scheduler, clock = make_scheduler()
    for _ in range(4):
        scheduler.add(make_task(cls, received_at=clock.now))
    assert must_pick(scheduler, 4).frames == 4


def test_an_incompatible_task_does_not_count_towards_filling_a_batch() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("NORMAL", received_at=clock.now))
    for _ in range(3):
        scheduler.add(make_task("NORMAL", steps=8, received_at=clock.now + 0.001))
    assert scheduler.pick(4) is None


def test_high_never_waits_to_fill_a_batch() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("HIGH", received_at=clock.now))
    pick = must_pick(scheduler, 4)
    assert (pick.cls, pick.frames) == ("HIGH", 1)


def test_wait_hint_is_none_when_empty() -> None:
    scheduler, _ = make_scheduler()
    assert scheduler.wait_hint() is None
    assert scheduler.pick(4) is None


# -- preemption -------------------------------------------------------------------------------------


def test_a_lightly_loaded_high_class_preempts_a_running_low_batch_at_once() -> None:
    scheduler, clock = make_scheduler()
    for _ in range(200):  # HIGH was busy before: its pass is well ahead of LOW's
        saturate(scheduler, clock, ("HIGH",), 1)
        must_pick(scheduler, 4)
    scheduler.add(make_task("LOW", frames=4, received_at=clock.now))
    running = must_pick(scheduler, 4)
    assert running.cls == "LOW"
    assert not scheduler.should_preempt(running)
    scheduler.add(make_task("HIGH", received_at=clock.now))
    assert scheduler.should_preempt(running)
    urgent = must_pick(scheduler, 4, above="LOW")
    assert urgent.cls == "HIGH"
    assert not scheduler.should_preempt(running)  # nothing more urgent waits


def test_a_saturated_high_class_stops_preempting_once_its_pass_passes_low() -> None:
    low_frames = 2
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("LOW", frames=low_frames, received_at=clock.now))
    running = must_pick(scheduler, low_frames)
    assert running.cls == "LOW"
    preempting_frames = 0
    for _ in range(1000):
        saturate(scheduler, clock, ("HIGH",), 4)
        if not scheduler.should_preempt(running):
            break
        urgent = must_pick(scheduler, 1, above=running.cls)
        assert urgent.cls == "HIGH"
        preempting_frames += urgent.frames
    else:
        pytest.fail("a saturated HIGH class never let the suspended LOW batch resume")
    # It stopped exactly when HIGH's pass went past LOW's (which includes the running batch)...
    assert scheduler.passes["HIGH"] > scheduler.passes["LOW"]
    assert scheduler.passes["HIGH"] - 1 / WEIGHTS["HIGH"] <= scheduler.passes["LOW"]
    # ...so the LOW batch waits about n * w_HIGH / w_LOW HIGH frames, as the docstring says. Ties go to
    # HIGH (should_preempt uses <=), so one more HIGH batch than the docstring's bound may run: here 33.
    bound = low_frames * WEIGHTS["HIGH"] / WEIGHTS["LOW"]
    assert bound <= preempting_frames <= bound + 1


def test_a_batch_picked_by_aging_is_not_preempted_straight_away() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("LOW", frames=4, received_at=clock.now))
    scheduler.charge("LOW", 100)  # LOW had its share recently: its pass is far ahead
    clock.now += AGING_S + 1
    for _ in range(8):  # fresh HIGH work
        scheduler.add(make_task("HIGH", received_at=clock.now))
    aged = must_pick(scheduler, 4)
    assert aged.cls == "LOW"  # aging served it...
    assert not scheduler.should_preempt(aged)  # ...and it should get to run


def test_only_more_urgent_classes_preempt() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("NORMAL", received_at=clock.now + 0.1))
    clock.now += 1
    running = must_pick(scheduler, 1)
    assert running.cls == "NORMAL"
    scheduler.add(make_task("LOW", received_at=clock.now))
    scheduler.add(make_task("NORMAL", received_at=clock.now))
    assert not scheduler.should_preempt(running)
    scheduler.add(make_task("HIGH", received_at=clock.now))
    assert scheduler.should_preempt(running)


def test_a_high_batch_is_never_preempted() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("HIGH", received_at=clock.now))
    running = must_pick(scheduler, 1)
    for cls in CLASSES:
        scheduler.add(make_task(cls, received_at=clock.now))
    scheduler.charge("HIGH", 1_000)
    assert not scheduler.should_preempt(running)


def test_a_preempting_pick_only_takes_more_urgent_classes() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("LOW", received_at=clock.now))
    scheduler.add(make_task("NORMAL", received_at=clock.now))
    assert scheduler.pick(1, above="HIGH") is None
    assert scheduler.pick(1, above="NORMAL") is None
    assert must_pick(scheduler, 1, above="LOW").cls == "NORMAL"
    assert scheduler.pick(1, above="LOW") is None
    scheduler.add(make_task("HIGH", received_at=clock.now))
    assert scheduler.pick(1, above="HIGH") is None
    assert must_pick(scheduler, 1, above="NORMAL").cls == "HIGH"
    assert scheduler.buffered_tasks() == 1  # the LOW task is untouched


def test_a_preempting_pick_never_waits_to_fill_a_batch() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("NORMAL", received_at=clock.now))
    assert scheduler.pick(4) is None  # an ordinary pick waits for more NORMAL tasks
    pick = must_pick(scheduler, 4, above="LOW")
    assert (pick.cls, pick.frames) == ("NORMAL", 1)


# -- partitions -------------------------------------------------------------------------------------


def test_remove_partition_drops_its_tasks_and_keeps_counts() -> None:
    scheduler, clock = make_scheduler(batch_wait_s=0.0)
    topic = "aigc.render.gpu.normal"
    gone = [
        make_task("NORMAL", tenant="A", frames=2, partition=1, topic=topic, received_at=clock.now),
        make_task("NORMAL", tenant="B", frames=1, partition=1, topic=topic, received_at=clock.now),
    ]
    kept = [
        make_task("NORMAL", tenant="A", frames=3, partition=0, topic=topic, received_at=clock.now),
        make_task("NORMAL", tenant="A", frames=1, partition=1, topic="other", received_at=clock.now),
        make_task("HIGH", tenant="B", frames=1, partition=1, received_at=clock.now),
    ]
    for task in [gone[0], kept[0], gone[1], kept[1], kept[2]]:
        scheduler.add(task)
    removed = scheduler.remove_partition(topic, 1)
    assert sorted(t.task_id for t in removed) == sorted(t.task_id for t in gone)
    assert scheduler.buffered_tasks() == 3
    assert scheduler.buffered_frames("NORMAL") == 4
    assert scheduler.buffered_frames("HIGH") == 1
    assert "B" not in scheduler.queues["NORMAL"].tenants  # an emptied tenant is dropped
    picked = []
    while (pick := scheduler.pick(8)) is not None:
        picked += pick.tasks
    assert sorted(t.task_id for t in picked) == sorted(t.task_id for t in kept)
    assert scheduler.buffered_tasks() == 0
    assert all(scheduler.buffered_frames(c) == 0 for c in CLASSES)
    assert scheduler.remove_partition(topic, 1) == []


def test_a_class_emptied_by_remove_partition_re_enters_at_the_virtual_time() -> None:
    scheduler, clock = make_scheduler()
    scheduler.add(make_task("LOW", partition=3, received_at=clock.now))
    scheduler.remove_partition("aigc.render.gpu.low", 3)
    for _ in range(100):
        saturate(scheduler, clock, ("HIGH",), 1)
        must_pick(scheduler, 1)
    scheduler.add(make_task("LOW", received_at=clock.now))
    assert scheduler.passes["LOW"] == scheduler.virtual
    assert scheduler.virtual > 0


def test_an_aged_task_is_first_in_its_batch_even_when_another_tenant_is_ahead_in_the_round() -> None:
    scheduler, clock = make_scheduler()
    old = make_task("LOW", tenant="patient", received_at=clock.now)
    clock.now += 1
    scheduler.add(make_task("LOW", tenant="eager", received_at=clock.now))  # ahead of "patient" in the round
    scheduler.add(old)
    clock.now += AGING_S + 1
    pick = must_pick(scheduler, 1)
    assert pick.aged
    assert pick.tasks == [old]
