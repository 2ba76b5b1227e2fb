"""The result-preserving speed-ups: the loss from whole logits on a CPU (alignkit/lm_head.py) and GPT-2's GELU in one
kernel (models.fused_gelu) compute what TRL's head and transformers' gelu_new compute, and the stages use them; and
`disable_dropout` (pretrain, sft), which changes what is learned, trains as a model without dropout would."""

import json

import pytest
import torch
from conftest import TINY, alignkit, rerun
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit import lm_head, models

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=97, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    for module in model.modules():  # the same forward twice: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 12), generator=generator)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt left out of the loss
    labels[2, 9:] = -100  # padding
    return ids, labels


def outputs_and_grads(model, outputs, **kwargs):
    model.zero_grad()
    out = model(fused_lm_head=True, **kwargs)
    (out.loss + (out.entropy.sum() if out.entropy is not None else 0)).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shift", [False, True])
def test_whole_logits_give_trls_fused_heads_outputs_and_gradients(shift):
    from trl.trainer.utils import add_fused_lm_head

    ids, labels = batch()
    kwargs = {"input_ids": ids, "shift_labels": labels} if shift else {"input_ids": ids, "labels": labels}
    kwargs["num_items_in_batch"] = torch.tensor(20)
    trl_model, ours = tiny_gpt2(), tiny_gpt2()
    add_fused_lm_head(trl_model, outputs=ALL)
    add_fused_lm_head(ours, outputs=ALL)
    assert lm_head.use_full_logits(ours, ALL)
    expected, expected_grads = outputs_and_grads(trl_model, ALL, **kwargs)
    got, grads = outputs_and_grads(ours, ALL, **kwargs)

    assert torch.equal(got.label_mask, expected.label_mask) and not got.label_mask.all()
    assert torch.equal(got.is_top1, expected.is_top1)
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.allclose(getattr(got, field), getattr(expected, field), atol=1e-5), field
    assert (got.log_probs[~got.label_mask] == 0).all()  # zero where the label is ignored, as TRL's
    assert grads.keys() == expected_grads.keys() and len(grads) > 4
    for name, grad in grads.items():
        assert torch.allclose(grad, expected_grads[name], atol=1e-5), name
    # the plain forward (generation, the model's own loss) is untouched
    assert torch.allclose(ours(input_ids=ids).logits, trl_model(input_ids=ids).logits, atol=1e-6)


def test_only_the_fields_asked_for_and_large_logits_go_to_trls_head():
    from trl.trainer.utils import add_fused_lm_head

    ids, labels = batch()
    model = tiny_gpt2()
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    calls = []
    trls = model.forward
    model.forward = lambda *a, **k: calls.append(k.get("fused_lm_head")) or trls(*a, **k)
    assert lm_head.use_full_logits(model, ("log_probs", "is_top1"))
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.entropy is None and out.mean_logits is None and out.is_top1 is not None and calls == []

    small = ids.numel() * 97 * 4  # bytes of these logits, less the one position the shift drops: they fit
    model = tiny_gpt2()
    add_fused_lm_head(model, outputs=("log_probs",))
    trls, calls = model.forward, []
    model.forward = lambda *a, **k: calls.append(k.get("fused_lm_head")) or trls(*a, **k)
    lm_head.use_full_logits(model, ("log_probs",), limit_bytes=small // 2)
    model(input_ids=ids, labels=labels, fused_lm_head=True)
    model(input_ids=ids)
    assert calls == [True, False]  # too large for the limit: TRL's head; a plain call: the plain forward


def test_a_model_trl_did_not_patch_or_with_scaled_logits_is_left_alone():
    from trl.trainer.utils import add_fused_lm_head

    assert not lm_head.use_full_logits(tiny_gpt2(), ("log_probs",))
    model = tiny_gpt2()
    model.config.logit_scale = 0.5
    add_fused_lm_head(model)
    patched = model.forward
    assert not lm_head.use_full_logits(model, ("log_probs",)) and model.forward == patched


def test_the_sft_stage_uses_whole_logits_unless_told_not_to_and_trains_the_same(run_copy, capsys):
    weights, losses = [], []
    for setting in ("true", "false"):
        code, out, err = rerun(
            capsys,
            run_copy,
            "sft",
            "~eval",
            f"stages.sft.full_logits={setting}",
        )
        assert code == 0, err
        said = "sft: full_logits=true (alignkit: TRL's chunked LM head saves GPU memory" in err
        assert said == (setting == "true")
        weights.append(load_file(run_copy / "sft" / "model.safetensors"))
        losses.append(json.loads((run_copy / "sft" / "metrics.json").read_text())["train"]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-4), name
    start = load_file(run_copy / "pretrain" / "model.safetensors")
    assert not torch.allclose(weights[0]["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"])


def test_gpt2_gelu_in_one_kernel_computes_the_same_function_and_saves_with_it(tmp_path):
    from transformers.activations import GELUTanh

    model = tiny_gpt2().eval()
    ids, _ = batch()
    before = model(input_ids=ids).logits
    assert models.fused_gelu(model) == 2  # one per block
    assert model.config.activation_function == "gelu_pytorch_tanh"
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    assert models.fused_gelu(model) == 0
    model.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert isinstance(again.transformer.h[0].mlp.act, GELUTanh)


def test_every_stage_of_a_run_saves_gpt2_with_the_one_kernel_gelu_and_its_dropout(run_dir):
    for stage in ("pretrain", "sft", "reward", "ppo"):
        config = json.loads((run_dir / stage / "config.json").read_text())
        assert config["activation_function"] == "gelu_pytorch_tanh", stage
        # ppo (and reward, through TRL) train without dropout; the saved model keeps it for whoever trains it next
        assert (config["resid_pdrop"], config["attn_pdrop"]) == (0.1, 0.1), stage


def test_model_fused_gelu_false_keeps_the_models_own_activation(run_copy, capsys):
    code, out, err = rerun(
        capsys,
        run_copy,
        "pretrain",
        "~eval",
        "model.fused_gelu=false",
        "stages.pretrain.trainer.max_steps=2",
    )
    assert code == 0, err
    assert json.loads((run_copy / "pretrain" / "config.json").read_text())["activation_function"] == "gelu_new"


def _pretrain(capsys, out, *overrides):
    code, _, err = rerun(
        capsys,
        out,
        "pretrain",
        "~eval",
        "stages.pretrain.trainer.max_steps=3",
        *overrides,
    )
    assert code == 0, err
    return (
        load_file(out / "pretrain" / "model.safetensors"),
        json.loads((out / "pretrain" / "config.json").read_text()),
        err,
    )


def test_disable_dropout_trains_as_a_model_without_dropout_and_saves_the_config_it_had(run_copy, capsys):
    off, off_config, said = _pretrain(capsys, run_copy, "stages.pretrain.disable_dropout=true")
    assert (
        "pretrain: disable_dropout: dropout off while training (resid_pdrop 0.1, embd_pdrop 0.1, attn_pdrop 0.1"
        in said
    )
    zero = "model.config.resid_pdrop=0 model.config.embd_pdrop=0 model.config.attn_pdrop=0".split()
    none, none_config, _ = _pretrain(capsys, run_copy, *zero)
    on, on_config, _ = _pretrain(capsys, run_copy)
    assert (off_config["resid_pdrop"], off_config["attn_pdrop"]) == (0.1, 0.1)  # the model's own, for later stages
    assert (none_config["resid_pdrop"], on_config["resid_pdrop"]) == (0.0, 0.1)
    for name, tensor in off.items():  # the same steps as a model built without dropout
        assert torch.allclose(tensor, none[name], atol=1e-6), name
    assert not torch.allclose(off["transformer.h.0.mlp.c_fc.weight"], on["transformer.h.0.mlp.c_fc.weight"])


def test_sft_with_disable_dropout_trains_without_it_and_keeps_it_in_the_saved_config(run_copy, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    args = (
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "sft",
        "--force",
        "~eval",
        "stages.sft.trainer.max_steps=2",
    )
    seen = []
    original = AutoModelForCausalLM.from_pretrained

    def load(*a, **kw):  # record what the stage trains: its dropout modules' probabilities
        model = original(*a, **kw)
        seen.append(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    code, _, err = alignkit(capsys, *args, "stages.sft.disable_dropout=true")
    assert code == 0, err
    assert "sft: disable_dropout: dropout off while training" in err
    drop = [m.p for m in seen[0].modules() if isinstance(m, torch.nn.Dropout)]
    assert drop and all(p == 0 for p in drop)
    assert json.loads((run_copy / "sft" / "config.json").read_text())["resid_pdrop"] == 0.1
    start = load_file(run_copy / "pretrain" / "model.safetensors")
    trained = load_file(run_copy / "sft" / "model.safetensors")
    assert not torch.allclose(trained["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"])
