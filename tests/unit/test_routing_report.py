"""The routing report (``muon_ds.routing_report``), the opt-in weight-decay exemption, and
the message a checkpoint with another routing gets (``routing_mismatch``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import muon_ds
from muon_ds import MuonConfig
from muon_ds.routing import RoutedTensor, RoutingReport, routing_mismatch


class TinyLlamaLike(torch.nn.Module):
    """Embedding, one hidden block (two matrices, a norm, a bias), untied head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(10, 8)
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8, bias=False)
        self.norm = torch.nn.LayerNorm(8)
        self.lm_head = torch.nn.Linear(8, 10, bias=False)


def _decays(optimizer: muon_ds.Muon, model: torch.nn.Module) -> dict[str, float]:
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters()}


def test_report_counts_tensors_and_elements_and_lists_matrices_on_adamw() -> None:
    model = TinyLlamaLike()
    report = muon_ds.routing_report(muon_ds.Muon(model))
    assert [(t.name, t.route) for t in report.tensors if t.route == "muon"] == [
        ("up.weight", "muon"),
        ("down.weight", "muon"),
    ]
    assert (report.count("muon"), report.elements("muon")) == (2, 2 * 16 * 8)
    assert (report.count("adamw"), report.elements("adamw")) == (5, 80 + 16 + 8 + 8 + 80)
    assert [t.name for t in report.matrices_on_adamw()] == ["embed_tokens.weight", "lm_head.weight"]
    assert report.lines() == [
        "muon_ds routing: Muon 2 tensors (256 elements), AdamW 5 tensors (192 elements)",
        "muon_ds routing: tensors of ndim >= 2 on AdamW (2): embed_tokens.weight [10, 8], "
        "lm_head.weight [10, 8]",
    ]


def test_report_is_printed_once_at_the_first_step(capsys: pytest.CaptureFixture[str]) -> None:
    model = TinyLlamaLike()
    optimizer = muon_ds.Muon(model)
    assert capsys.readouterr().out == ""
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    assert capsys.readouterr().out.splitlines() == muon_ds.routing_report(optimizer).lines()


def test_report_finds_the_optimizer_behind_wrappers() -> None:
    """DeepSpeed's engine and ZeRO wrapper, HF's AcceleratedOptimizer: each has .optimizer."""
    optimizer = muon_ds.Muon(TinyLlamaLike())
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=optimizer))
    assert muon_ds.routing_report(wrapped) == muon_ds.routing_report(optimizer)


def test_report_of_something_else_names_what_it_searched() -> None:
    adam = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match=r"no muon_ds optimizer in SimpleNamespace -> AdamW"):
        muon_ds.routing_report(SimpleNamespace(optimizer=adam))


def test_everything_decays_by_default_as_in_moonlight() -> None:
    model = TinyLlamaLike()
    assert set(_decays(muon_ds.Muon(model), model).values()) == {0.1}


def test_opt_in_exempts_vectors_and_embeddings_from_weight_decay() -> None:
    """Embeddings by module type (not name), every ndim < 2 tensor; the untied head and
    the hidden matrices keep their decay."""
    model = TinyLlamaLike()
    optimizer = muon_ds.Muon(model, MuonConfig(decay_vectors_and_embeddings=False))
    assert _decays(optimizer, model) == {
        "embed_tokens.weight": 0.0,
        "up.weight": 0.1,
        "up.bias": 0.0,
        "down.weight": 0.1,
        "norm.weight": 0.0,
        "norm.bias": 0.0,
        "lm_head.weight": 0.1,
    }
    report = muon_ds.routing_report(optimizer)
    assert "AdamW 5 tensors (192 elements; 4 without weight decay)" in report.lines()[0]


def test_exempt_parameters_do_not_shrink_without_gradient() -> None:
    """A zero gradient leaves an exempt AdamW parameter unchanged; a decayed one shrinks."""
    model = TinyLlamaLike()
    optimizer = muon_ds.Muon(model, MuonConfig(lr=0.1, decay_vectors_and_embeddings=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(model.embed_tokens.weight, before["embed_tokens.weight"])
    assert torch.equal(model.norm.weight, before["norm.weight"])
    torch.testing.assert_close(model.lm_head.weight, before["lm_head.weight"] * (1 - 0.1 * 0.1))


def _report(routes: dict[str, str]) -> dict[str, str]:
    tensors = tuple(RoutedTensor(n, (4, 4), r, 0.1) for n, r in routes.items())  # type: ignore[arg-type]
    return RoutingReport(tensors).routes()


def test_routing_mismatch_names_the_parameters_that_changed_route() -> None:
    saved = _report({"a.weight": "muon", "b.weight": "muon", "embed.weight": "adamw"})
    current = _report({"a.weight": "muon", "b.weight": "adamw", "embed.weight": "muon"})
    assert routing_mismatch(saved, saved) is None
    message = routing_mismatch(saved, current)
    assert message is not None
    assert "saved on Muon but not on Muon now: 1 (b.weight)" in message
    assert "on Muon now but not saved on Muon: 1 (embed.weight)" in message
