"""LOSSES against transformers' LOSS_MAPPING, and the non-causal heads patched by apply (Llama's
Generic heads, BERT-style inline heads) against stock: loss and every parameter gradient."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.loss.loss_utils import LOSS_MAPPING  # noqa: E402

import fusedloss  # noqa: E402
import fusedloss.integrations.transformers as flt  # noqa: E402
from test_hf_models import (  # noqa: E402
    SMALL,
    VOCAB,
    assert_same_training_signal,
    bert_config,
    causal_pair,
    labels_for,
)


def _config(num_labels, problem_type=None):
    return transformers.PretrainedConfig(num_labels=num_labels, problem_type=problem_type)


def _loss_mapping_cases():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, :2] = -100
    n = torch.tensor(7)
    pooled = torch.randn(4, 5, generator=g) * 3
    start, end = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    tok = torch.randn(2, 6, 5, generator=g)
    tok_labels = torch.randint(0, 5, (2, 6), generator=g).masked_fill(labels == -100, -100)
    return [
        ("ForCausalLM", (logits, labels, VOCAB), {}),
        ("ForCausalLM", (logits, labels, VOCAB), dict(num_items_in_batch=n)),
        ("ForConditionalGeneration", (logits, labels.masked_fill(labels == -100, 3), VOCAB),
         dict(ignore_index=3)),
        ("ForMaskedLM", (logits, labels, VOCAB), dict(num_items_in_batch=n)),
        ("ForSequenceClassification", (), dict(
            labels=torch.randint(0, 5, (4,), generator=g), pooled_logits=pooled,
            config=_config(5))),
        ("ForSequenceClassification", (), dict(
            labels=(torch.rand(4, 5, generator=g) > 0.5).float(), pooled_logits=pooled,
            config=_config(5))),
        ("ForImageClassification", (), dict(
            labels=torch.randn(4, 5, generator=g), pooled_logits=pooled,
            config=_config(5, "regression"))),
        ("ForTokenClassification", (tok, tok_labels, _config(5)), {}),
        ("ForQuestionAnswering",
         (start, end, torch.tensor([1, 9, 5]), torch.tensor([[2], [0], [7]])), {}),
    ]


@pytest.mark.parametrize("key,args,kwargs", _loss_mapping_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_losses_match_loss_mapping(key, args, kwargs):
    def run(fn):
        a = [t.clone().requires_grad_() if torch.is_tensor(t) and t.is_floating_point()
             and i == 0 else t for i, t in enumerate(args)]
        kw = {k: (copy.deepcopy(v) if k == "config" else v) for k, v in kwargs.items()}
        if "pooled_logits" in kw:
            kw["pooled_logits"] = kw["pooled_logits"].clone().requires_grad_()
        loss = fn(*a, **kw)
        leaf = a[0] if a else kw["pooled_logits"]
        loss.backward()
        return loss, leaf.grad

    loss, grad = run(flt.LOSSES[key])
    ref_loss, ref_grad = run(LOSS_MAPPING[key])
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_losses_run_fusedloss(monkeypatch):
    """The LOSSES functions compute with fusedloss, not torch (parity alone could not tell)."""
    calls = []
    for name in ("cross_entropy", "binary_cross_entropy_with_logits"):
        real = getattr(fusedloss.functional, name)
        monkeypatch.setattr(fusedloss.functional, name,
                            lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    stock, model = causal_pair("llama")
    flt.apply(model, linear=False)
    x = torch.randint(0, VOCAB, (2, 5))
    model(input_ids=x, labels=x)
    bert = flt.apply(transformers.BertForSequenceClassification(
        bert_config(num_labels=3, problem_type="multi_label_classification")))
    bert(input_ids=x, labels=torch.ones(2, 3))
    assert calls == ["cross_entropy", "binary_cross_entropy_with_logits"]


def test_linear_path_runs_linear_cross_entropy(monkeypatch):
    calls = []
    real = fusedloss.linear_cross_entropy
    monkeypatch.setattr(fusedloss, "linear_cross_entropy",
                        lambda *a, **k: calls.append(k["softcap"]) or real(*a, **k))
    for family in ("llama", "gemma2"):
        _, model = causal_pair(family)
        x = torch.randint(0, VOCAB, (2, 5))
        flt.apply(model)(input_ids=x, labels=x)
        model(input_ids=x)  # no labels: stock forward, no loss
    assert calls == [None, 2.0]


def _llama_head(cls_name, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, pad_token_id=0, **{**SMALL, **kw})
    model = getattr(transformers, cls_name)(cfg).eval()
    return model, copy.deepcopy(model)


def _inputs(batch=3, length=7):
    x = torch.randint(1, VOCAB, (batch, length))
    x[0, -2:] = 0  # padding: the sequence head pools the last non-pad token
    return x


@pytest.mark.parametrize("problem", ["single", "multi", "regression"])
def test_llama_sequence_classification(problem):
    num_labels = 1 if problem == "regression" else 4
    stock, model = _llama_head("LlamaForSequenceClassification", num_labels=num_labels)
    flt.apply(model)
    x = _inputs()
    labels = {"single": torch.tensor([0, 3, 1]),
              "multi": torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]),
              "regression": torch.tensor([0.5, -1.0, 2.0])}[problem]
    assert_same_training_signal(stock, model, input_ids=x, labels=labels)
    assert model.config.problem_type == stock.config.problem_type


def test_llama_token_classification_and_qa():
    stock, model = _llama_head("LlamaForTokenClassification", num_labels=5)
    flt.apply(model)
    x = _inputs()
    labels = torch.randint(0, 5, x.shape).masked_fill(x == 0, -100)
    assert_same_training_signal(stock, model, input_ids=x, labels=labels)

    stock, model = _llama_head("LlamaForQuestionAnswering")
    flt.apply(model)
    assert_same_training_signal(stock, model, input_ids=x, start_positions=torch.tensor(
        [1, 4, 30]), end_positions=torch.tensor([2, 6, 30]))  # 30: beyond the sequence


def _bert_pair(cls, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(bert_config(**kw)).eval()
    return model, copy.deepcopy(model)


def test_bert_multi_label_classifier():
    stock, model = _bert_pair(transformers.BertForSequenceClassification, num_labels=6,
                              problem_type="multi_label_classification")
    flt.apply(model)
    x = _inputs(batch=4)
    labels = (torch.rand(4, 6) > 0.5).float()
    ref, out = assert_same_training_signal(stock, model, input_ids=x,
                                            attention_mask=(x != 0).long(), labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    # one optimiser step on each gives the same weights
    for m in (stock, model):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    for p, q in zip(model.parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("model_name", ["Bert", "Roberta", "DistilBert"])
def test_inline_heads(model_name):
    """Masked LM, single-label sequence and token classification of BERT-style models."""
    if model_name == "DistilBert":
        cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                   max_position_embeddings=64, initializer_range=0.5)
    else:
        cfg = bert_config().to_dict()
        cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                   "num_attention_heads", "intermediate_size",
                                   "max_position_embeddings", "initializer_range")}
    config_cls = getattr(transformers, model_name + "Config")
    x = _inputs()
    for head, num_labels, labels in (
            ("ForMaskedLM", 2, labels_for(x)),
            ("ForSequenceClassification", 3, torch.tensor([2, 0, 1])),
            ("ForTokenClassification", 4, torch.randint(0, 4, x.shape).masked_fill(x == 0, -100))):
        torch.manual_seed(0)
        stock = getattr(transformers, model_name + head)(config_cls(num_labels=num_labels, **cfg))
        stock.eval()
        model = flt.apply(copy.deepcopy(stock))
        assert_same_training_signal(stock, model, input_ids=x, labels=labels)
        ref = stock(input_ids=x, labels=labels, return_dict=False)
        out = model(input_ids=x, labels=labels, return_dict=False)
        assert len(out) == len(ref)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
