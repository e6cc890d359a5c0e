"""Which parameters muon_ds.Muon updates with Muon and which with AdamW, and as what matrix.

Moonlight's rule: ndim >= 2 -> Muon, except embeddings (found by module type when the model
itself is passed, or by name) and the output head (by name); ndim < 2 -> AdamW. The
``muon_ds_route`` attribute (``muon_ds.set_route``) overrides everything, then
``muon_patterns``, then ``adamw_patterns``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch

import muon_ds
from muon_ds import MuonConfig, set_route
from muon_ds.layout import ROUTE_ATTR, route_param
from muon_ds.math import matrix_shape


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These matrices are tiny: intra-op threads only add OpenMP spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _routes(opt: muon_ds.Muon) -> dict[int, str]:
    """id(param) -> "muon" / "adamw", read from the optimizer's own param groups."""
    return {id(p): g["algorithm"] for g in opt.param_groups for p in g["params"]}


def _named_routes(model: torch.nn.Module, opt: muon_ds.Muon) -> dict[str, str]:
    routes = _routes(opt)
    return {name: routes[id(p)] for name, p in model.named_parameters()}


def _sequential() -> torch.nn.Sequential:
    """No parameter name says "embed": only the module type can find the embedding."""
    return torch.nn.Sequential(
        torch.nn.Embedding(10, 8),
        torch.nn.Linear(8, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 10),
    )


def test_embedding_found_by_module_type_when_model_is_passed() -> None:
    model = _sequential()
    opt = muon_ds.Muon(model)
    assert _named_routes(model, opt) == {
        "0.weight": "adamw",  # nn.Embedding
        "1.weight": "muon",
        "1.bias": "adamw",
        "2.weight": "adamw",
        "2.bias": "adamw",
        "3.weight": "muon",  # an unnamed head cannot be recognised: it is a matrix
        "3.bias": "adamw",
    }


def test_embedding_without_a_telling_name_is_a_matrix_when_only_names_are_passed() -> None:
    """The counterpart of the test above: what finds "0.weight" is the module type."""
    model = _sequential()
    opt = muon_ds.Muon(model.named_parameters())
    assert _routes(opt)[id(model[0].weight)] == "muon"


@pytest.mark.parametrize(
    ("name", "shape", "route"),
    [
        ("model.embed_tokens.weight", (10, 8), "adamw"),
        ("transformer.wte.weight", (10, 8), "adamw"),
        ("transformer.wpe.weight", (10, 8), "adamw"),
        ("lm_head.weight", (10, 8), "adamw"),
        ("output_layer.weight", (10, 8), "adamw"),
        ("layers.0.attn.qkv.weight", (24, 8), "muon"),
        ("layers.0.mlp.fc1.weight", (32, 8), "muon"),
        ("layers.0.conv.weight", (4, 3, 3, 3), "muon"),
        ("layers.0.mlp.fc1.bias", (32,), "adamw"),
        ("layers.0.norm.weight", (8,), "adamw"),
        ("scalar_gate", (), "adamw"),
    ],
)
def test_moonlight_rule_routes_by_name_and_ndim(
    name: str, shape: tuple[int, ...], route: str
) -> None:
    param = torch.nn.Parameter(torch.zeros(shape))
    assert route_param(name, param, MuonConfig()) == route
    opt = muon_ds.Muon([(name, param)])
    assert _routes(opt)[id(param)] == route


def test_an_unnamed_untagged_matrix_is_refused_instead_of_routed_by_shape() -> None:
    """Shape cannot tell a hidden matrix from an embedding: without a name, a model or a
    tag muon_ds refuses rather than guess. A vector needs no guess (Muon cannot take it)."""
    matrix, vector = torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"unnamed parameter of shape \(4, 4\) has no route"):
        muon_ds.Muon([matrix, vector])
    set_route(matrix, "muon")
    opt = muon_ds.Muon([matrix, vector])
    assert _routes(opt) == {id(matrix): "muon", id(vector): "adamw"}


def test_set_route_overrides_shape_and_name_patterns() -> None:
    hidden = torch.nn.Parameter(torch.zeros(8, 8))
    embed = torch.nn.Parameter(torch.zeros(10, 8))
    set_route(hidden, "adamw")
    set_route(embed, "muon")
    opt = muon_ds.Muon([("layers.0.fc.weight", hidden), ("embed.weight", embed)])
    assert _routes(opt) == {id(hidden): "adamw", id(embed): "muon"}


def test_explicit_route_on_an_embedding_survives_passing_the_model() -> None:
    model = _sequential()
    set_route(model[0].weight, "muon")
    opt = muon_ds.Muon(model)
    assert _routes(opt)[id(model[0].weight)] == "muon"


def test_muon_patterns_win_over_adamw_patterns() -> None:
    head = torch.nn.Parameter(torch.zeros(10, 8))
    opt = muon_ds.Muon([("lm_head.weight", head)], MuonConfig(muon_patterns=("lm_head.*",)))
    assert _routes(opt)[id(head)] == "muon"


def test_adamw_patterns_send_a_matrix_to_adamw() -> None:
    """E.g. the MoE router, which Moonlight-style recipes often keep on AdamW."""
    router = torch.nn.Parameter(torch.zeros(4, 8))
    fc = torch.nn.Parameter(torch.zeros(8, 8))
    config = MuonConfig(adamw_patterns=("*router*",))
    opt = muon_ds.Muon([("moe.router.weight", router), ("moe.fc.weight", fc)], config)
    assert _routes(opt) == {id(router): "adamw", id(fc): "muon"}


def test_user_groups_are_split_by_algorithm_and_keep_their_options() -> None:
    w1, b1 = torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))
    w2 = torch.nn.Parameter(torch.zeros(4, 4))
    opt = muon_ds.Muon(
        [
            {"params": [("a.weight", w1), ("a.bias", b1)], "lr": 0.5},
            {"params": [("b.weight", w2)], "weight_decay": 0.0},
        ]
    )
    summary = [
        (g["algorithm"], [id(p) for p in g["params"]], g["lr"], g["weight_decay"])
        for g in opt.param_groups
    ]
    assert summary == [
        ("muon", [id(w1)], 0.5, 0.1),
        ("adamw", [id(b1)], 0.5, 0.1),
        ("muon", [id(w2)], 1e-3, 0.0),
    ]


def test_one_dimensional_param_forced_to_muon_by_attribute_raises_clear_error() -> None:
    bias = torch.nn.Parameter(torch.zeros(8))
    set_route(bias, "muon")
    with pytest.raises(
        ValueError,
        match=r"parameter fc\.bias of shape \(8,\) is routed to Muon by attribute "
        r"muon_ds_route, but Muon needs ndim >= 2; route it to 'adamw'",
    ):
        muon_ds.Muon([("fc.bias", bias)])


def test_one_dimensional_param_forced_to_muon_by_pattern_raises_clear_error() -> None:
    bias = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(ValueError, match=r"fc\.bias of shape \(8,\) .* by muon_patterns"):
        muon_ds.Muon([("fc.bias", bias)], MuonConfig(muon_patterns=("fc.*",)))


def test_set_route_rejects_unknown_route() -> None:
    with pytest.raises(ValueError, match=r"route='sgd' is not allowed: expected one of"):
        set_route(torch.zeros(2, 2), "sgd")  # type: ignore[arg-type]


def test_unknown_route_attribute_set_by_hand_is_rejected_naming_the_param() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    setattr(param, ROUTE_ATTR, "lion")
    with pytest.raises(
        ValueError, match=r"parameter w: attribute muon_ds_route gives route 'lion'"
    ):
        muon_ds.Muon([("w", param)])


def test_empty_param_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        muon_ds.Muon([])


# --------------------------------------------------------------------------------------
# ndim > 2: flattened to [out, prod(rest)], never silently degraded
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "matrix"),
    [
        ((6, 3, 3, 3), (6, 27)),
        ((8, 4, 5), (8, 20)),
        ((4, 2, 2, 3, 3), (4, 36)),
        ((40, 3, 2), (40, 6)),
    ],
)
def test_matrix_shape_is_out_by_product_of_rest(
    shape: tuple[int, ...], matrix: tuple[int, int]
) -> None:
    assert matrix_shape(shape) == matrix


def test_matrix_shape_rejects_vectors() -> None:
    with pytest.raises(ValueError, match=r"needs ndim >= 2, got shape \(5,\)"):
        matrix_shape((5,))


def _reshaped_reference(
    w: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, mu: float
) -> torch.Tensor:
    """Moonlight's update applied to w.reshape(out, -1), written out (float32 NS)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    w = w.reshape(rows, cols).clone()
    m = torch.zeros_like(w)
    for g in grads:
        g = g.reshape(rows, cols)
        m = mu * m + g
        x = g + mu * m
        tall = rows > cols
        if tall:
            x = x.T
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            big_a = x @ x.T
            x = a * x + (b * big_a + c * big_a @ big_a) @ x
        o = x.T if tall else x
        w = w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(rows, cols)) * o
    return w


@pytest.mark.parametrize(
    "module",
    [
        lambda: torch.nn.Conv2d(3, 6, 3),  # [6, 3, 3, 3] -> [6, 27]
        lambda: torch.nn.Conv1d(4, 8, 5),  # [8, 4, 5] -> [8, 20]
        lambda: torch.nn.Conv2d(2, 40, (3, 1)),  # [40, 2, 3, 1] -> [40, 6]: tall
    ],
    ids=["conv2d_wide", "conv1d", "conv2d_tall"],
)
def test_conv_weight_is_orthogonalised_as_out_by_in_times_kernel(
    module: Callable[[], torch.nn.Module],
) -> None:
    """Checked against an explicit reshape: not per-slice, not SGD, not skipped.
    Tolerance 1e-6 absolute on weights of ~0.1: float32 roundoff (ns_dtype float32)."""
    torch.manual_seed(0)
    conv = module()
    weight = conv.weight
    init = weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(weight.shape, generator=gen) for _ in range(3)]
    opt = muon_ds.Muon(
        [("conv.weight", weight)], MuonConfig(lr=0.02, weight_decay=0.1, ns_dtype="float32")
    )
    assert _routes(opt)[id(weight)] == "muon"
    for g in grads:
        weight.grad = g.clone()
        opt.step()
    expected = _reshaped_reference(init, grads, lr=0.02, wd=0.1, mu=0.95)
    assert weight.shape == init.shape
    assert opt.state[weight]["momentum_buffer"].shape == init.shape
    torch.testing.assert_close(weight.detach().reshape(expected.shape), expected, rtol=0, atol=1e-6)


def test_conv_update_is_orthogonal_as_a_flattened_matrix() -> None:
    """From W = 0 without decay the step is -lr * 0.2 * sqrt(27) * O with O = NS(G as
    [6, 27]): its singular values lie in Moonlight's band (float32 NS), which a per-slice
    or elementwise (SGD-like) update of a random gradient would not satisfy."""
    weight = torch.zeros(6, 3, 3, 3, requires_grad=True)
    weight.grad = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    lr = 0.02
    config = MuonConfig(lr=lr, weight_decay=0.0, ns_dtype="float32")
    muon_ds.Muon([("conv.weight", weight)], config).step()
    o = -weight.detach().reshape(6, 27) / (lr * 0.2 * math.sqrt(27))
    singular_values = torch.linalg.svdvals(o.double())
    assert singular_values.min() > 0.68
    assert singular_values.max() < 1.21
    # The raw gradient is far from that: the test can tell the difference.
    raw = torch.linalg.svdvals(weight.grad.reshape(6, 27).double())
    assert raw.max() / raw.min() > 1.5
