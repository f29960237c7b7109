"""A newcomer's first hour: the test-data lookup says how to provide missing data, the first-contact path
(own text -> shards -> tiny preset) is accepted by the trainer, and the README and run.sh point at it."""
import dataclasses
import os
import sys

import pytest

import benchmark as B
import train_gpt as T
import harness as H
from conftest import REPO, TEST_DATA_ENV, data_root, enwiki_dir, run_process, shard_paths, tiktoken_cache

sys.path.insert(0, str(REPO / "data"))
import fineweb  # noqa: E402


def test_data_lookup_pointed_at_an_empty_folder_skips_with_the_documented_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    for lookup, missing in ((enwiki_dir, "no enwiki shards"), (tiktoken_cache, "no tiktoken cache"),
                            (lambda: shard_paths(fineweb_dir=tmp_path / "fineweb10B"), "no FineWeb shards")):
        with pytest.raises(pytest.skip.Exception) as skipped:
            lookup()
        reason = str(skipped.value)
        assert reason.startswith("test data missing: ") and missing in reason and str(tmp_path) in reason
        assert TEST_DATA_ENV in reason and "README, 'Test data'" in reason
    assert "python data/cached_fineweb10B.py 1" in str(skipped.value)
    readme = (REPO / "README.md").read_text()
    assert "### Test data" in readme and TEST_DATA_ENV in readme


def test_fineweb_shards_stand_in_for_the_enwiki_shards(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_DATA_ENV, str(tmp_path / "empty"))
    fineweb_dir = tmp_path / "fineweb10B"
    fineweb_dir.mkdir()
    for name in ("fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        (fineweb_dir / name).write_bytes(b"")
    assert shard_paths(fineweb_dir=fineweb_dir) == (str(fineweb_dir / "fineweb_train_000001.bin"),
                                                    str(fineweb_dir / "fineweb_val_000000.bin"))


def test_benchmark_defaults_come_from_the_same_lookup(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TEST_DATA_ENV, str(tmp_path))
    reason = B.default_data()
    assert isinstance(reason, str) and f"no enwiki shards in {tmp_path / 'enwiki'}" in reason
    assert B.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cached_fineweb10B.py 1" in err and "--train-files" in err


def test_own_text_to_a_tiny_run_is_accepted_by_the_trainer(tmp_path, monkeypatch, capsys):
    """The first-contact path on a folder of text: data/fineweb.py with its defaults, then the tiny
    preset on the result (checked with --check_only=true: settings, memory, every shard, log folder)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache()))
    text = enwiki_dir() / "text"
    out = tmp_path / "mytext"
    assert fineweb.main([str(text / "wiki_00.gz"), str(text / "wiki_01.gz"), "--output_dir", str(out)]) == 0
    code = T.main(["--preset=tiny", f"--train_files={out}/mytext_train_*.bin", f"--val_files={out}/mytext_val_*.bin",
                   f"--log_dir={tmp_path / 'logs'}", "--check_only=true"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "checked: settings, memory, 1 training file(s)" in captured.out


def test_readme_and_run_sh_give_a_first_contact_path_and_the_cpu_torch_wheel():
    readme = (REPO / "README.md").read_text()
    run_sh = (REPO / "run.sh").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    for text in (readme, run_sh):
        assert "python data/cached_fineweb10B.py 1" in text and "python train_gpt.py --preset=tiny" in text
    assert "TIKTOKEN_CACHE_DIR" in readme[:readme.index("## Running it")]
    assert os.access(REPO / "run.sh", os.X_OK)


def test_sample_and_hellaswag_without_a_tokenizer_cache_name_tiktoken_cache_dir(tmp_path):
    """An empty TIKTOKEN_CACHE_DIR and no network (a proxy on a closed port): one line, exit status 2."""
    settings = T.parse_settings(["--preset=tiny", "--compile=false"])
    checkpoint = tmp_path / "model.pt"
    H.write_checkpoint(checkpoint, dict(settings=dataclasses.asdict(settings),
                                        model=T.build_model(settings, T.resolve_runtime(settings, 0, 1, 0)).state_dict()))
    (tmp_path / "val.jsonl").write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n')
    (tmp_path / "empty_cache").mkdir()
    offline = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "OMP_NUM_THREADS": "1",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    for command in (["sample.py", str(checkpoint), "--device=cpu"],
                    ["evals/hellaswag.py", str(checkpoint), f"--file={tmp_path / 'val.jsonl'}", "--device=cpu"]):
        result = run_process([sys.executable, *command], timeout=300, cwd=REPO, env=offline)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot load tiktoken's gpt2 tokenizer")
        assert f"not in TIKTOKEN_CACHE_DIR={tmp_path / 'empty_cache'}" in result.stderr
    readme = (REPO / "README.md").read_text()
    for heading in ("- **Sampling.**", "- **HellaSwag.**"):
        assert "TIKTOKEN_CACHE_DIR" in readme[readme.index(heading):].split("\n- **")[0], heading
