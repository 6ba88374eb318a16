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
