"""The demo's model, corpus and schedule keep the guarantees the Muon/AdamW comparison needs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch

import muon_ds
from muon_ds.testing.corpus import Corpus, stdlib_corpus, train_batch, val_batch
from muon_ds.testing.tiny_gpt import VOCAB_SIZE, GPTConfig, init_model, lm_loss
from muon_ds.testing.training import TrainConfig, decay_groups, lr_factor, train

SMALL = GPTConfig(context=32, d_model=32, n_layers=2, n_heads=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tensors are tiny: extra threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return stdlib_corpus()


def test_corpus_is_deterministic_and_nontrivial(corpus: Corpus) -> None:
    again = stdlib_corpus()
    assert torch.equal(corpus.train, again.train)
    assert torch.equal(corpus.val, again.val)
    assert corpus.train_files == again.train_files
    assert corpus.val_files == again.val_files
    assert corpus.train.dtype == torch.uint8
    assert 1_000_000 < corpus.train.numel() + corpus.val.numel() < 4_000_000
    assert corpus.val.numel() > 50_000
    assert torch.unique(corpus.train).numel() > 90  # real source text, not padding
    assert b"def " in corpus.val.numpy().tobytes()


def test_train_and_validation_files_are_disjoint(corpus: Corpus) -> None:
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert len(corpus.val_files) >= 5


def test_batches_depend_only_on_seed_and_step(corpus: Corpus) -> None:
    def batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return train_batch(corpus.train, step=step, batch_size=4, context=16, seed=seed)

    torch.manual_seed(123)  # the global RNG must not matter
    inputs, targets = batch(7)
    torch.manual_seed(456)
    assert torch.equal(inputs, batch(7)[0])
    assert not torch.equal(inputs, batch(8)[0])
    assert not torch.equal(inputs, batch(7, seed=1)[0])
    assert inputs.shape == targets.shape == (4, 16)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are the next bytes


def test_validation_set_is_fixed(corpus: Corpus) -> None:
    first = val_batch(corpus.val, n_seqs=8, context=16)
    second = val_batch(corpus.val, n_seqs=8, context=16)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_forward_gives_logits_per_byte_and_near_uniform_initial_loss(corpus: Corpus) -> None:
    model = init_model(SMALL, seed=0)
    inputs, targets = train_batch(corpus.train, step=0, batch_size=4, context=32, seed=0)
    assert model(inputs).shape == (4, 32, VOCAB_SIZE)
    assert model(inputs[:, :10]).shape == (4, 10, VOCAB_SIZE)
    loss = lm_loss(model, inputs, targets).item()
    assert math.isfinite(loss)
    assert abs(loss - math.log(VOCAB_SIZE)) < 0.1


def test_same_seed_gives_same_init_without_touching_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    a, b = init_model(SMALL, seed=3), init_model(SMALL, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = init_model(SMALL, seed=4)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_muon_routes_embeddings_head_and_gains_to_adamw() -> None:
    model = init_model(SMALL, seed=0)
    optimizer = muon_ds.Muon(decay_groups(model, 0.1), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    routes = [(names[id(p)], g["algorithm"]) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(n for n, _ in routes) == sorted(names.values())  # each parameter exactly once
    routed = dict(routes)
    adamw = {n for n, algorithm in routed.items() if algorithm == "adamw"}
    assert {"tok_embed.weight", "pos_embed.weight", "lm_head.weight"} <= adamw
    for name, param in model.named_parameters():
        expected = "muon" if param.ndim == 2 and name.startswith("blocks.") else "adamw"
        assert routed[name] == expected, name


def test_decay_groups_decay_matrices_only() -> None:
    model = init_model(SMALL, seed=0)
    matrices, gains = decay_groups(model, 0.1)
    assert matrices["weight_decay"] == 0.1
    assert gains["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for _, p in matrices["params"])
    assert all(p.ndim < 2 for _, p in gains["params"])
    assert len(matrices["params"]) + len(gains["params"]) == len(list(model.parameters()))


def test_one_muon_step_lowers_the_loss_on_a_fixed_batch(corpus: Corpus) -> None:
    model = init_model(SMALL, seed=0)
    optimizer = muon_ds.Muon(decay_groups(model, 0.1), lr=1e-2)
    inputs, targets = train_batch(corpus.train, step=0, batch_size=8, context=32, seed=0)
    before = lm_loss(model, inputs, targets)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = lm_loss(model, inputs, targets)
    assert after.item() < before.item() - 0.05


def test_schedule_warms_up_to_the_peak_then_decays_to_the_final_fraction() -> None:
    factors = [lr_factor(s, total_steps=100, warmup_steps=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor(100, total_steps=100, warmup_steps=10) == pytest.approx(0.1)


def test_training_is_deterministic_and_evaluates_on_schedule(corpus: Corpus) -> None:
    def adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(model, 0.1), lr=lr)

    run = TrainConfig(steps=7, lr=3e-3, batch_size=4, warmup_steps=2, eval_every=3)
    val = val_batch(corpus.val, n_seqs=4, context=SMALL.context)
    first = train(SMALL, run, corpus, adamw, val)
    second = train(SMALL, run, corpus, adamw, val)
    assert [p.step for p in first] == [0, 3, 6, 7]
    assert math.isnan(first[0].train_loss)  # no training step before step 0
    assert [p.val_loss for p in first] == [p.val_loss for p in second]
    assert [p.train_loss for p in first[1:]] == [p.train_loss for p in second[1:]]
    assert first[-1].val_loss < first[0].val_loss
