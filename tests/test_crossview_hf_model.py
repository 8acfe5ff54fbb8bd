"""crossview_defense on a local Hugging Face vision-language checkpoint (``--model PATH``).

The fixture is a tiny random LLaVA-1.5-style folder written with ``save_pretrained``: a
`LlavaForConditionalGeneration` (CLIP vision tower 32 x 32 with 8 x 8 patches, 16 image tokens; a
one-layer Llama), and a `LlavaProcessor` (a `CLIPImageProcessor` at 32 px, a fast word-level
tokenizer that adds <s>, with an <image> token and LLaVA-1.5's chat template). Nothing touches the
network. Torch's seed is fixed (0) where weights are drawn.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from methods.crossview_defense import data as D  # noqa: E402
from methods.crossview_defense import train as TR  # noqa: E402
from methods.crossview_defense.codec import ProcessorCodec, ToyCodec, normalise  # noqa: E402
from methods.crossview_defense.model import VLMAdapter, load_codec, load_pretrained  # noqa: E402

SIZE, PATCH = 32, 8
N_IMG = (SIZE // PATCH) ** 2
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PAD, BOS, EOS, IMAGE = 0, 2, 3, 4
# LLaVA-1.5's chat template (llava-hf/llava-1.5-7b-hf), less its assistant-turn markers
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _vocab():
    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for w in D.vocabulary() + ["USER", "ASSISTANT", ":"]:
        vocab.setdefault(w, len(vocab))
    return vocab


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def _text_config(vocab_size):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def write_llava(path, crop=SIZE, image_processor=True, template=True, processor_patch=PATCH):
    """A tiny random LLaVA-1.5-style folder at `path` (the processor's image size `crop`)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = _tokenizer()
    vc = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=PATCH,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=_text_config(len(tok)),
        image_token_index=IMAGE,
        image_seq_length=N_IMG,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    if image_processor:
        ip = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
        LlavaProcessor(
            image_processor=ip,
            tokenizer=tok,
            patch_size=processor_patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=TEMPLATE if template else None,
        ).save_pretrained(path)
    else:
        tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return write_llava(tmp_path_factory.mktemp("hf") / "tiny-llava")


@pytest.fixture(scope="module")
def loaded(llava_dir):
    return load_pretrained(llava_dir)


@pytest.fixture(scope="module")
def examples():
    return D.make_examples(6, seed=3)


# --------------------------------------------------------------------------------------------
# The loader and the processor's codec
# --------------------------------------------------------------------------------------------
def test_loader_gives_the_model_and_the_codec_of_its_processor(loaded, llava_dir):
    from transformers import LlavaForConditionalGeneration

    model, codec = loaded
    assert isinstance(model, LlavaForConditionalGeneration) and isinstance(codec, ProcessorCodec)
    ad = VLMAdapter(model)
    assert (ad.image_size, ad.patch_size, codec.image_size) == (SIZE, PATCH, SIZE)
    assert (codec.pad_id, codec.eos_id, codec.tokens_per_word) == (PAD, EOS, 1)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # --dtype auto: the checkpoint's
    bf16, _ = load_pretrained(llava_dir, dtype="bfloat16")
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16
    again = load_codec(llava_dir, SIZE)  # the processor alone, for evaluation
    assert (
        again.collate(D.make_examples(2, 0))["input_ids"].tolist()
        == codec.collate(D.make_examples(2, 0))["input_ids"].tolist()
    )


def test_codec_prompts_answers_labels_and_pixels(loaded, examples):
    """The chat template's prompt, the image token expanded by the processor, the answer and </s> as
    the only labels, right padding for training and left padding for generation, pixel values from
    the CLIP image processor at the tower's size."""
    from transformers import CLIPImageProcessor

    _, codec = loaded
    vocab = _vocab()
    b = codec.collate(examples)
    assert b["pixel_values"].shape == (len(examples), 3, SIZE, SIZE)
    for i, ex in enumerate(examples):
        prompt = [BOS, vocab["USER"], vocab[":"]] + [IMAGE] * N_IMG
        prompt += [vocab[w] for w in ex.prompt] + [vocab["ASSISTANT"], vocab[":"]]
        answer = [vocab[w] for w in ex.answer] + [EOS]
        n = len(prompt) + len(answer)
        assert b["input_ids"][i, :n].tolist() == prompt + answer
        assert b["labels"][i, :n].tolist() == [-100] * len(prompt) + answer
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert (b["input_ids"][i, n:] == PAD).all() and (b["labels"][i, n:] == -100).all()
    gen = codec.collate(examples, with_answers=False, pad_left=True)
    assert (gen["labels"] == -100).all() and (
        gen["input_ids"][:, -2:] == torch.tensor([vocab["ASSISTANT"], vocab[":"]])
    ).all()
    lengths = gen["attention_mask"].sum(1)
    for i in range(len(examples)):  # the padding comes first
        assert gen["attention_mask"][i].tolist() == [0] * (gen["input_ids"].shape[1] - lengths[i]) + [1] * lengths[i]
    # pixel values: the CLIP image processor on the uint8 image (48 px resized to 32, its mean and std)
    ip = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    img = (examples[0].image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    ref = torch.as_tensor(ip(images=[img], return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(b["pixel_values"][:1], ref)
    # an empty answer has no label at all
    empty = codec.collate([D.Example(examples[0].image, "caption", ["describe"], [])])
    assert (empty["labels"] == -100).all()


def test_codec_decodes_up_to_eos_as_lower_case_words(loaded):
    _, codec = loaded
    vocab = _vocab()
    ids = [vocab["a"], vocab["photo"], vocab["of"], vocab["a"], vocab["banana"], EOS, vocab["red"]]
    assert codec.decode(ids) == "a photo of a banana"
    assert codec.decode([vocab["USER"], vocab[":"], IMAGE, vocab["red"]]) == "user red"  # specials skipped
    assert normalise("  A Red circle, on the LEFT. ") == "a red circle on the left"
    assert codec.answer_budget(3) == 3  # one token per word with this tokenizer


def test_the_toy_codec_is_the_data_collate(examples):
    toy = ToyCodec(36)
    for kw in ({}, {"with_answers": False, "pad_left": True}):
        a, b = toy.collate(examples, **kw), D.collate(examples, 36, **kw)
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert toy.decode(D.encode_words(["a", "red", "circle"]) + [D.EOS, 7]) == "a red circle"
    assert (toy.pad_id, toy.eos_id, toy.answer_budget(14)) == (D.PAD, D.EOS, 14)


def test_defense_and_generation_run_on_the_checkpoint(loaded, examples):
    """One step of the cross-view loss reaches the model's weights; generation decodes strings."""
    from methods.crossview_defense.defense import CrossViewDefense, DefenseConfig

    model, codec = loaded
    model.train()
    d = CrossViewDefense(model, DefenseConfig(), seed=0)
    loss, stats = d.loss(codec.collate(examples))
    assert torch.isfinite(loss) and stats["answer_tokens"] > 0
    model.zero_grad()
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    out = VLMAdapter(model).generate(examples[:3], max_new_tokens=4, batch=2, codec=codec)
    assert len(out) == 3 and all(isinstance(t, str) and len(t.split()) <= 4 for t in out)


# --------------------------------------------------------------------------------------------
# The CLI on the checkpoint: attack (plain poisoned fine-tuning), defense, eval
# --------------------------------------------------------------------------------------------
SHORT = [
    "--n-train",
    "20",
    "--n-test",
    "3",
    "--batch",
    "4",
    "--log-every",
    "1",
    "--no-progress",
    "--device",
    "cpu",
    "--max-new-tokens",
    "4",
]


def _main(argv):
    from methods.crossview_defense.__main__ import main

    return main(argv)


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_cli_attack_then_defense_then_eval(llava_dir, tmp_path, monkeypatch, capsys):
    """Plain fine-tuning on BadNet-poisoned data, then the cross-view defense against the text+image
    attack in bfloat16, then eval of that run: through the CLI, two steps each."""
    monkeypatch.setenv("PYOPS_CACHE", str(tmp_path / "cache"))
    attack = str(tmp_path / "plain")
    assert _main(["train", "--model", llava_dir, "--out", attack, *SHORT, "--steps", "2", "--defense", "plain"]) == 0
    res = _json(os.path.join(attack, "results.json"))
    assert {"asr", "bleu4", "cider", "vqa_acc"} <= set(res["results"])
    assert (res["config"]["model_path"], res["config"]["dtype"], res["config"]["attack"]) == (
        llava_dir,
        "auto",
        "badnet",
    )
    log = open(os.path.join(attack, "log.txt")).read()
    assert f"--model {llava_dir}: LlavaForConditionalGeneration in float32, images 32 x 32" in log
    assert "20 training examples, 1 poisoned (badnet, ratio 0.05)" in log
    assert not (tmp_path / "cache").exists()  # no base model is pretrained or cached

    defended = str(tmp_path / "crossview")
    args = ["train", "--model", llava_dir, "--out", defended, *SHORT, "--defense", "crossview", "--attack", "textimage"]
    assert _main([*args, "--steps", "2", "--dtype", "bfloat16"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(defended, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1] and all("div" in r for r in rows)
    ckpt = torch.load(sorted(glob.glob(os.path.join(defended, "checkpoints", "ckpt_*.pt")))[-1], weights_only=False)
    model, _ = load_pretrained(llava_dir)
    assert set(ckpt["model"]) == set(model.state_dict())
    assert ckpt["model"]["lm_head.weight"].dtype == torch.bfloat16
    assert (ckpt["config"]["model_path"], ckpt["config"]["dtype"]) == (llava_dir, "bfloat16")
    # the run's checkpoints cannot be resumed in another dtype (the error names the field)
    capsys.readouterr()
    assert _main([*args, "--steps", "3", "--dtype", "float32"]) == 2
    assert "dtype: 'bfloat16' in the checkpoint, 'float32' now" in capsys.readouterr().err

    # eval reloads the checkpoint's architecture and processor from the folder, then the run's weights
    assert _main(["eval", "--out", defended, "--device", "cpu", "--n-test", "2", "--eval-batch", "1"]) == 0
    res = _json(os.path.join(defended, "results.json"))
    assert res["config"]["n_test"] == 2 and {"asr", "bleu4", "vqa_acc"} <= set(res["results"])


def test_runs_of_the_small_llava_keep_their_checkpoint_config():
    """Without --model the checkpoint's config has the keys it had before --model existed (a resume of
    an older run compares equal), and reads back to the same TrainConfig."""
    cfg = TR.TrainConfig()
    saved = TR.resume_config(cfg)
    assert not {"model_path", "dtype", "eval_batch"} & set(saved)
    assert TR.config_from_checkpoint(saved) == cfg
    hf = TR.TrainConfig(model_path="/x", dtype="bfloat16")
    assert {k: TR.resume_config(hf)[k] for k in ("model_path", "dtype")} == {"model_path": "/x", "dtype": "bfloat16"}
    assert TR.config_from_checkpoint(TR.resume_config(hf)) == hf


# --------------------------------------------------------------------------------------------
# Bad folders: one error line naming the path, exit status 2
# --------------------------------------------------------------------------------------------
def _causal_lm(path):
    from transformers import LlamaForCausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(_text_config(len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _no_config(path):
    os.makedirs(path)
    open(os.path.join(path, "model.safetensors"), "wb").close()
    return str(path)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: str(p), ["no such folder"]),
        (_no_config, ["no config.json"]),
        (_causal_lm, ["processor has no tokenizer and image processor"]),
        (lambda p: write_llava(p, image_processor=False), ["cannot load its processor"]),
        (lambda p: write_llava(p, crop=40), ["(1, 3, 40, 40)", "(1, 3, 32, 32)"]),
        (lambda p: write_llava(p, processor_patch=16), ["puts 4 image tokens", f"gives {N_IMG} image features"]),
    ],
    ids=["missing", "no-config", "causal-lm", "no-image-processor", "wrong-image-size", "wrong-image-tokens"],
)
def test_bad_model_folders_are_one_clear_error(tmp_path, capsys, make, words):
    path = make(tmp_path / "model")
    capsys.readouterr()
    assert _main(["train", "--model", path, "--out", str(tmp_path / "r"), *SHORT, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # (after transformers' progress bar where the weights were loaded)
    assert line.startswith(f"error: --model {path}") and "Traceback" not in err, err
    assert all(w in line for w in words), err


def test_float16_and_dtype_without_model_are_refused(llava_dir, tmp_path, capsys):
    out = ["--out", str(tmp_path / "r"), *SHORT, "--steps", "1"]
    assert _main(["train", "--model", llava_dir, "--dtype", "float16", *out]) == 2
    err = capsys.readouterr().err
    assert f"--model {llava_dir}" in err and "float16" in err and "bfloat16" in err
    assert _main(["train", "--dtype", "bfloat16", *out]) == 2
    assert "--dtype bfloat16 needs --model" in capsys.readouterr().err


def test_without_a_chat_template_the_prompt_is_llava_15s(tmp_path, examples):
    path = write_llava(tmp_path / "plain", template=False)
    _, codec = load_pretrained(path)
    assert (
        not codec.chat and codec.prompt_text(examples[0]) == f"USER: <image>\n{' '.join(examples[0].prompt)} ASSISTANT:"
    )
    vocab = _vocab()
    ids = codec.collate(examples[:1])["input_ids"][0].tolist()
    assert ids[: 3 + N_IMG] == [BOS, vocab["USER"], vocab[":"]] + [IMAGE] * N_IMG
