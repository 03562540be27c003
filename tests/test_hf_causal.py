"""Causal LMs patched by fusedloss.integrations.transformers.apply against stock transformers:
the loss and every parameter gradient (fp32), the outputs, generation."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedloss.integrations.transformers as flt  # noqa: E402
from test_hf_models import (  # noqa: E402
    CAUSAL_FAMILIES,
    VOCAB,
    assert_same_training_signal,
    causal_pair,
    labels_for,
    loss_and_grads,
)


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
@pytest.mark.parametrize("family", sorted(CAUSAL_FAMILIES))
def test_loss_and_gradients_match_stock(family, linear):
    stock, model = causal_pair(family)
    flt.apply(model, linear=linear)
    x = torch.randint(0, VOCAB, (3, 11))
    labels = labels_for(x)
    ref, out = assert_same_training_signal(stock, model, input_ids=x, labels=labels)
    if linear:
        assert out.logits is None
    else:
        torch.testing.assert_close(out.logits, ref.logits)
    # num_items_in_batch: the summed loss divided by it (gradient accumulation's convention)
    n = torch.tensor(37)
    assert_same_training_signal(stock, model, input_ids=x, labels=labels, num_items_in_batch=n)


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_attention_mask_shift_labels_and_ignore_index(linear):
    stock, model = causal_pair("llama")
    flt.apply(model, linear=linear)
    x = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # right padding
    labels = labels_for(x).masked_fill(mask == 0, -100)
    assert_same_training_signal(stock, model, input_ids=x, attention_mask=mask, labels=labels)
    # pre-shifted labels (padding-free collators) and a custom ignore index
    shifted = torch.randint(0, VOCAB, (2, 9))
    shifted[:, -1] = 5
    assert_same_training_signal(stock, model, input_ids=x, labels=x, shift_labels=shifted,
                                 ignore_index=5, num_items_in_batch=torch.tensor(11))


def test_softcap_is_applied():
    """Gemma-2's final-logit softcap changes the loss in this set-up, and the patched model
    follows the config (the parity test above would catch a softcap ignored or misapplied)."""
    stock, model = causal_pair("gemma2")
    flt.apply(model)
    x = torch.randint(0, VOCAB, (2, 8))
    capped = model(input_ids=x, labels=x).loss
    stock.config.final_logit_softcapping = None
    model.config.final_logit_softcapping = None
    uncapped = model(input_ids=x, labels=x).loss
    torch.testing.assert_close(uncapped, stock(input_ids=x, labels=x).loss)
    assert abs(capped.item() - uncapped.item()) > 1e-2


def test_tuple_output_and_positional_labels():
    stock, model = causal_pair("llama")
    flt.apply(model)
    x = torch.randint(0, VOCAB, (2, 7))
    ref = stock(input_ids=x, labels=x, return_dict=False)
    out = model(input_ids=x, labels=x, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref[0])
    assert len(out) == len(ref) - 1  # no logits in the tuple
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds,
    # labels, ...): labels as the sixth positional argument
    out = model(x, None, None, None, None, x)
    torch.testing.assert_close(out.loss, ref[0])
    assert out.logits is None


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_without_labels_and_generation_unchanged(family):
    stock, model = causal_pair(family)
    flt.apply(model)
    x = torch.randint(1, VOCAB, (2, 5))
    mask = torch.ones_like(x)
    with torch.no_grad():
        ref = stock(input_ids=x, attention_mask=mask)
        out = model(input_ids=x, attention_mask=mask)
    assert out.loss is None
    assert torch.equal(out.logits, ref.logits)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), stock.generate(x, **kw))


def test_gradient_checkpointing_training_mode():
    """Training mode with gradient checkpointing (dropout 0 in these configs)."""
    stock, model = causal_pair("qwen2")
    for m in (stock, model):
        m.train()
        m.activation_checkpointing_enable()
    flt.apply(model)
    x = torch.randint(0, VOCAB, (2, 9))
    assert_same_training_signal(stock, model, input_ids=x, labels=labels_for(x))


def test_autocast_bf16_no_further_from_fp64_than_stock():
    """Under CPU autocast (bf16) the fused linear path casts as nn.Linear would; its lm_head
    gradient is no further from the float64 model's than stock's own bf16 one."""
    stock, model = causal_pair("llama")
    flt.apply(model)
    exact = copy.deepcopy(stock).double()
    x = torch.randint(0, VOCAB, (2, 9))
    labels = labels_for(x)
    ref, ref_grads = loss_and_grads(exact, input_ids=x, labels=labels)
    errs = {}
    for name, m in (("stock", stock), ("fused", model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = loss_and_grads(m, input_ids=x, labels=labels)
        g = grads["lm_head.weight"].double()
        errs[name] = ((out.loss.double() - ref.loss).abs().item(),
                      ((g - ref_grads["lm_head.weight"]).norm() /
                       ref_grads["lm_head.weight"].norm()).item())
    # the gradient: as close as stock's; the loss value: stock upcasts the logits and returns
    # fp32, the fused op computes in fp32 and returns the input dtype (bf16), so its value may
    # also carry bf16's rounding, half an ulp: at most |loss| * 2**-8 (8-bit significand).
    assert errs["fused"][1] <= 2 * errs["stock"][1] + 1e-6, errs
    assert errs["fused"][0] <= 2 * errs["stock"][0] + ref.loss.item() * 2**-8, errs


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_data_parallel_replicas_and_remove(linear):
    # nn.DataParallel copies the instance's __dict__ into each replica: the wrapper bound to
    # the original model ran the original's weights in every replica
    stock, model = causal_pair("llama")
    flt.apply(model, linear=linear)
    replica = model._replicate_for_data_parallel()
    assert replica.forward.__self__ is replica
    assert model.forward.__self__ is model
    with torch.no_grad():  # (the replica shares the model's tensors until DataParallel
        for p in replica.parameters():  # gives it copies; scaling one scales both)
            p.mul_(0.5)
    x = torch.randint(0, VOCAB, (2, 7))
    labels = labels_for(x)
    scaled = copy.deepcopy(stock)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(0.5)
    torch.testing.assert_close(replica(input_ids=x, labels=labels).loss,
                               scaled(input_ids=x, labels=labels).loss)
    # remove: the stock forward and loss again (logits back in the labelled output)
    flt.remove(model)
    assert not {"forward", "_replicate_for_data_parallel"} & set(model.__dict__)
    out, ref = model(input_ids=x, labels=labels), scaled(input_ids=x, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_torch_compile_of_the_patched_model(linear):
    # the fused linear path swapped lm_head's `forward` attribute for the unlabelled forward;
    # torch.compile replayed its `del` onto a Linear that no longer had it (AttributeError)
    stock, model = causal_pair("llama")
    flt.apply(model, linear=linear)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randint(0, VOCAB, (2, 9))
    labels = labels_for(x)
    ref, ref_grads = loss_and_grads(stock, input_ids=x, labels=labels)
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=x, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], msg=lambda m, n=name: f"{n}: {m}")
    assert isinstance(model.lm_head, torch.nn.Linear)  # restored
