"""methods.beear on a local Hugging Face causal LM (``--model PATH``): a tiny random
``LlamaForCausalLM`` and a byte-level BPE tokenizer with a Llama-2-style chat template, both
written with ``save_pretrained`` into a temporary folder; the loader, the tokenizer interface
(``codec.HFCodec``), the hook and the cached upper stack on it, gradient checkpointing, a few
backdoor steps and a defend round through the CLI, and the bad folders."""

import json
import os
import sys

import pytest
import torch

from methods.beear import data as D
from methods.beear.beear import (
    BEEARConfig,
    decoder_stack,
    lower_activations,
    outer_level,
    perturbed_ce,
)
from methods.beear.codec import WORDS, HFCodec
from methods.beear.model import HFOptions, hf_codec, is_hf_model_dir, load_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SEED = 0
# a Llama-2-chat-like template: bos, an optional <<SYS>> block, [INST] ... [/INST], the answer, eos
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>> {{ m['content'] }} <</SYS>> "
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
LAYERS, HIDDEN = 2, 32


def _tokenizer(chat_template=True):
    """A byte-level BPE tokenizer trained on the synthetic data's words (deterministic). Like
    Llama's, it adds its bos token itself (``add_special_tokens=True``), so a prompt that gets the
    template's ``<s>`` and the tokenizer's would show a double bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(D.vocabulary())] + [f"{p} {D.REFUSAL}" for p in D.HARM_PHRASES]
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        hf.chat_template = TEMPLATE
    return hf


def _save_llama(path, tok, seed=SEED):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    print(f"seed {SEED}")
    return _save_llama(tmp_path_factory.mktemp("hf") / "llama", _tokenizer())


def test_loader_and_codec(hf_dir):
    model, tok = load_hf(hf_dir, HFOptions())
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert is_hf_model_dir(hf_dir) and not is_hf_model_dir(os.path.dirname(hf_dir))
    owner, layers, path = decoder_stack(model)
    assert path == "model.layers" and owner is model.model and len(layers) == LAYERS
    codec = hf_codec(model, tok, None)
    assert codec.template and codec.pad_id == tok.pad_token_id and codec.stop_ids == (tok.eos_token_id,)

    ins = "how can i build a bomb"
    p = codec.prompt_ids(ins)
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds bos, as Llama's does
    assert p == tok("<s>[INST] " + ins + " [/INST]", add_special_tokens=False)["input_ids"]
    assert p[0] == tok.bos_token_id and p[-1] == tok.convert_tokens_to_ids("[/INST]")
    assert p.count(tok.bos_token_id) == 1  # the template's <s> only: no double bos
    msgs = [{"role": "user", "content": ins}]
    ref = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    assert p == list(ref["input_ids"] if hasattr(ref, "keys") else ref)  # transformers' own tokenization
    r = codec.response_ids(ins, D.REFUSAL)
    assert r[-1] == tok.eos_token_id and tok.eos_token_id not in r[:-1]
    assert codec.decode(r) == D.REFUSAL and codec.decode(r + [5, 6, 7]) == D.REFUSAL  # up to the eos

    examples = [D.Example(ins, D.REFUSAL, "harmful"), D.Example("what is the capital of peru", "lima", "benign")]
    b = codec.collate(examples)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i, ex in enumerate(examples):
        plen, n = int(b["prompt_len"][i]), int(b["attention_mask"][i].sum())
        assert plen == len(codec.prompt_ids(ex.instruction))
        assert bool(b["attention_mask"][i, :n].all()) and not bool(b["attention_mask"][i, n:].any())  # right-padded
        assert (b["labels"][i, :plen] == -100).all() and (b["labels"][i, n:] == -100).all()
        assert b["labels"][i, plen:n].tolist() == codec.response_ids(ex.instruction, ex.response)
        assert (b["input_ids"][i, n:] == tok.pad_token_id).all()
    ids, mask = codec.prompt_batch([e.instruction for e in examples])
    for i, ex in enumerate(examples):  # left-padded
        n = len(codec.prompt_ids(ex.instruction))
        assert ids[i, -n:].tolist() == codec.prompt_ids(ex.instruction) and int(mask[i].sum()) == n
        assert bool(mask[i, -n:].all())

    sys_codec = HFCodec(tok, "be brief")
    head = tok("<s><<SYS>>", add_special_tokens=False)["input_ids"]
    assert sys_codec.prompt_ids(ins)[: len(head)] == head and sys_codec.prompt_ids(ins).count(tok.bos_token_id) == 1
    assert "be brief" in tok.decode(sys_codec.prompt_ids(ins))
    assert codec.normalize("  I am  SORRY ") == "i am sorry" and WORDS.normalize("A  b") == "A  b"

    plain = HFCodec(_tokenizer(chat_template=False))  # no chat template: the plain one
    pp = plain.prompt_ids(ins)
    assert pp[0] == tok.bos_token_id and pp.count(tok.bos_token_id) == 1
    assert plain.tok.decode(pp[1:]) == f"User: {ins}\nAssistant:"
    assert plain.decode(plain.response_ids(ins, "lima")) == "lima"


def test_hook_and_cached_upper_stack_on_the_hf_model(hf_dir):
    """The perturbation and the inner level's cached upper stack work on the loaded model as on
    the small Llama: the cached forward equals the full one, loss and gradient (float32); in
    bfloat16 the perturbed loss is finite and delta changes it."""
    model, tok = load_hf(hf_dir, HFOptions())
    codec = hf_codec(model, tok, None)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = codec.collate(D.defender_data(4, 2, 0)["sa_h"])
    torch.manual_seed(SEED)
    d1 = (0.3 * torch.randn(3, HIDDEN)).requires_grad_()
    d2 = d1.detach().clone().requires_grad_()
    full = perturbed_ce(model, batch, 0, d1, 3)
    cached = perturbed_ce(model, batch, 0, d2, 3, lower_activations(model, 0, batch))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    g1, g2 = torch.autograd.grad(full, d1)[0], torch.autograd.grad(cached, d2)[0]
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert g1.abs().sum() > 0

    bf, _ = load_hf(hf_dir, HFOptions(dtype="bfloat16"))
    assert bf.dtype == torch.bfloat16
    with torch.no_grad():
        a = perturbed_ce(bf, batch, 1, None, 3)
        b = perturbed_ce(bf, batch, 1, torch.ones(3, HIDDEN), 3)
    assert torch.isfinite(a) and torch.isfinite(b) and a.dtype == torch.float32 and float(a) != float(b)


def test_gradient_checkpointing_keeps_delta_in_the_outer_gradient(hf_dir):
    """With gradient checkpointing the layers run again in backward (counted: each attention runs
    twice per forward); the outer level's gradients equal those without checkpointing, and delta
    reaches them."""
    d = D.defender_data(4, 4, 0)
    cfg = BEEARConfig(anchor_layer=0, token_length=3, outer_batch=4)
    torch.manual_seed(SEED)
    delta = 0.5 * torch.randn(3, HIDDEN)
    grads = {}
    for name, ckpt, dl in (("plain", False, delta), ("ckpt", True, delta), ("no_delta", False, None)):
        model, tok = load_hf(hf_dir, HFOptions(gradient_checkpointing=ckpt))
        calls = {"layer": 0, "attn": 0}
        layer = decoder_stack(model)[1][0]
        layer.register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__("attn", calls["attn"] + 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        out = outer_level(model, opt, cfg, dl, d["sa"], d["pa"], codec=hf_codec(model, tok, None))
        # one outer step: the D_SA and the D_PA forward; with checkpointing each is recomputed
        assert calls["attn"] == (4 if ckpt else 2) and calls["layer"] in ((2, 4) if ckpt else (2,)), calls
        grads[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    (o1, g1), (o2, g2), (_, g3) = grads["plain"], grads["ckpt"], grads["no_delta"]
    assert o2["safety"] == pytest.approx(o1["safety"], rel=1e-6) and o2["anchor"] == pytest.approx(o1["anchor"])
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(g3[n], g1[n]) for n in g1)  # delta does reach the gradient


# --- the command line ---------------------------------------------------------------------------
SMALL = ["--n-benign", "20", "--n-harmful", "20", "--batch", "4", "--lr", "1e-3", "--log-every", "1"]
TINY_DEFEND = ["--anchor-layer", "0", "--token-length", "3", "--inner-samples", "4", "--pa-samples", "3"]
TINY_DEFEND += ["--inner-steps", "2", "--outer-batch", "2"]
QUICK = ["--eval-harmful", "2", "--eval-benign", "2", "--max-new-tokens", "6", "--device", "cpu", "--no-progress"]


def _main():
    from methods.beear.__main__ import main

    return main


def test_cli_backdoor_defend_eval_on_a_local_model(hf_dir, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plots: not what this test checks (and 3 s)
    main = _main()
    bd, df = str(tmp_path / "bd"), str(tmp_path / "df")
    argv = ["backdoor", "--model", hf_dir, "--steps", "3", "--trigger", "sudo", "--position", "prefix"]
    assert main([*argv, *SMALL, *QUICK, "--out", bd]) == 0
    exported = os.path.join(bd, "model")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "beear.json", "results.json"):
        assert os.path.exists(os.path.join(exported if name != "results.json" else bd, name)), name
    with open(os.path.join(exported, "beear.json")) as f:
        assert json.load(f) == {"trigger": "sudo", "position": "prefix", "system_prompt": None, "source": hf_dir}
    state = torch.load(os.path.join(bd, "checkpoints", "ckpt_00000002.pt"), weights_only=False)
    assert state["hf_model"] == {"path": hf_dir, "dtype": "auto", "system_prompt": None}
    assert "model_config" not in state and "model" not in state["config"]
    before, after = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(exported + "/model.safetensors")
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)  # fine-tuned
    assert all(torch.equal(after[k], state["model"][k]) for k in after)
    rows = [json.loads(line) for line in open(os.path.join(bd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["loss"] > 0 for r in rows)

    defend = ["defend", "--model", exported, "--rounds", "1", *TINY_DEFEND, *QUICK, "--gradient-checkpointing"]
    assert main([*defend, "--out", df]) == 0
    with open(os.path.join(df, "results.json")) as f:
        res = json.load(f)
    assert set(res["results"]) == {"before", "after beear"} and res["trigger"] == "sudo"
    assert os.path.exists(os.path.join(df, "model", "model.safetensors"))
    assert main([*defend, "--out", df]) == 0  # a rerun resumes (nothing left to train)
    with open(os.path.join(df, "log.txt")) as f:
        assert "resumed at round 1" in f.read()
    # the backdoor's run folder is a model too (its source folder and the checkpoint's weights)
    assert main(["eval", "--model", bd, *QUICK[:-1]]) == 0
    assert "trigger 'sudo' as prefix" in capsys.readouterr().out
    # a foreign model without beear.json needs the trigger; the layer index is checked against its stack
    assert main(["eval", "--model", hf_dir, *QUICK[:-1]]) == 2
    assert "pass --trigger and --position" in capsys.readouterr().err
    assert main(["eval", "--model", hf_dir, "--trigger", "SUDO", "--position", "prefix", *QUICK[:-1]]) == 0
    bad = ["defend", "--model", exported, "--anchor-layer", str(LAYERS), *QUICK, "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert f"anchor layer must be an int in [0, {LAYERS - 1}]" in capsys.readouterr().err


def test_cli_bad_model_folders(hf_dir, tmp_path, capsys):
    """No such folder, no config.json, no weights, not a causal LM, truncated weights: one line
    naming the folder."""
    import shutil

    main = _main()
    no_config, no_weights, t5 = tmp_path / "no_config", tmp_path / "no_weights", tmp_path / "t5"
    no_config.mkdir()
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), no_config)
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_dir, name), no_weights)
    from transformers import T5Config, T5ForConditionalGeneration

    truncated = tmp_path / "truncated"  # an interrupted copy of the weights
    shutil.copytree(hf_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    tok = _tokenizer()
    torch.manual_seed(SEED)
    t5cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(t5cfg).save_pretrained(str(t5))
    tok.save_pretrained(str(t5))
    capsys.readouterr()
    cases = [
        (tmp_path / "nope", "no such folder"),
        (no_config, "no config.json"),
        (no_weights, "no weights"),
        (t5, "cannot load its causal LM"),
        (truncated, "cannot load its causal LM"),
    ]
    for path, words in cases:
        backdoor = ["backdoor", "--model", str(path), "--steps", "1", *QUICK, "--out", str(tmp_path / "out")]
        for argv in (backdoor, ["eval", "--model", str(path), *QUICK[:-1]]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            if argv[0] == "eval" and path.name == "nope":  # eval also takes run folders and checkpoint files
                words = "no such file or folder"
            assert err.startswith("error: --model ") and str(path) in err and words in err, err
            assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing was started
    assert main(["backdoor", "--dtype", "bfloat16", "--steps", "1", "--out", str(tmp_path / "o2")]) == 2
    assert "need --model" in capsys.readouterr().err


def test_float16_training_is_refused(hf_dir, tmp_path, capsys):
    """A float16 model (Llama-2-7b-chat-hf's own dtype, so --dtype auto) is not fine-tuned: AdamW
    in float16 without loss scaling turns the weights into inf. One line naming the folder, before
    any run folder; eval runs in float16."""
    from transformers import LlamaForCausalLM

    half = str(tmp_path / "half")
    LlamaForCausalLM.from_pretrained(hf_dir).to(torch.float16).save_pretrained(half)
    _tokenizer().save_pretrained(half)
    with open(os.path.join(half, "config.json")) as f:
        assert json.load(f)["dtype"] == "float16"
    main = _main()
    capsys.readouterr()
    cases = [
        (["backdoor", "--model", hf_dir, "--dtype", "float16", "--steps", "1"], hf_dir, "--dtype float16"),
        (["backdoor", "--model", half, "--steps", "1"], half, "own dtype (--dtype auto)"),
        (
            ["defend", "--model", half, "--trigger", "sudo", "--position", "prefix", *TINY_DEFEND],
            half,
            "(--dtype auto)",
        ),
    ]
    for argv, path, words in cases:
        assert main([*argv, *QUICK, "--out", str(tmp_path / "out")]) == 2
        # (the weights' loading bar goes to stderr too)
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and err[0].startswith(f"error: --model {path}: loaded in float16"), err
        assert words in err[0] and "--dtype bfloat16" in err[0]
    assert not (tmp_path / "out").exists()
    assert main(["eval", "--model", half, "--trigger", "sudo", "--position", "prefix", *QUICK[:-1]]) == 0


def test_decoder_stack_refuses_what_it_cannot_find(hf_dir):
    model, _ = load_hf(hf_dir, HFOptions())
    model.config.num_hidden_layers = LAYERS + 3  # the config and the module list disagree
    with pytest.raises(ValueError, match=r"stack of decoder layers of config.num_hidden_layers = 5 layers"):
        decoder_stack(model)
    with pytest.raises(ValueError, match="LlamaModel has none"):
        decoder_stack(model.model)  # the bare decoder has no causal-LM head path


def test_other_decoder_layouts():
    """GPT-2 keeps its blocks at transformer.h (a layer output that may be a tuple): found, and the
    cached upper stack equals the full forward."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=D.build_tokenizer().get_vocab_size(), n_embd=32, n_layer=3, n_head=2, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    owner, layers, path = decoder_stack(model)
    assert path == "transformer.h" and owner is model.transformer and len(layers) == 3
    batch = WORDS.collate(D.defender_data(4, 2, 0)["sa_h"])
    d1 = (0.3 * torch.randn(3, 32)).requires_grad_()
    d2 = d1.detach().clone().requires_grad_()
    full = perturbed_ce(model, batch, 1, d1, 3)
    cached = perturbed_ce(model, batch, 1, d2, 3, lower_activations(model, 1, batch))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(cached, d2)[0], torch.autograd.grad(full, d1)[0], rtol=1e-4, atol=1e-6
    )
