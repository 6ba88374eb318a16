"""integrations/transformers.py: a Hugging Face model's own loss through micro-batches equals the unsplit
step, for a causal, a masked and a sequence-to-sequence language model (tiny configurations, float64).

The models' losses cast their logits to float32, so the unsplit step itself is only float32-exact: the
bound is 1e-6, and each test also shows the plain mean missing it by far."""
import copy

import pytest
import torch

import autobatch
from autobatch.integrations.transformers import count_weighted_loss, label_count
from autobatch.reference import flat_grad, relative_error

transformers = pytest.importorskip("transformers")

VOCAB = 40
#: Length-grouped: the short sequences in one micro-batch, the long ones in the other.
LENGTHS = [2, 3, 3, 2, 9, 8, 9, 7]


def causal():
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def masked():
    config = transformers.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                     vocab_size=VOCAB, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def seq2seq():
    config = transformers.T5Config(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32,
                                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


def batch_for(kind, seed=0):
    """Right-padded inputs and labels (-100 where ignored), as the library's collators give them."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, :length] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "masked":  # position 0 may be masked too: a masked language model does not shift
        keep = torch.rand(ids.shape, generator=generator) < 0.3
        labels = labels.masked_fill(~keep, -100)
        labels[:, 0] = ids[:, 0]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if kind == "seq2seq":
        batch["labels"] = labels[:, :6].contiguous()
    return batch


MODELS = {"causal": causal, "masked": masked, "seq2seq": seq2seq}


def grads(kind, compute_loss, micro_batch):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    batch = batch_for(kind)
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()
    got = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), len(LENGTHS), compute_loss=compute_loss,
                        micro_batch=micro_batch, cache=False, before_step=lambda ab: got.append(flat_grad(ab.model)))
    ab.step(batch)
    return got[0], flat_grad(reference)


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_count_weighted_loss_gives_the_unsplit_gradient(kind):
    got, expected = grads(kind, count_weighted_loss, 4)
    assert relative_error(got, expected) < 1e-6


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_plain_mean_does_not(kind):
    got, expected = grads(kind, lambda model, batch: model(**batch).loss, 4)
    assert relative_error(got, expected) > 1e-2


def test_the_count_follows_the_model_s_shift():
    batch = batch_for("masked")
    assert label_count(causal(), batch["labels"]) == (batch["labels"][:, 1:] != -100).sum()
    assert label_count(masked(), batch["labels"]) == (batch["labels"] != -100).sum()
    assert label_count(seq2seq(), batch["labels"]) == (batch["labels"] != -100).sum()


def test_a_micro_batch_without_counted_labels_adds_nothing():
    torch.manual_seed(0)
    model = causal().double()
    batch = batch_for("causal")
    batch["labels"][:4] = -100  # the first micro-batch counts no label
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()
    got = []
    ab = autobatch.wrap(model, torch.optim.SGD(model.parameters(), lr=0.0), 8, compute_loss=count_weighted_loss,
                        micro_batch=4, cache=False, before_step=lambda ab: got.append(flat_grad(ab.model)))
    ab.step(batch)
    assert relative_error(got[0], flat_grad(reference)) < 1e-6


# -- AutoBatchTrainer: the Trainer's loop, each batch split ----------------------------------------------

class _Sequences(torch.utils.data.Dataset):
    """Padded sequences of different lengths, labels -100 on the padding: 4 batches of 8, in order."""

    def __init__(self, batches=4):
        self.rows = []
        for seed in range(batches):
            batch = batch_for("causal", seed)
            self.rows += [{key: value[row] for key, value in batch.items()} for row in range(len(LENGTHS))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def _train(tmp_path, trainer_class, steps=3, args=None, resume=None, **extra):
    from transformers import TrainingArguments

    torch.manual_seed(0)
    model = causal().double()
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-2,
                    logging_steps=1, report_to=[], use_cpu=True, seed=0, save_strategy="no", lr_scheduler_type="linear",
                    max_grad_norm=0.5, dataloader_drop_last=True)
    trainer = trainer_class(model=model, args=TrainingArguments(**{**settings, **(args or {})}),
                            train_dataset=_Sequences(), **extra)
    # The data in order, as the reference sees it: the Trainer's sampler would shuffle by its own seed.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train(resume_from_checkpoint=resume)
    return model, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_autobatch_trainer_trains_as_the_trainer_on_the_whole_batch(tmp_path, accumulation):
    """3 optimizer steps (AdamW, a linear schedule, clipping), padded sequences of different lengths: the
    parameters and logged losses of the stock Trainer with the whole batch, from micro-batches of 2."""
    from autobatch.integrations.transformers import AutoBatchTrainer

    stock, stock_losses, _ = _train(tmp_path / "stock", transformers.Trainer,
                                    args={"gradient_accumulation_steps": accumulation})
    split, losses, trainer = _train(tmp_path / "split", AutoBatchTrainer, autobatch={"micro_batch": 2, "cache": False},
                                    args={"gradient_accumulation_steps": accumulation})
    assert trainer.autobatch.plan.splits == [2, 2, 2, 2]
    assert losses == pytest.approx(stock_losses, rel=1e-6) and len(losses) == 3
    for (name, p), q in zip(split.named_parameters(), stock.parameters()):
        assert relative_error(p, q) < 1e-6, name  # the models' losses cast logits to float32


def test_auto_find_batch_size_is_refused_with_why(tmp_path):
    from transformers import TrainingArguments

    from autobatch.integrations.transformers import AutoBatchTrainer

    args = TrainingArguments(output_dir=str(tmp_path), auto_find_batch_size=True, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"shrinks per_device_train_batch_size \(Accelerate.s "
                                         r"find_executable_batch_size: 0.9x .* keeps the batch"):
        AutoBatchTrainer(model=causal(), args=args, train_dataset=_Sequences())


def test_the_autobatch_trainer_resumes_from_its_checkpoint_as_an_uninterrupted_run(tmp_path):
    from autobatch.integrations.transformers import AutoBatchTrainer

    options = {"autobatch": {"micro_batch": 2, "cache": False}}
    straight, straight_losses, _ = _train(tmp_path / "straight", AutoBatchTrainer, **options)
    _train(tmp_path / "first", AutoBatchTrainer, args={"save_strategy": "steps", "save_steps": 2}, **options)
    model, _, trainer = _train(tmp_path / "resumed", AutoBatchTrainer,
                               resume=str(tmp_path / "first" / "checkpoint-2"), **options)
    assert trainer.state.global_step == 3
    for p, q in zip(model.parameters(), straight.parameters()):
        assert relative_error(p, q) < 1e-6  # float32-exact, as the model's loss (module docstring)


class _ImageClassifier(torch.nn.Module):
    """A BatchNorm CNN as a Trainer takes it with a ``compute_loss_func``: ``forward(pixel_values)`` gives logits.
    (two_pass's exact backward needs the per-sample outputs: a forward that computes the loss itself, mixing
    the samples, trains with the projected backward, said in a warning.)"""

    def __init__(self):
        super().__init__()
        from tests.common import ResidualNet

        self.net = ResidualNet(blocks=1)

    def forward(self, pixel_values):
        return {"logits": self.net(pixel_values)}


def _cross_entropy(outputs, labels, num_items_in_batch=None):
    return torch.nn.functional.cross_entropy(outputs["logits"], labels)


class _Images(torch.utils.data.Dataset):
    def __init__(self):
        from tests.common import data

        self.x, self.y = data(16)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"pixel_values": self.x[index], "labels": self.y[index]}


def test_a_batchnorm_model_in_the_autobatch_trainer_takes_the_whole_batchs_step(tmp_path):
    """two_pass with its exact backward: 2 steps equal the stock Trainer's on the whole batch (float64),
    running statistics included, num_batches_tracked counted once per step."""
    from transformers import TrainingArguments

    from autobatch.integrations.transformers import AutoBatchTrainer

    def run(trainer_class, **extra):
        torch.manual_seed(0)
        model = _ImageClassifier().double()
        args = TrainingArguments(output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=8,
                                 max_steps=2, learning_rate=0.1, optim="sgd", report_to=[], use_cpu=True, seed=0,
                                 save_strategy="no", lr_scheduler_type="constant", remove_unused_columns=False)
        trainer = trainer_class(model=model, args=args, train_dataset=_Images(), compute_loss_func=_cross_entropy,
                                **extra)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        trainer.train()
        return model

    stock = run(transformers.Trainer)
    split = run(AutoBatchTrainer, autobatch={"micro_batch": 2, "bn": autobatch.TwoPass(precise=True), "cache": False})
    for (name, value), other in zip(split.state_dict().items(), stock.state_dict().values()):
        torch.testing.assert_close(value, other, rtol=1e-9, atol=1e-12, msg=name)
    assert int(split.net.bn.num_batches_tracked) == 2


@pytest.mark.slow
def test_the_autobatch_trainer_on_two_processes_trains_as_the_stock_trainer(tmp_path):
    """accelerate launch, 2 CPU processes (gloo): AutoBatchTrainer in micro-batches of 2 equals the stock
    Trainer with each process's batch of 4 whole, parameters and logged losses, on both processes."""
    import os
    import sys

    from tests.integrations.launch import ROOT, WORKERS, launched

    pytest.importorskip("accelerate")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "{port}", str(WORKERS / "hf_trainer_worker.py"), str(tmp_path)]
    launched(command, env)
    results = [torch.load(tmp_path / f"hf-{rank}.pt") for rank in range(2)]
    for result in results:
        stock, split = result["stock"], result["split"]
        assert split["world"] == 2 and split["splits"] == [2, 2] and len(split["losses"]) == 3
        assert split["losses"] == pytest.approx(stock["losses"], rel=1e-6)
        for key, value in stock["state"].items():
            assert relative_error(split["state"][key], value) < 1e-6, key
    for key, value in results[0]["split"]["state"].items():
        assert torch.equal(results[1]["split"]["state"][key], value), key
