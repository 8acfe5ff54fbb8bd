"""The shared real-data plumbing of the methods: `methods.common.datasets` (folder checks, the
``--bad-files`` policy) and `methods.common.hf` (local Hugging Face folders, nothing downloaded)."""

import json

import pytest

from methods.common.datasets import BAD_FILES, DataFileError, dataset_dir, load_each


def test_dataset_dir_names_flag_path_and_missing_entries(tmp_path):
    (tmp_path / "a").mkdir()
    assert dataset_dir(tmp_path, "--data-dir", "X", expect=["a"]) == tmp_path
    with pytest.raises(
        FileNotFoundError, match=r"--data-dir .*nope: no such folder \(the expected layout is in R\.md\)"
    ):
        dataset_dir(tmp_path / "nope", "--data-dir", "X", see="R.md")
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError, match="--data-dir .*f: not a folder"):
        dataset_dir(tmp_path / "f", "--data-dir", "X")
    with pytest.raises(FileNotFoundError, match="is not a UBFC folder: it has no b, c/d"):
        dataset_dir(tmp_path, "--data-dir", "UBFC", expect=["a", "b", "c/d"])
    with pytest.raises(ValueError, match="--data-dir: no folder given for X"):
        dataset_dir(None, "--data-dir", "X")


def _loader(bad):
    def load(i):
        if i in bad:
            raise DataFileError(f"file{i}.txt", "corrupt")
        return i * 10

    return load


def test_load_each_stop_skip_and_all_bad():
    assert BAD_FILES == ("stop", "skip")
    good, skipped = load_each(range(4), _loader(set()))
    assert good == [(0, 0), (1, 10), (2, 20), (3, 30)] and skipped == []

    with pytest.raises(DataFileError, match=r"^file2\.txt: corrupt \(--bad-files skip leaves this video out\)$") as e:
        load_each(range(4), _loader({2}), what="video")
    assert e.value.path == "file2.txt"

    warnings = []
    good, skipped = load_each(range(4), _loader({0, 2}), bad_files="skip", what="video", warn=warnings.append)
    assert good == [(1, 10), (3, 30)]
    assert [s.path for s in skipped] == ["file0.txt", "file2.txt"]
    assert warnings == ["warning: skipping video file0.txt: corrupt", "warning: skipping video file2.txt: corrupt"]

    with pytest.raises(ValueError, match=r"every video was skipped as unusable \(2\); the first: file0\.txt: corrupt"):
        load_each(range(2), _loader({0, 1}), bad_files="skip", what="video", warn=lambda m: None)
    with pytest.raises(ValueError, match="--bad-files must be one of stop, skip"):
        load_each([], _loader(set()), bad_files="ignore")
    # a bug in a loader is not a bad file: it propagates whatever the policy
    with pytest.raises(ZeroDivisionError):
        load_each([1], lambda i: i / 0, bad_files="skip")


def _tiny_llama(path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(29)}}
    t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def test_hf_local_folders(tmp_path):
    from methods.common import hf

    d = tmp_path / "llama"
    _tiny_llama(d)
    model, tok = hf.load_causal_lm(d, dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype.is_floating_point
    assert tok.pad_token == "</s>"  # no pad token of its own: eos serves as pad
    assert model.generation_config.pad_token_id == tok.pad_token_id == 2

    with pytest.raises(FileNotFoundError, match="--model .*missing: no such folder"):
        hf.load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model .*empty: no config.json"):
        hf.model_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--model .*empty: no weights"):
        hf.model_dir(tmp_path / "empty")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ValueError, match="needs its own code from the hub"):
        hf.model_dir(d, flag="--base")
    (d / "config.json").write_text(json.dumps(cfg))
    # a causal LM is not a vision-language model: the processor / model error names the folder
    with pytest.raises(ValueError, match=r"--model .*llama: "):
        hf.load_vlm(d)
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32, bfloat16, float16"):
        hf.load_causal_lm(d, dtype="float64")
