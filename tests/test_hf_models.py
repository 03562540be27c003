"""Tiny randomly initialised transformers models for the test_hf_* tests (no downloads), and the
tests of what `apply` accepts and refuses.

The models have a large init (initializer_range=0.5) so the logits spread over several units:
a wrong shift, softcap or ignore rule changes the loss well beyond float tolerance.
"""

import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedloss.integrations.transformers as flt  # noqa: E402

VOCAB = 61
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.5,
             attn_implementation="eager")


def _decoder(config_name: str, model_name: str, **extra):
    def build(vocab=VOCAB, **kw):
        cfg = getattr(transformers, config_name)(vocab_size=vocab, **{**SMALL, **extra, **kw})
        return getattr(transformers, model_name)(cfg)
    return build


def _gpt2(vocab=VOCAB, **kw):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=64, initializer_range=0.5,
                                  attn_implementation="eager", **kw)
    return transformers.GPT2LMHeadModel(cfg)


CAUSAL_FAMILIES = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    # a softcap of 2 bends logits of several units a lot (tanh(3/2) * 2 = 1.81)
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8,
                       final_logit_softcapping=2.0, query_pre_attn_scalar=8),
    "gpt2": _gpt2,
}


def causal_pair(family: str, seed: int = 0, **kw):
    """(stock model, deep copy to be patched), both in eval mode (no dropout)."""
    torch.manual_seed(seed)
    model = CAUSAL_FAMILIES[family](**kw).eval()
    return model, copy.deepcopy(model)


def labels_for(input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids as labels, with an ignored prefix on row 0 and an ignored tail on the last row."""
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[-1, -2:] = -100
    return labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, grads


def assert_same_training_signal(stock, patched, **inputs):
    """Same loss and same gradient for every parameter; returns both outputs."""
    ref, ref_grads = loss_and_grads(stock, **inputs)
    out, grads = loss_and_grads(patched, **inputs)
    torch.testing.assert_close(out.loss, ref.loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, f"{name} got no gradient"
        torch.testing.assert_close(g, ref_grads[name], msg=lambda m, n=name: f"{n}: {m}")
    return ref, out


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48,
                                   max_position_embeddings=64, initializer_range=0.5, **kw)


def test_importing_does_not_import_transformers():
    code = ("import sys, fusedloss, fusedloss.integrations, fusedloss.integrations.transformers\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "assert 'ForCausalLM' in fusedloss.integrations.transformers.LOSSES\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_losses_keys_are_loss_mapping_keys():
    from transformers.loss.loss_utils import LOSS_MAPPING

    assert set(flt.LOSSES) <= set(LOSS_MAPPING)
    for key in ("ForCausalLM", "ForMaskedLM", "ForSequenceClassification",
                "ForTokenClassification", "ForQuestionAnswering"):
        assert key in flt.LOSSES


class _OwnForward(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, labels=labels, **kwargs)


def test_refuses_what_it_does_not_recognise():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, **SMALL)
    with pytest.raises(TypeError, match="_OwnForward overrides LlamaForCausalLM.forward"):
        flt.apply(_OwnForward(cfg))
    with pytest.raises(TypeError, match="does not recognise BertModel"):
        flt.apply(transformers.BertModel(bert_config()), linear=False)
    with pytest.raises(TypeError, match="does not recognise BertForMultipleChoice"):
        flt.apply(transformers.BertForMultipleChoice(bert_config()))
    # a causal LM outside the fused-linear list: refused with linear=True only
    roberta = transformers.RobertaForCausalLM(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=48, is_decoder=True))
    with pytest.raises(TypeError, match="does not recognise RobertaForCausalLM.*linear=False"):
        flt.apply(roberta)
    assert flt.apply(roberta, linear=False) is roberta
    with pytest.raises(TypeError, match="PreTrainedModel, got Linear"):
        flt.apply(torch.nn.Linear(2, 2))


def test_refuses_bad_arguments():
    model = CAUSAL_FAMILIES["llama"]()
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        flt.apply(model, backend="cuda")
    with pytest.raises(TypeError, match="linear must be True or False, got 1"):
        flt.apply(model, linear=1)


def test_apply_twice_and_copies():
    """A second apply replaces the first; a deep copy's forward runs the copy's weights."""
    stock, model = causal_pair("llama")
    x = torch.randint(0, VOCAB, (2, 7))
    flt.apply(model, linear=True)
    assert model(input_ids=x, labels=x).logits is None
    flt.apply(model, linear=False)
    out = model(input_ids=x, labels=x)
    assert out.logits is not None  # linear=False now: the logits are made
    torch.testing.assert_close(out.loss, stock(input_ids=x, labels=x).loss)

    flt.apply(model, linear=True)
    clone, stock_clone = copy.deepcopy(model), copy.deepcopy(stock)
    with torch.no_grad():
        for p, q in zip(clone.parameters(), stock_clone.parameters(), strict=True):
            p.mul_(0.5)
            q.mul_(0.5)
    torch.testing.assert_close(clone(input_ids=x, labels=x).loss,
                               stock_clone(input_ids=x, labels=x).loss)
    torch.testing.assert_close(model(input_ids=x, labels=x).loss,
                               stock(input_ids=x, labels=x).loss)
