"""Section 3 of train_gpt.py, the schedules, against the fact sheet's formulas (RECORDS_29_89.md 2.5,
2.7, 2.8, 2.9) written out here independently, step by step."""
import pytest

import train_gpt as R
from harness import SettingsError

RECORD_STEPS = 1285


@pytest.fixture(scope="module")
def record():
    return R.parse_settings([])


@pytest.fixture(scope="module")
def tiny():
    return R.parse_settings(["--preset=tiny"])


def fact_sheet_plan(step: int) -> dict:
    """Record 89's numbers for one step, straight from the fact sheet."""
    if step < 423:
        stage = 0
    elif step < 847:
        stage = 1
    elif step < 1270:
        stage = 2
    else:
        stage = 3
    batch_tokens = [131_072, 262_144, 393_216, 393_216][stage]
    if step >= 1270:
        lr = 0.15
    else:
        multiplier = [1.0, 1.52, 1.73][stage]
        tau = min(1.0, (step - 508) / 762)
        lr = multiplier if step < 508 else multiplier * (1 - tau) + 0.15 * tau
    if step < 300:
        momentum = 0.85 + (0.95 - 0.85) * step / 300
    elif step > 1235:
        momentum = 0.95 - (0.95 - 0.85) * (step - 1235) / 50
    else:
        momentum = 0.95
    if stage == 0:
        fraction = step / 423
        mtp, prefix = [1.0, 0.5, 0.25 * (1 - fraction)], 0.25
    elif stage == 1:
        fraction = (step - 423) / 424
        mtp, prefix = [1.0, 0.5 * (1 - fraction)], 0.25 * (1 - fraction)
    else:
        mtp, prefix = [1.0], 0.0
    return dict(step=step, stage=stage, batch_tokens=batch_tokens, slot_tokens=batch_tokens // 8,
                max_doc_len=896 if stage == 0 else 2048, lr_factor=lr, muon_momentum=momentum,
                short_window_blocks=[1, 3, 5, 6][stage], long_window_blocks=[3, 7, 11, 13][stage],
                mtp_weights=mtp, prefix_weight=prefix, adam_updates=step % 2 == 1 and step < RECORD_STEPS,
                untie_after=step == 847)


def test_every_step_of_the_record_matches_the_fact_sheet(record):
    assert record.num_iterations == RECORD_STEPS
    for step in range(RECORD_STEPS + 1):  # the last: the final validation's plan
        plan, expected = R.step_plan(step, record), fact_sheet_plan(step)
        for name, value in expected.items():
            got = getattr(plan, name)
            if name == "mtp_weights":
                assert isinstance(got, tuple) and len(got) == len(value), (step, got)
                assert got == pytest.approx(value, rel=1e-12, abs=1e-15), (step, name)
            elif isinstance(value, float):
                assert got == pytest.approx(value, rel=1e-12, abs=1e-15), (step, name, got, value)
            else:
                assert got == value and type(got) is type(value), (step, name, got, value)


@pytest.mark.parametrize("last, first, old, new", [
    (422, 423, (0, 131_072, 896, 1, 3, 3, 1.0), (1, 262_144, 2048, 3, 7, 2, 1.52)),
    (846, 847, (1, 262_144, 2048, 3, 7, 2, None), (2, 393_216, 2048, 5, 11, 1, None)),
    (1269, 1270, (2, 393_216, 2048, 5, 11, 1, None), (3, 393_216, 2048, 6, 13, 1, 0.15)),
])
def test_stage_boundaries(record, last, first, old, new):
    for step, (stage, batch, doc_len, short, long, mtp_count, lr) in ((last, old), (first, new)):
        plan = R.step_plan(step, record)
        assert (plan.stage, plan.batch_tokens, plan.max_doc_len) == (stage, batch, doc_len)
        assert (plan.short_window_blocks, plan.long_window_blocks, len(plan.mtp_weights)) == (short, long, mtp_count)
        if lr is not None:
            assert plan.lr_factor == pytest.approx(lr)
    # a stage's weights start at their start values on its first step
    assert R.step_plan(0, record).mtp_weights == (1.0, 0.5, 0.25)
    assert R.step_plan(423, record).mtp_weights == (1.0, 0.5) and R.step_plan(423, record).prefix_weight == 0.25
    # and are one step short of their end values on its last step
    assert R.step_plan(422, record).mtp_weights[2] == pytest.approx(0.25 / 423)
    assert R.step_plan(846, record).mtp_weights[1] == pytest.approx(0.5 / 424)
    assert R.step_plan(846, record).prefix_weight == pytest.approx(0.25 / 424)
    # the cooldown starts at 508 (the stage multiplier until then), and the LR multiplier jumps at 847 inside it
    assert R.step_plan(507, record).lr_factor == 1.52 and R.step_plan(508, record).lr_factor == 1.52
    assert R.step_plan(509, record).lr_factor < 1.52
    assert R.step_plan(847, record).lr_factor > R.step_plan(846, record).lr_factor


def test_totals(record):
    plans = [R.step_plan(step, record) for step in range(record.num_iterations)]
    assert len(plans) == 1285
    assert sum(plan.batch_tokens for plan in plans) == 338_821_120
    assert sum(plan.untie_after for plan in plans) == 1
    assert [plan.step for plan in plans if plan.stage == 3] == list(range(1270, 1285))
    assert R.step_plan(1284, record).muon_momentum == pytest.approx(0.852)  # the last update: toward 0.85
    assert R.step_plan(1285, record).muon_momentum == pytest.approx(0.85)


def test_final_windows_and_warmup_steps(record, tiny):
    assert R.final_windows(record) == (6, 20)
    assert R.final_windows(tiny) == (6, 20)
    for s, boundaries, total in ((record, (423, 847, 1270), 1285), (tiny, (9, 17, 25), 28)):
        expected = {0, 1, s.split_step, s.split_step + 1}  # the untie step and the next: the untied graphs
        for boundary in boundaries:
            expected |= {boundary - 2, boundary - 1, boundary, boundary + 1}
        assert R.warmup_steps(s) == sorted(expected) and max(expected) < total


def test_tiny_preset_has_every_stage(tiny):
    R.check_schedule(tiny)
    plans = [R.step_plan(step, tiny) for step in range(tiny.num_iterations + 1)]
    assert {plan.stage for plan in plans} == {0, 1, 2, 3}
    assert [plan.stage for plan in plans].count(3) == tiny.extension_steps + 1  # + the final validation's
    assert sum(plan.untie_after for plan in plans) == 1
    for plan in plans:
        assert plan.slot_tokens * tiny.slots_per_step == plan.batch_tokens
        assert plan.slot_tokens % tiny.block_size == 0
        assert plan.long_window_blocks * tiny.block_size <= plan.slot_tokens
        assert len(plan.mtp_weights) == {0: 3, 1: 2, 2: 1, 3: 1}[plan.stage]
        # the preset's per-stage lists, the extension keeping the last stage's batch and document length
        assert plan.batch_tokens == [512, 1024, 1536, 1536][plan.stage]
        assert plan.max_doc_len == [112, 256, 256, 256][plan.stage]


def test_no_extension(record):
    s = R.parse_settings(["--extension_steps=0"])
    assert s.num_iterations == 1270
    final = R.step_plan(1270, s)  # the final validation: the extension's (empty) stage, at its end
    assert (final.stage, final.lr_factor, final.mtp_weights, final.adam_updates) == (3, 0.15, (1.0,), False)
    assert R.warmup_steps(s) == [0, 1, 421, 422, 423, 424, 845, 846, 847, 848]
    untie_away = R.parse_settings(["--split_step=1001"])
    assert {1001, 1002} <= set(R.warmup_steps(untie_away))
    assert R.step_plan(1269, s).stage == 2
    rows = R.schedule_table(s).splitlines()
    assert not any(row.startswith("extension") for row in rows) and any(row.startswith("2 ") for row in rows)


def test_stages_are_parsed_once_per_settings(record):
    assert R.stages(record) is R.stages(R.parse_settings([]))
    with pytest.raises(ValueError, match="outside"):
        R.step_plan(RECORD_STEPS + 1, record)
    with pytest.raises(ValueError, match="outside"):
        R.step_plan(-1, record)


BAD = [
    ("--stage_ends=423,847", "the recipe has 3 stages"),
    ("--stage_ends=423,847,1270,1300", "the recipe has 3 stages"),
    ("--stage_ends=423,400,1270", "must increase"),
    ("--stage_ends=423,847,847", "must increase"),
    ("--stage_ends=0,847,1270", "must increase"),
    ("--stage_ends=423,8x7,1270", "comma-separated whole numbers"),
    ("--stage_batch_tokens=131072,262144", "2 entries, but --stage_ends has 3"),
    ("--stage_lr=1,1.52,1.73,2", "4 entries, but --stage_ends has 3"),
    ("--stage_max_doc_len=896", "1 entries, but --stage_ends has 3"),
    ("--stage_windows=1/3,3/7", "2 entries, but --stage_ends has 3"),
    ("--stage_batch_tokens=131072,262144,393000", "not a positive multiple of --slots_per_step * --block_size = 1024"),
    ("--stage_batch_tokens=0,262144,393216", "not a positive multiple"),
    ("--stage_lr=1,abc,1.73", "comma-separated numbers"),
    ("--stage_lr=1,-0.5,1.73", "not a finite number >= 0"),
    ("--stage_lr=1,inf,1.73", "not a finite number >= 0"),
    ("--stage_max_doc_len=0,2048,2048", "is not positive"),
    ("--stage_max_doc_len=896,2048.5,2048", "comma-separated whole numbers"),
    ("--stage_windows=1-3,3/7,5/11", "short/long in blocks"),
    ("--stage_windows=1/3/5,3/7,5/11", "short/long in blocks"),
    ("--stage_windows=1/,3/7,5/11", "short/long in blocks"),
    ("--stage_windows=0/3,3/7,5/11", "at least 1 block"),
    ("--stage_windows=4/3,3/7,5/11", "must not exceed the long one"),
    ("--stage_windows=1/129,3/7,5/11", "longer than its stage's slot (128 blocks)"),
    ("--extension_windows=6/13,6/13", "one short/long pair"),
    ("--extension_windows=6/385", "longer than the last stage's slot (384 blocks)"),
    ("--extension_windows=6", "short/long in blocks"),
    ("--final_windows=6/2049", "longer than a validation sequence (--val_seq_len) (2048 blocks)"),
    ("--final_windows=6/20,6/20", "one short/long pair"),
    ("--final_windows=7/6", "must not exceed the long one"),
    ("--split_step=1285", "must be a training step"),
    ("--split_step=846", "must be odd"),
    ("--muon_momentum_warmup_steps=1236", "must not overlap"),
]


@pytest.mark.parametrize("argument, message", BAD)
def test_check_schedule_errors(argument, message):
    with pytest.raises(SettingsError) as error:
        R.parse_settings([argument])
    text = str(error.value)
    assert message in text and "\n" not in text and text.startswith("--")


@pytest.mark.parametrize("argument", [  # the limits themselves are fine
    "--stage_windows=1/128,3/7,5/11", "--extension_windows=6/384", "--final_windows=20/2048", "--split_step=1283",
    "--split_step=1", "--muon_momentum_warmup_steps=1235", "--stage_lr=0,1.52,1.73", "--cooldown_frac=1",
    "--cooldown_frac=0", "--muon_momentum_warmup_steps=0", "--muon_momentum_cooldown_steps=0",
])
def test_check_schedule_accepts_the_limits(argument):
    s = R.parse_settings([argument])
    for step in range(s.num_iterations + 1):
        plan = R.step_plan(step, s)
        assert 0 <= plan.lr_factor and 0 < plan.muon_momentum < 1


def test_cooldown_edges():
    whole = R.parse_settings(["--cooldown_frac=0"])  # the cooldown spans every scheduled step
    assert R.step_plan(0, whole).lr_factor == 1.0
    assert R.step_plan(635, whole).lr_factor == pytest.approx(1.52 * (1 - 635 / 1270) + 0.15 * 635 / 1270)
    none = R.parse_settings(["--cooldown_frac=1"])  # no cooldown: the floor from the extension on
    assert R.step_plan(1269, none).lr_factor == 1.73 and R.step_plan(1270, none).lr_factor == 0.15


def test_schedule_table_mentions_every_stage(record, tiny):
    table = R.schedule_table(record)
    lines = table.splitlines()
    for name, steps in (("0", "0-422 (423)"), ("1", "423-846 (424)"), ("2", "847-1269 (423)"),
                        ("extension", "1270-1284 (15)")):
        assert any(line.split()[:2] == [name, steps.split()[0]] and steps in line for line in lines), name
    for fact in ("338,821,120", "131,072", "262,144", "393,216", "1/3", "3/7", "5/11", "6/13", "6/20", "1.52",
                 "1.73", "0.25->0", "508", "847", "1235"):
        assert fact in table, fact
    tiny_table = R.schedule_table(tiny)
    for steps in ("0-8 (9)", "9-16 (8)", "17-24 (8)", "25-27 (3)"):
        assert steps in tiny_table
