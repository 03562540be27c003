"""transformers.Trainer with gradient accumulation over padded batches: a fusedloss-patched model
logs the same losses, ends with the same weights and evaluates to the same loss as the stock one."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import fusedloss.integrations.transformers as flt  # noqa: E402
from test_hf_models import VOCAB, causal_pair  # noqa: E402


def _dataset(n=16):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (3 + (i * 5) % 9,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "unused_column": i})
    return rows


def _collate(rows):
    """Right padding: pad id 0, attention mask 0, label -100 (so batches differ in token count)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(),
                                   eval_dataset=_dataset(5), data_collator=_collate)
    assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the loss
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses + [trainer.evaluate()["eval_loss"]]


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    stock, _ = causal_pair("llama")
    losses = _train(stock, tmp_path_factory.mktemp("stock"))
    return losses, dict(stock.named_parameters())


@pytest.mark.parametrize("linear", [True, False], ids=["linear", "logits"])
def test_trainer_gradient_accumulation_matches_stock(tmp_path, stock_run, linear):
    ref, ref_params = stock_run
    _, model = causal_pair("llama")
    flt.apply(model, linear=linear)
    got = _train(model, tmp_path)
    assert len(ref) == 4  # 3 training steps, then the evaluation loss
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
