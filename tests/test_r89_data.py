"""train_gpt.py section 7 (data loading): training batches against a token-by-token reference,
world-size independence, resume, validation batches and the bad-data errors, on synthetic shards."""
import dataclasses

import numpy as np
import pytest
import torch

import train_gpt as R
from conftest import write_shard

BOS = 50256
SLOTS = 8
# stage sizes of the synthetic runs: slot tokens 8, 16, 24; the last cap exceeds the buffer, so long
# documents are cut by the buffer's end as well as by the cap
BATCH_TOKENS, MAX_DOC_LENS = (64, 128, 192), (6, 12, 40)
STAGE_SIZES = [(tokens // SLOTS, cap) for tokens, cap in zip(BATCH_TOKENS, MAX_DOC_LENS)]
# per step: (slot_tokens, max_doc_len); 4 stage-1, 4 stage-2, 12 stage-3 steps cross both shard boundaries
SCHEDULE = [STAGE_SIZES[0]] * 4 + [STAGE_SIZES[1]] * 4 + [STAGE_SIZES[2]] * 12
CPU = torch.device("cpu")


def settings(tmp_path, **overrides) -> R.Settings:
    values = dict(slots_per_step=SLOTS, block_size=1, stage_batch_tokens=",".join(map(str, BATCH_TOKENS)),
                  stage_max_doc_len=",".join(map(str, MAX_DOC_LENS)), val_seq_len=32, val_tokens=128,
                  train_files=str(tmp_path / "train_*.bin"), val_files=str(tmp_path / "val_*.bin"))
    return dataclasses.replace(R.Settings(), **{**values, **overrides})


def runtime(rank: int = 0, world_size: int = 1) -> R.Runtime:
    return R.Runtime(rank, world_size, CPU, "explicit", False)


def documents(lengths, generator, prefix: int = 0) -> list[int]:
    """prefix tokens outside any document, then one document per length: BOS and length - 1 other tokens."""
    tokens = list(generator.integers(0, 1000, prefix))
    for length in lengths:
        tokens += [BOS] + list(generator.integers(0, 1000, length - 1))
    return [int(token) for token in tokens]


@pytest.fixture
def shards(tmp_path):
    """Two training shards with known document lengths (1 to 60 tokens; the first shard starts with three
    tokens before its first BOS and ends with a one-token document); returns (settings, token lists)."""
    generator = np.random.default_rng(0)
    first = documents(list(generator.integers(1, 61, 30)) + [1], generator, prefix=3)
    second = documents(generator.integers(1, 61, 40), generator)
    write_shard(tmp_path / "train_000001.bin", first)
    write_shard(tmp_path / "train_000002.bin", second)
    write_shard(tmp_path / "val_000000.bin", documents(generator.integers(1, 40, 30), generator, prefix=5))
    return settings(tmp_path), [first, second]


def reference_step(tokens: list[int], position: int, slot_tokens: int, max_doc_len: int):
    """One step cut by walking the tokens one by one: per slot (buffer, piece number of each token), and the
    position after the step; None when the shard's tokens run out first."""
    slots = []
    for _ in range(SLOTS):
        buffer, piece_of = [], []
        pieces = 0
        while len(buffer) < slot_tokens + 1:
            while position < len(tokens) and tokens[position] != BOS:  # skip to the next document start
                position += 1
            if position == len(tokens):
                return None
            pieces += 1
            piece_length = 0
            while (position < len(tokens) and len(buffer) < slot_tokens + 1 and piece_length < max_doc_len
                   and (piece_length == 0 or tokens[position] != BOS)):
                buffer.append(tokens[position])
                piece_of.append(pieces)
                position += 1
                piece_length += 1
        slots.append((buffer, piece_of))
    return slots, position


def reference_stream(shard_tokens: list[list[int]], schedule) -> list[tuple[int, list]]:
    """Per step: (shard used, its slots); a step that does not fit in the rest of a shard starts the next."""
    shard, position, steps = 0, 0, []
    for slot_tokens, max_doc_len in schedule:
        cut = reference_step(shard_tokens[shard], position, slot_tokens, max_doc_len)
        if cut is None:
            shard, position = (shard + 1) % len(shard_tokens), 0
            cut = reference_step(shard_tokens[shard], position, slot_tokens, max_doc_len)
        slots, position = cut
        steps.append((shard, slots))
    return steps


def loader_steps(s, world_size: int, schedule, state=None) -> list[list[R.Batch]]:
    """Per step, the batches of slots 0..7 as the ranks of world_size loaders return them."""
    loaders = [R.DocumentLoader(R.harness.find_shards(s.train_files, "train_files"), s, runtime(rank, world_size),
                                state) for rank in range(world_size)]
    steps = []
    for slot_tokens, max_doc_len in schedule:
        by_slot = {}
        for rank, loader in enumerate(loaders):
            for slot in runtime(rank, world_size).slots(s):
                by_slot[slot] = loader.next_batch(slot_tokens, max_doc_len)
        steps.append([by_slot[slot] for slot in range(SLOTS)])
    return steps


def assert_same_batch(batch: R.Batch, other: R.Batch):
    for name in ("inputs", "targets", "document_ids"):
        assert torch.equal(getattr(batch, name), getattr(other, name)), name


def test_training_batches_match_a_token_by_token_reference(shards):
    s, shard_tokens = shards
    expected = reference_stream(shard_tokens, SCHEDULE)
    used = [shard for shard, _ in expected]
    assert sum(a != b for a, b in zip(used, used[1:])) >= 2, "the schedule must cross shard boundaries both ways"
    longest = max(max(np.diff([i for i, t in enumerate(tokens) if t == BOS])) for tokens in shard_tokens)
    assert longest > max(slot_tokens for slot_tokens, _ in STAGE_SIZES) + 1, "a document must exceed a buffer"
    for step, (batches, (_, slots)) in enumerate(zip(loader_steps(s, 1, SCHEDULE), expected)):
        slot_tokens = SCHEDULE[step][0]
        for slot, (batch, (buffer, piece_of)) in enumerate(zip(batches, slots)):
            where = f"step {step} slot {slot}"
            assert batch.inputs.dtype == torch.int32 and batch.targets.dtype == torch.int64, where
            assert batch.document_ids.dtype == torch.int32, where
            assert batch.inputs.shape == batch.targets.shape == batch.document_ids.shape == (slot_tokens,), where
            assert batch.inputs.tolist() == buffer[:-1], where
            assert batch.targets.tolist() == buffer[1:], where
            assert batch.document_ids.tolist() == piece_of[:-1], where


def test_cut_positions_match_the_reference(shards):
    """The pieces of every slot (start position and length) for each stage's sizes from a fresh shard."""
    s, shard_tokens = shards
    shard = R.IndexedShard(R.harness.find_shards(s.train_files, "train_files")[0],
                           torch.tensor(shard_tokens[0], dtype=torch.int32).to(torch.uint16))
    for slot_tokens, max_doc_len in STAGE_SIZES:
        step, _ = R.cut_step(shard, 0, SLOTS, slot_tokens, max_doc_len)
        reference, _ = reference_step(shard_tokens[0], 0, slot_tokens, max_doc_len)
        for (starts, lengths), (buffer, piece_of) in zip(step, reference):
            # a piece starts where the reference's piece number changes
            reference_lengths = np.bincount(piece_of)[1:]
            assert lengths.tolist() == reference_lengths.tolist()
            assert [shard_tokens[0][start] for start in starts] == [BOS] * len(starts)
            assert sum(lengths) == slot_tokens + 1 and max(lengths) <= max_doc_len
            pieces = [shard_tokens[0][start:start + length] for start, length in zip(starts, lengths)]
            assert sum(pieces, []) == buffer


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_ranks_together_see_what_one_rank_sees(shards, world_size):
    s, _ = shards
    for step, (one_rank, many_ranks) in enumerate(zip(loader_steps(s, 1, SCHEDULE),
                                                      loader_steps(s, world_size, SCHEDULE))):
        for slot in range(SLOTS):
            assert_same_batch(one_rank[slot], many_ranks[slot])


@pytest.mark.parametrize("steps_before", [2, 4, 8, 10])  # mid-shard; stage changes at 4 and 8; 10: after a switch
def test_resume_continues_the_identical_stream(shards, steps_before):
    s, _ = shards
    files = R.harness.find_shards(s.train_files, "train_files")
    loader = R.DocumentLoader(files, s, runtime())
    for slot_tokens, max_doc_len in SCHEDULE[:steps_before]:
        for _ in range(SLOTS):
            loader.next_batch(slot_tokens, max_doc_len)
    state = loader.state()
    assert set(state) == {"file_index", "file", "position"}
    uninterrupted = [[loader.next_batch(*sizes) for _ in range(SLOTS)] for sizes in SCHEDULE[steps_before:]]
    for world_size in (1, 2):  # a resumed run may use another world size
        resumed = loader_steps(s, world_size, SCHEDULE[steps_before:], state)
        for step, (expected, got) in enumerate(zip(uninterrupted, resumed)):
            for slot in range(SLOTS):
                assert_same_batch(got[slot], expected[slot])


def test_state_and_sizes_are_refused_in_the_middle_of_a_step(shards):
    s, _ = shards
    loader = R.DocumentLoader(R.harness.find_shards(s.train_files, "train_files"), s, runtime(0, 2))
    loader.next_batch(*STAGE_SIZES[0])
    with pytest.raises(RuntimeError, match="middle of a step"):
        loader.state()
    with pytest.raises(ValueError, match="within a step"):
        loader.next_batch(*STAGE_SIZES[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_batches_cover_the_same_sequences_on_any_world_size(shards, world_size):
    s, _ = shards
    _, val_tokens = R.check_data(s)
    tokens = val_tokens.tolist()
    assert len(tokens) == s.val_tokens + 1 and val_tokens.dtype == torch.int32
    sequences = s.val_tokens // s.val_seq_len
    expected = []
    for i in range(sequences):
        window = tokens[i * s.val_seq_len:(i + 1) * s.val_seq_len + 1]
        ids, count = [], 0
        for token in window[:-1]:
            count += token == BOS
            ids.append(count)
        expected.append((window[:-1], window[1:], ids))
    one_rank = list(R.validation_batches(val_tokens, s, runtime()))
    by_rank = [list(R.validation_batches(val_tokens, s, runtime(rank, world_size))) for rank in range(world_size)]
    assert len(one_rank) == sequences == sum(len(batches) for batches in by_rank)
    for i, (inputs, targets, ids) in enumerate(expected):
        for batch in (one_rank[i], by_rank[i % world_size][i // world_size]):
            assert batch.inputs.tolist() == inputs and batch.targets.tolist() == targets
            assert batch.document_ids.tolist() == ids
            assert batch.targets.dtype == torch.int64 and batch.document_ids.dtype == torch.int32
    assert any(batch.document_ids[0] == 0 for batch in one_rank), "a sequence must start inside a document"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_equal_the_cpu_batches_without_a_host_sync(shards):
    """On CUDA: pinned buffers, non-blocking copies and document ids on the device; a host sync raises."""
    s, _ = shards
    files = R.harness.find_shards(s.train_files, "train_files")
    _, val_tokens = R.check_data(s)
    cuda = R.Runtime(0, 1, torch.device("cuda", 0), "flex", False)
    on_cpu, on_cuda = R.DocumentLoader(files, s, runtime()), R.DocumentLoader(files, s, cuda)
    expected = [on_cpu.next_batch(*sizes) for sizes in SCHEDULE for _ in range(SLOTS)]
    expected += list(R.validation_batches(val_tokens, s, runtime()))
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [on_cuda.next_batch(*sizes) for sizes in SCHEDULE for _ in range(SLOTS)]
        got += list(R.validation_batches(val_tokens, s, cuda))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for batch, reference in zip(got, expected, strict=True):
        assert batch.inputs.device.type == "cuda"
        assert_same_batch(R.Batch(batch.inputs.cpu(), batch.targets.cpu(), batch.document_ids.cpu()), reference)


def test_check_data_returns_the_files_and_validation_tokens(shards, tmp_path):
    s, _ = shards
    train_files, val_tokens = R.check_data(s)
    assert [path.name for path in train_files] == ["train_000001.bin", "train_000002.bin"]
    assert val_tokens.numel() == s.val_tokens + 1


# ----------------------------------------------------------------------------------------------------
# Bad data: one-line DataErrors naming the file and the fix


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(R.DataError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_shard_without_bos_is_refused_first_or_when_read_ahead(shards, tmp_path):
    s, shard_tokens = shards
    no_bos = write_shard(tmp_path / "train_000003.bin", np.random.default_rng(1).integers(0, 1000, 2000))
    one_line_error(lambda: R.DocumentLoader([no_bos], s, runtime()), str(no_bos), "no BOS", "data/fineweb.py")
    files = R.harness.find_shards(s.train_files, "train_files")  # the good first file, then the bad one
    loader = R.DocumentLoader([files[0], no_bos], s, runtime())

    def run_past_the_first_shard():
        for sizes in SCHEDULE:
            for _ in range(SLOTS):
                loader.next_batch(*sizes)
    one_line_error(run_past_the_first_shard, str(no_bos), "no BOS")


def test_a_shard_too_small_for_a_step_is_refused_up_front(shards, tmp_path):
    s, _ = shards
    largest_step = SLOTS * (max(BATCH_TOKENS) // SLOTS + 1)
    small = write_shard(tmp_path / "train_000003.bin", documents([largest_step - 1], np.random.default_rng(2)))
    one_line_error(lambda: R.check_data(s), str(small), "fewer than one training step", "--stage_batch_tokens")
    write_shard(small, documents([largest_step], np.random.default_rng(2)))  # now exactly one step's tokens
    R.check_data(s)


def test_a_shard_whose_documents_cannot_fill_a_step_is_refused(shards, tmp_path):
    """Enough tokens, but two long documents: cut at the stage-1 cap they give 12 of the 72 tokens needed."""
    s, _ = shards
    few = write_shard(tmp_path / "train_000003.bin", documents([300, 300], np.random.default_rng(3)))
    R.check_data(s)  # the header check passes; the documents are checked when the shard is read
    one_line_error(lambda: R.DocumentLoader([few], s, runtime()), str(few), "do not fill one training step",
                   f"cut at {MAX_DOC_LENS[0]} tokens")


def test_a_token_outside_the_vocabulary_is_refused(shards, tmp_path):
    s, _ = shards
    tokens = documents([50] * 20, np.random.default_rng(4))
    tokens[77] = s.vocab_size
    bad = write_shard(tmp_path / "train_000003.bin", tokens)
    one_line_error(lambda: R.DocumentLoader([bad], s, runtime()), str(bad))


def test_short_validation_data_is_refused(shards, tmp_path):
    s, _ = shards
    val = tmp_path / "val_000000.bin"
    write_shard(val, documents([20], np.random.default_rng(5)))  # 20 tokens: less than one sequence + 1
    one_line_error(lambda: R.check_data(s), str(val), "fewer than one validation sequence", "--val_seq_len")
    write_shard(val, documents([100], np.random.default_rng(5)))  # 3 whole sequences, not 4
    one_line_error(lambda: R.check_data(s), str(val), "--val_tokens=96")


def test_validation_files_among_the_training_files_are_refused(shards, tmp_path):
    s, _ = shards
    s = dataclasses.replace(s, val_files=str(tmp_path / "train_000001.bin"))
    one_line_error(lambda: R.check_data(s), "--allow_val_in_train")


def test_resuming_with_other_training_files_is_refused(shards, tmp_path):
    s, _ = shards
    files = R.harness.find_shards(s.train_files, "train_files")
    loader = R.DocumentLoader(files, s, runtime())
    for _ in range(SLOTS):
        loader.next_batch(*STAGE_SIZES[0])
    state = loader.state()
    one_line_error(lambda: R.DocumentLoader(files[::-1], s, runtime(), state), state["file"], "--train_files")
    one_line_error(lambda: R.DocumentLoader(files[:0] + files[1:], s, runtime(), state), "--train_files")
    moved = {**state, "position": state["position"] + 1}
    one_line_error(lambda: R.DocumentLoader(files, s, runtime(), moved), str(files[0]), "not a document start")
