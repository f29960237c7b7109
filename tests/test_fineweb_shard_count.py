"""The README's main command downloads as many FineWeb shards as the default recipe (record 89) trains on, and
at most one more; every other download command for a full run (README, run.sh, Dockerfile) names the same count."""
import math
import re

import train_gpt as R
from conftest import REPO

SHARD_TOKENS = 100_000_000  # one FineWeb-10B training shard (200,001,024 bytes: a 1,024-byte header + uint16s)
FULL_RUN_FILES = ("README.md", "run.sh", "Dockerfile")


def schedule_tokens(s: R.Settings) -> int:
    return sum(R.step_plan(step, s).batch_tokens for step in range(s.num_iterations))


def main_command_shards() -> int:
    """N of `python data/cached_fineweb10B.py N && ./run.sh`, the main job in the README's first code block."""
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    [count] = re.findall(r"python data/cached_fineweb10B\.py (\d+) && \./run\.sh", first_block)
    return int(count)


def test_schedule_total_is_the_fact_sheets():
    # RECORDS_29_89.md 2.9: 131,072 tokens for steps 0-422, 262,144 for 423-846, 393,216 for 847-1284
    assert schedule_tokens(R.Settings()) == 131_072 * 423 + 262_144 * 424 + 393_216 * 438 == 338_821_120


def test_main_command_downloads_enough_shards_and_at_most_one_spare():
    need = math.ceil(schedule_tokens(R.Settings()) / SHARD_TOKENS)
    assert need <= main_command_shards() <= need + 1


def test_every_full_run_download_names_the_same_count():
    count = str(main_command_shards())
    for name in FULL_RUN_FILES:
        counts = set(re.findall(r"cached_fineweb10B\.py (\d+)", (REPO / name).read_text())) - {"1"}  # 1: CPU tries
        assert counts == {count}, f"{name}: {sorted(counts)}"
