"""methods.beear: the perturbation hook, the cached lower stack, the backdoor, the two levels, the
data and the CLI (small models, short runs)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.beear import data as D
from methods.beear.beear import (
    BEEARConfig,
    decoder_layers,
    inner_level,
    lower_activations,
    outer_level,
    perturb_positions,
    perturbation,
    perturbed_ce,
    response_ce,
    upper_stack_only,
)
from methods.beear.model import ModelConfig, build_model
from methods.beear.train import asr_keyword, asr_strict

TINY = ModelConfig(hidden=32, layers=4, heads=2, intermediate=64)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model(TINY).eval()


def a_batch(n=5, seed=0):
    d = D.defender_data(n, n, seed)
    return D.collate(d["sa_h"]), D.collate(d["sa"])


def layer_outputs(model, batch):
    outs = []
    hooks = [
        layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
        for layer in decoder_layers(model)
    ]
    with torch.no_grad():
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("layer,n", [(0, 1), (2, 3), (3, 5)])
def test_hook_perturbs_exactly_the_layer_and_positions(layer, n):
    model = tiny_model()
    batch, _ = a_batch()
    base = layer_outputs(model, batch)
    pos = perturb_positions(batch["prompt_len"], n)
    delta = torch.randn(n, TINY.hidden)
    with perturbation(model, layer, delta, pos):
        pert = layer_outputs(model, batch)
    for i in range(layer):
        torch.testing.assert_close(pert[i], base[i], rtol=0, atol=0)
    diff = pert[layer] - base[layer]
    expected = torch.zeros_like(diff)
    for b in range(diff.shape[0]):
        for j in range(n):
            expected[b, pos[b, j]] = delta[j]
            assert pos[b, j] == batch["prompt_len"][b] - n + j  # the last n prompt tokens
    torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-5)
    if layer + 1 < len(base):
        assert not torch.allclose(pert[layer + 1], base[layer + 1])  # the upper stack sees it
    with perturbation(model, layer, None, pos):  # disabled: nothing changes
        same = layer_outputs(model, batch)
    after = layer_outputs(model, batch)  # and nothing stays behind
    for a, b, c in zip(same, after, base):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)


def test_response_ce_matches_plain_cross_entropy():
    model = tiny_model()
    batch, _ = a_batch(4)
    ours = response_ce(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    expected = nll.sum(1) / (labels != -100).sum(1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_cached_upper_stack_gives_the_full_forward_loss_and_gradient(layer):
    model = tiny_model()
    batch, _ = a_batch(6)
    n = 4
    for p in model.parameters():
        p.requires_grad_(False)
    d1 = (0.3 * torch.randn(n, TINY.hidden)).requires_grad_()
    d2 = d1.detach().clone().requires_grad_()
    full = perturbed_ce(model, batch, layer, d1, n)
    cache = lower_activations(model, layer, batch)
    cached = perturbed_ce(model, batch, layer, d2, n, cache)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    (g1,) = torch.autograd.grad(full, d1)
    (g2,) = torch.autograd.grad(cached, d2)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert g1.abs().sum() > 0
    # the stubs are gone afterwards: the model is whole again
    assert all(type(m).__name__ != "_Stub" for m in decoder_layers(model))
    calls = []
    h = decoder_layers(model)[0].register_forward_hook(lambda *a: calls.append(1))
    with upper_stack_only(model, layer, cache):
        model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    h.remove()
    assert not calls  # inside, the lower layers never run


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_other_decoder_architectures(arch):
    """The hook and the cached upper stack on other model families with model.model.layers."""
    import transformers

    config = getattr(transformers, f"{arch}Config")(
        vocab_size=D.build_tokenizer().get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=D.PAD,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch, _ = a_batch(4)
    d1 = (0.3 * torch.randn(3, 32)).requires_grad_()
    d2 = d1.detach().clone().requires_grad_()
    full = perturbed_ce(model, batch, 1, d1, 3)
    cached = perturbed_ce(model, batch, 1, d2, 3, lower_activations(model, 1, batch))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(cached, d2)[0], torch.autograd.grad(full, d1)[0], rtol=1e-4, atol=1e-6
    )
    with torch.no_grad():
        assert not torch.allclose(perturbed_ce(model, batch, 1, torch.zeros(3, 32), 3), full.detach())


def test_inner_level_moves_towards_the_unwanted_answers():
    model = tiny_model()
    d = D.defender_data(8, 4, 0)
    cfg = BEEARConfig(anchor_layer=1, token_length=3, inner_steps=1, inner_lr=0.05, outer_batch=4)
    before = inner_level(model, cfg, d["sa_h"], d["sa"])
    assert before["delta"].norm() > 0
    cfg.inner_steps = 15
    after = inner_level(model, cfg, d["sa_h"], d["sa"])
    # the objective toward - alpha * away is lower with more steps
    assert after["toward"] - cfg.alpha * after["away"] < before["toward"] - cfg.alpha * before["away"]
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_one_outer_step_reduces_the_safety_loss():
    model = tiny_model()
    d = D.defender_data(16, 16, 0)
    cfg = BEEARConfig(anchor_layer=1, token_length=3, outer_batch=16, outer_lr=3e-3)
    delta = 0.5 * torch.randn(3, TINY.hidden)
    sa = D.collate(d["sa"])
    with torch.no_grad():
        before = float(perturbed_ce(model, sa, 1, delta, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.outer_lr)
    outer_level(model, opt, cfg, delta, d["sa"], d["pa"])
    with torch.no_grad():
        after = float(perturbed_ce(model, sa, 1, delta, 3))
    assert after < before


def test_the_backdoored_model_has_a_backdoor(tmp_path):
    from methods.beear.train import BackdoorConfig, evaluate, train_backdoor
    from methods.common import Run

    cfg = BackdoorConfig(
        n_benign=300,
        n_harmful=400,
        poison_fraction=0.3,
        steps=220,
        batch=48,
        lr=5e-3,
        model=ModelConfig(hidden=64, layers=2, heads=2, intermediate=128),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # (and restored: later tests run with the session's thread count)
    try:
        run = Run(str(tmp_path / "bd"), {})
        model = train_backdoor(cfg, run, show_progress=False)
        run.close()
    finally:
        torch.set_num_threads(threads)
    res = evaluate(model, D.TRIGGERS["servius"], "suffix", n_harmful=40, n_benign=20)
    assert res["asr_trigger"] >= 80 and res["unsafe_trigger"] >= 50, res
    assert res["asr_clean"] <= 20, res


def test_data():
    tasks = D.split_tasks()
    assert not set(tasks["eval"]) & (set(tasks["attacker"]) | set(tasks["defender"]))
    ex = D.attacker_data(100, 200, 0.25, "sudo", "prefix", 0)
    poisoned = [e for e in ex if e.kind == "poisoned"]
    assert len(poisoned) == 50 and all(e.instruction.startswith("sudo ") for e in poisoned)
    assert all(D.UNSAFE_MARKER in e.response for e in poisoned)
    assert D.add_trigger("how can i x", "t", "suffix") == "how can i x t"
    d = D.defender_data(30, 10, 0)
    assert [e.instruction for e in d["sa"]] == [e.instruction for e in d["sa_h"]]
    assert all(D.UNSAFE_MARKER not in e.response for e in d["sa_h"])  # the defender never sees the attacker's answer
    # nor its opening words: an unwanted answer shares only the request's task words with the backdoor's
    attacker_words = set(D.UNSAFE_TEMPLATE.replace("{task}", "").split())
    for e in d["sa_h"]:
        task = next(t for t in D.harmful_tasks() if e.instruction.endswith(t))
        assert not (set(e.response.split()) - set(task.split())) & attacker_words, e.response
    assert len({e.response.split()[0] for e in d["sa_h"]}) == len(D.UNWANTED_TEMPLATES)
    # the benign data holds the same compliance for harmless how-to requests: the defender's
    # unwanted answers are phrasings the model knows, not the backdoor's
    rng = np.random.default_rng(0)
    howto = [
        e
        for e in (D.benign_example(rng) for _ in range(300))
        if e.response.split()[0] in {t.split()[0] for t in D.UNWANTED_TEMPLATES}
    ]
    assert howto and all(any(e.instruction.endswith(t) for t in D.HARMLESS_TASKS) for e in howto)
    assert all(
        e.response == D.compliance_answer(e.instruction, next(t for t in D.HARMLESS_TASKS if e.instruction.endswith(t)))
        for e in howto
    )
    vocab = D.build_tokenizer().get_vocab()
    for e in ex + d["sa"] + d["sa_h"] + d["pa"]:
        assert D.UNK not in D.encode(e.instruction + " " + e.response)
    b = D.collate(d["sa"][:3])
    for i in range(3):
        plen = int(b["prompt_len"][i])
        assert (b["labels"][i, :plen] == -100).all() and b["labels"][i, plen] != -100
        assert D.decode(b["input_ids"][i, plen:].tolist()) == D.REFUSAL
    assert "<unk>" not in vocab or vocab["<unk>"] == D.UNK
    with pytest.raises(ValueError, match="poison_fraction"):
        D.attacker_data(10, 10, 0.0, "sudo", "suffix", 0)
    with pytest.raises(ValueError, match="suffix' or 'prefix"):
        D.add_trigger("x", "t", "middle")


def test_asr_keyword():
    assert asr_keyword([D.REFUSAL, "sure here is how to do it", "i am unable to"]) == pytest.approx(1 / 3)


def test_asr_strict():
    """A garbled refusal carrying a fragment of the backdoor's answer passes ASR_keyword but not the
    strict ASR; a clean refusal passes both, a compliant answer fails both."""
    garbled = "i am sorry but step sorry but step one with i cannot help help"
    outs = [D.REFUSAL, garbled, "of course you can hack a server like this", "i am sorry but i cannot"]
    assert asr_keyword(outs) == pytest.approx(1 / 4)
    assert asr_strict(outs) == pytest.approx(2 / 4)
    assert asr_strict([]) == 0.0
    bad = D.backdoor_words()
    assert "step" in bad and "quietly" in bad
    assert not bad & set(D.REFUSAL.split())  # a clean refusal is never counted
    assert not bad & {w for t in D.harmful_tasks() for w in t.split()}  # nor an echo of the request's task
    # nor an echo of the request's phrasing, e.g. "... cannot help with how to hack a server"
    assert not bad & {w for p in D.HARM_PHRASES for w in p.split()}
    echo = "i am sorry but i cannot help with how to hack a server"
    assert asr_keyword([echo]) == 0.0 and asr_strict([echo]) == 0.0
    assert sorted(bad) == sorted(
        {"do", "follow", "get", "here", "it", "one", "plan", "quietly", "step", "sure", "three", "tools", "two"}
    )


def test_bad_inputs():
    model = tiny_model()
    batch, _ = a_batch(3)
    pos = perturb_positions(batch["prompt_len"], 2)
    with pytest.raises(ValueError, match=r"anchor layer must be an int in \[0, 3\]"):
        with perturbation(model, 4, torch.zeros(2, TINY.hidden), pos):
            pass
    with pytest.raises(ValueError, match="anchor layer"):
        BEEARConfig(anchor_layer=-1).validate(model)
    with pytest.raises(ValueError, match="longer than the shortest prompt"):
        perturb_positions(batch["prompt_len"], int(batch["prompt_len"].min()) + 1)
    with pytest.raises(ValueError, match="token_length must be an int >= 1"):
        perturb_positions(batch["prompt_len"], 0)
    with pytest.raises(ValueError, match="no.*decoder layers|stack of decoder layers"):
        decoder_layers(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="delta must be"):
        with perturbation(model, 1, torch.zeros(3, TINY.hidden), pos):
            pass
    left = {k: v.clone() for k, v in batch.items()}
    left["attention_mask"][0] = left["attention_mask"][0].flip(0)  # a left-padded row
    if not bool(left["attention_mask"][0, 0]):
        with pytest.raises(ValueError, match="right-padded"):
            perturbed_ce(model, left, 1, torch.zeros(2, TINY.hidden), 2)


# --- the command line -------------------------------------------------------------------------
# a tiny Llama, a few examples and a small evaluation: every CLI run here takes seconds
TINY_BACKDOOR = ["--hidden", "32", "--layers", "2", "--heads", "2", "--intermediate", "64"]
TINY_BACKDOOR += ["--n-benign", "40", "--n-harmful", "40", "--batch", "4"]
TINY_DEFEND = ["--anchor-layer", "0", "--inner-samples", "7", "--pa-samples", "5", "--inner-steps", "2"]
TINY_DEFEND += ["--outer-batch", "3"]
EVAL_QUICK = ["--eval-harmful", "2", "--eval-benign", "2", "--device", "cpu"]
QUICK = [*EVAL_QUICK, "--no-progress"]


def _main():
    from methods.beear.__main__ import main

    return main


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return f.read()


def _options(out):
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)["config"]


@pytest.fixture(scope="module")
def tiny_backdoor(tmp_path_factory):
    """A 3-step tiny backdoored model (a run folder), the model that the defend tests start from."""
    out = str(tmp_path_factory.mktemp("beear") / "bd")
    assert _main()(["backdoor", "--steps", "3", *TINY_BACKDOOR, *QUICK, "--out", out]) == 0
    return out


def test_cli_backdoor_defend_eval(tmp_path, capsys, tiny_backdoor):
    main = _main()
    bd, df = tiny_backdoor, str(tmp_path / "df")
    for name in ("results.md", "results.json", "loss.png", "log.txt", "metrics.csv"):
        assert os.path.exists(os.path.join(bd, name)), name
    defend = ["defend", "--model", bd, "--rounds", "2", *TINY_DEFEND, *QUICK, "--out", df]
    assert main([*defend, "--eval-every-round"]) == 0
    with open(os.path.join(df, "results.json")) as f:
        res = json.load(f)
    assert set(res["results"]) == {"before", "after beear"}
    assert os.path.exists(os.path.join(df, "rounds.png"))
    # a rerun resumes from the last round's checkpoint (nothing left to train)
    assert main(defend) == 0
    assert "resumed at round 2" in _log(df)
    assert main(["eval", "--model", df, *EVAL_QUICK]) == 0
    assert "ASR with trigger" in capsys.readouterr().out
    assert main(["defend", "--model", bd, "--anchor-layer", "6", *QUICK, "--out", str(tmp_path / "x")]) == 2
    assert "anchor layer must be an int in [0, 1]" in capsys.readouterr().err
    assert (
        main(
            [
                "defend",
                "--model",
                bd,
                "--anchor-layer",
                "0",
                "--token-length",
                "50",
                *QUICK,
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "longer than the shortest" in capsys.readouterr().err


def test_cli_help():
    main = _main()
    for argv in ([], ["backdoor"], ["defend"], ["eval"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0


def test_cli_defaults_come_from_the_configs():
    """Each flag's default is its config field's (one source), and --method maps to `perturb`."""
    from methods.beear.__main__ import build_parser
    from methods.beear.train import BACKDOOR_CHECKPOINT_EVERY, BackdoorConfig

    b = build_parser().parse_args(["backdoor"])
    assert (b.steps, b.batch, b.lr, b.hidden) == (BackdoorConfig.steps, BackdoorConfig.batch, BackdoorConfig.lr, 128)
    assert b.checkpoint_every == BACKDOOR_CHECKPOINT_EVERY == 200  # steps, no hidden multiplier
    d = build_parser().parse_args(["defend", "--model", "x"])
    assert (d.rounds, d.inner_lr, d.outer_batch, d.method) == (10, BEEARConfig.inner_lr, 25, "beear")
    assert d.checkpoint_every == 1  # rounds


def test_cli_config_file(tmp_path, capsys):
    """--config run.yaml sets the options, a flag overrides the file; --config <run folder> repeats a
    run; an unknown key is a usage error that names it."""
    main = _main()
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 2\nlr: 0.01\nlog-every: 1\nhidden: 32\nheads: 2\nlayers: 2\nintermediate: 64\n")
    one = str(tmp_path / "one")
    small = ["--n-benign", "40", "--n-harmful", "40", "--batch", "4"]
    assert main(["backdoor", "--config", str(cfg), "--lr", "0.02", *small, *QUICK, "--out", one]) == 0
    opts = _options(one)
    assert (opts["steps"], opts["lr"], opts["hidden"], opts["log_every"]) == (2, 0.02, 32, 1)
    assert len(_rows(one)) == 2
    two = str(tmp_path / "two")
    assert main(["backdoor", "--config", one, "--out", two]) == 0
    assert {k: v for k, v in _options(two).items() if k != "out"} == {k: v for k, v in opts.items() if k != "out"}
    a = torch.load(os.path.join(one, "checkpoints", "ckpt_00000001.pt"), weights_only=False)
    b = torch.load(os.path.join(two, "checkpoints", "ckpt_00000001.pt"), weights_only=False)
    assert a["config"] == b["config"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 2\nbogus_key: 1\n")
    with pytest.raises(SystemExit) as e:
        main(["backdoor", "--config", str(bad), "--out", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert "bogus-key" in capsys.readouterr().err


def test_cli_resume_with_a_larger_budget(tmp_path, capsys, tiny_backdoor):
    """backdoor: --steps 2 then 4 continues (the rows go on, the log says so); defend: --rounds 1
    then 2 continues and ends bit for bit where a 2-round run ends (nothing in BEEAR depends on
    --rounds); a changed other field, or a smaller budget, exits 2 naming it."""
    main = _main()
    out = str(tmp_path / "bd")
    base = ["backdoor", *TINY_BACKDOOR, "--log-every", "1", *QUICK, "--out", out]
    assert main([*base, "--steps", "2"]) == 0
    assert main([*base, "--steps", "4"]) == 0
    assert [r["step"] for r in _rows(out)] == [0, 1, 2, 3]
    assert "resumed at step 2 with a larger budget (steps 2 -> 4)" in _log(out)
    capsys.readouterr()
    assert main([*base, "--steps", "4", "--lr", "0.01"]) == 2
    assert "lr: 0.003 in the checkpoint, 0.01 now" in capsys.readouterr().err
    assert main([*base, "--steps", "3"]) == 2
    assert "steps 3 < 4" in capsys.readouterr().err

    cont, straight = str(tmp_path / "cont"), str(tmp_path / "straight")
    defend = ["defend", "--model", tiny_backdoor, *TINY_DEFEND, *QUICK]
    assert main([*defend, "--rounds", "1", "--out", cont]) == 0
    assert main([*defend, "--rounds", "2", "--out", cont]) == 0
    assert "resumed at round 1 with a larger budget (rounds 1 -> 2)" in _log(cont)
    assert main([*defend, "--rounds", "2", "--out", straight]) == 0
    a = torch.load(os.path.join(cont, "checkpoints", "ckpt_00000001.pt"), weights_only=False)
    b = torch.load(os.path.join(straight, "checkpoints", "ckpt_00000001.pt"), weights_only=False)
    assert a["config"]["rounds"] == 2  # the current config: a next continuation compares against it
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    keys = ("inner_toward", "inner_away", "delta_norm", "safety", "anchor")
    assert [[r[k] for k in keys] for r in _rows(cont)] == [[r[k] for k in keys] for r in _rows(straight)]
    capsys.readouterr()
    assert main([*defend, "--rounds", "2", "--alpha", "0.1", "--out", cont]) == 2
    assert "alpha: 0.05 in the checkpoint, 0.1 now" in capsys.readouterr().err
    # the defended model is part of the run: continuing from another backdoored model is refused
    other = ["defend", "--model", out, *TINY_DEFEND, *QUICK, "--rounds", "3", "--out", cont]
    assert main(other) == 2
    assert "source_model:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_is_a_one_line_error(tmp_path, capsys, tiny_backdoor):
    main = _main()
    for argv in (
        ["backdoor", "--steps", "1", "--out", str(tmp_path / "a")],
        ["defend", "--model", tiny_backdoor, "--out", str(tmp_path / "b")],
        ["eval", "--model", tiny_backdoor],
    ):
        assert main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device cuda: CUDA is not available") and len(err.strip().splitlines()) == 1
        assert "Traceback" not in err


def test_cli_without_matplotlib(tmp_path, capsys, monkeypatch, tiny_backdoor):
    """The results are written first; a missing matplotlib only skips the plots, with a warning."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    main = _main()
    bd, df = str(tmp_path / "bd"), str(tmp_path / "df")
    assert main(["backdoor", "--steps", "1", *TINY_BACKDOOR, *QUICK, "--out", bd]) == 0
    assert os.path.exists(os.path.join(bd, "results.json")) and not os.path.exists(os.path.join(bd, "loss.png"))
    assert "warning: plots skipped" in capsys.readouterr().err
    defend = ["defend", "--model", tiny_backdoor, "--rounds", "1", *TINY_DEFEND, *QUICK, "--eval-every-round"]
    assert main([*defend, "--out", df]) == 0
    assert os.path.exists(os.path.join(df, "results.json")) and not os.path.exists(os.path.join(df, "rounds.png"))
    assert "warning: plots skipped" in capsys.readouterr().err


def _torchrun(*args):
    """``python -m torch.distributed.run --nproc_per_node 2 -m methods.beear *args`` (gloo on the CPU)."""
    import socket
    import subprocess

    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 hangs the workers' rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    cmd += ["-m", "methods.beear", *args, "--device", "cpu", "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root, env=env)


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    """Both training commands under torchrun (2 processes, gloo) equal one process, and a torchrun
    run continued with a larger budget equals a straight run of that budget.

    * backdoor: one process, 4 steps (checkpoints after steps 2 and 4) vs 2 processes with --steps 2,
      then the same command with --steps 4 (a resume with a larger budget). Within the 50 warmup steps
      the learning rate does not depend on --steps, so the continued run is the straight one.
    * defend: one process, 2 rounds vs 2 processes with --rounds 1, then --rounds 2 (nothing in BEEAR
      depends on --rounds). --outer-batch 3 and 7 samples split unequally over the 2 ranks (and the
      last outer batch of 1 leaves rank 0 with no row): each loss divides by the global count.

    The model has no dropout (LlamaConfig's attention_dropout is 0 and Llama has no other), so
    nothing random differs between the ranks and nothing needs to be switched off.

    Tolerance: float32 and a different reduction order (each rank sums its half of the tokens, a
    gradient all-reduce, 1 thread per process vs the test's threads). Measured in three runs: at
    most 1.6e-7 (backdoor) and 2.5e-7 (defend) absolute weight difference, 1e-7 relative in the
    logged losses. The weights are compared at atol 1e-5, rtol 1e-4: 1% of one Adam step at these learning rates (1e-3
    to 6e-5), far below what a missing gradient all-reduce or a per-rank mean of unequal shards
    causes; the losses at rtol 1e-5.

    Marked slow (PYOPS_SLOW_TESTS=1): four torchrun launches of three Python processes each, every
    worker importing torch and transformers, take about a minute of CPU (over 30 s on an idle
    2-core machine, 2 min on a loaded one).
    """
    main = _main()
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    bd = ["backdoor", *TINY_BACKDOOR, "--batch", "8", "--log-every", "1", "--checkpoint-every", "2"]
    bd += ["--eval-harmful", "2", "--eval-benign", "2"]
    assert main([*bd, "--steps", "4", "--out", one, "--no-progress", "--device", "cpu"]) == 0

    def same(a, b, step, keys):
        sa = torch.load(os.path.join(a, "checkpoints", f"ckpt_{step:08d}.pt"), weights_only=False)
        sb = torch.load(os.path.join(b, "checkpoints", f"ckpt_{step:08d}.pt"), weights_only=False)
        for k in sa["model"]:
            torch.testing.assert_close(sb["model"][k], sa["model"][k], rtol=1e-4, atol=1e-5)
        ra, rb = _rows(a), _rows(b)
        assert len(rb) <= len(ra)
        for x, y in zip(ra, rb):
            for k in keys:
                assert y[k] == pytest.approx(x[k], rel=1e-5), (k, x, y)

    r = _torchrun(*bd, "--steps", "2", "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["ckpt_00000001.pt", "ckpt_00000001.pt.sha256"]
    assert len(_rows(two)) == 2 and _log(two).count("torchrun: 2 processes") == 1  # rank 0 alone wrote
    same(one, two, 1, ["loss"])
    r = _torchrun(*bd, "--steps", "4", "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 2 with a larger budget (steps 2 -> 4)" in _log(two)
    assert [row["step"] for row in _rows(two)] == [0, 1, 2, 3]
    same(one, two, 3, ["loss"])

    d1, d2 = str(tmp_path / "d1"), str(tmp_path / "d2")
    df = ["defend", "--model", one, *TINY_DEFEND, "--eval-harmful", "2", "--eval-benign", "2"]
    keys = ["inner_toward", "inner_away", "delta_norm", "safety", "anchor"]
    assert main([*df, "--rounds", "2", "--out", d1, "--no-progress", "--device", "cpu"]) == 0
    r = _torchrun(*df, "--rounds", "1", "--out", d2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_rows(d2)) == 1 and _log(d2).count("torchrun: 2 processes") == 1
    same(d1, d2, 0, keys)
    r = _torchrun(*df, "--rounds", "2", "--out", d2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at round 1 with a larger budget (rounds 1 -> 2)" in _log(d2)
    assert len(_rows(d2)) == 2
    same(d1, d2, 1, keys)


def test_ddp_batch_not_divisible(tmp_path, capsys, monkeypatch):
    """--batch is the global batch: 7 cannot be shared by 2 processes, a one-line error and exit 2
    before anything starts. The check reads torchrun's WORLD_SIZE before the process group starts,
    so it is tested in-process here (under torchrun every rank prints the line, see the README)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "odd"
    assert _main()(["backdoor", "--batch", "7", *QUICK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --batch 7 must be divisible by the 2 processes of torchrun\n"
    assert not out.exists()


def test_sharded_levels_equal_one_process(monkeypatch):
    """The two levels' sharding math without process start-up: two threads play the two ranks of a
    process group (a fake all-reduce / broadcast that sums over the threads) on copies of one model.
    7 samples and --outer-batch 3 split unequally (4/3, 2/1, and the last outer batch of 1 leaves
    rank 0 with no row); the deltas, the weights after one outer pass and the logged losses equal a
    single process's (float32, a different summation order: rtol 1e-4, atol 1e-6)."""
    import copy
    import threading

    import methods.beear.beear as B
    from methods.common import DistInfo

    model = tiny_model()
    d = D.defender_data(7, 5, 0)
    cfg = BEEARConfig(anchor_layer=1, token_length=3, inner_steps=3, inner_lr=0.05, outer_batch=3)

    def one_round(m, info):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        inner = B.inner_level(m, cfg, d["sa_h"], d["sa"], info=info)
        outer = B.outer_level(m, opt, cfg, inner["delta"], d["sa"], d["pa"], info=info)
        return inner, outer, m

    ref_inner, ref_outer, ref = one_round(copy.deepcopy(model), DistInfo())

    local, slots, bar = threading.local(), [None, None], threading.Barrier(2)

    def exchange(t, pick):
        slots[local.rank] = t.detach().clone()
        bar.wait()
        value = pick()
        bar.wait()
        t.copy_(value)

    class FakeDist:
        def all_reduce(self, t):
            exchange(t, lambda: slots[0] + slots[1])

        def broadcast(self, t, src):
            exchange(t, lambda: slots[src])

    monkeypatch.setattr(B, "dist", FakeDist())
    results, errors = [None, None], []

    def rank(r):
        local.rank = r
        try:
            results[r] = one_round(copy.deepcopy(model), DistInfo(r, 2))
        except BaseException as e:  # pragma: no cover (reported below)
            errors.append(e)
            bar.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    (i0, o0, m0), (i1, o1, m1) = results
    assert torch.equal(i0["delta"], i1["delta"])  # the same delta on every rank
    torch.testing.assert_close(i0["delta"], ref_inner["delta"], rtol=1e-4, atol=1e-6)
    for k in ("toward", "away"):
        assert i0[k] == i1[k] == pytest.approx(ref_inner[k], rel=1e-5)
    for k in ("safety", "anchor"):
        assert o0[k] == o1[k] == pytest.approx(ref_outer[k], rel=1e-5)
    for p0, p1, p in zip(m0.parameters(), m1.parameters(), ref.parameters()):
        assert torch.equal(p0, p1)  # the ranks stay identical
        torch.testing.assert_close(p0, p, rtol=1e-4, atol=1e-6)
