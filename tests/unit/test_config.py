"""MuonConfig: Moonlight's defaults, and every error path naming key, value and what is allowed."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import pytest

from muon_ds import MuonConfig, MuonConfigError
from muon_ds.math import coefficient_schedule, update_scale

NUMBER_GE_0 = "expected a number in [0.0, inf)"
FRACTION = "expected a number in [0.0, 1.0)"
POSITIVE = "expected a number in (0.0, inf)"

# (key, bad value, the exact complaint after "key=value is not allowed: ").
ERROR_CASES: list[tuple[str, Any, str]] = [
    ("lr", -1e-3, NUMBER_GE_0),
    ("lr", "1e-3", NUMBER_GE_0),
    ("lr", math.nan, NUMBER_GE_0),
    ("lr", math.inf, NUMBER_GE_0),
    ("lr", True, NUMBER_GE_0),
    ("lr", None, NUMBER_GE_0),
    ("weight_decay", -0.1, NUMBER_GE_0),
    ("weight_decay", "0.1", NUMBER_GE_0),
    ("momentum", 1.0, FRACTION),
    ("momentum", -0.5, FRACTION),
    ("momentum", "0.95", FRACTION),
    ("nesterov", "true", "expected true or false"),
    ("nesterov", 1, "expected true or false"),
    ("ns_steps", 0, "expected an integer >= 1"),
    ("ns_steps", 5.0, "expected an integer >= 1"),
    ("ns_steps", True, "expected an integer >= 1"),
    ("ns_steps", "5", "expected an integer >= 1"),
    ("ns_coefficients", "quintic", "expected one of ['moonlight', 'polar_express']"),
    ("ns_coefficients", None, "expected one of ['moonlight', 'polar_express']"),
    ("ns_dtype", "float16", "expected one of ['auto', 'bfloat16', 'float32']"),
    ("ns_dtype", "bf16", "expected one of ['auto', 'bfloat16', 'float32']"),
    ("ns_dtype", None, "expected one of ['auto', 'bfloat16', 'float32']"),
    ("ns_eps", 0.0, POSITIVE),
    ("ns_eps", -1e-7, POSITIVE),
    ("ns_eps", "1e-7", POSITIVE),
    ("scale_mode", "muP", "expected one of ['moonlight', 'keller', 'spectral', 'none']"),
    ("scale_mode", 0.2, "expected one of ['moonlight', 'keller', 'spectral', 'none']"),
    ("adamw_betas", (0.9,), "expected two numbers in [0, 1)"),
    ("adamw_betas", (0.9, 0.95, 0.99), "expected two numbers in [0, 1)"),
    ("adamw_betas", 0.9, "expected two numbers in [0, 1)"),
    ("adamw_betas", "ab", "expected two numbers in [0, 1)"),
    ("adamw_eps", 0.0, POSITIVE),
    ("adamw_eps", -1e-8, POSITIVE),
    ("adamw_eps", "1e-8", POSITIVE),
    ("muon_patterns", "*router*", "expected a list of name patterns (strings)"),
    ("muon_patterns", ["*fc*", 3], "expected a list of name patterns (strings)"),
    ("muon_patterns", 5, "expected a list of name patterns (strings)"),
    ("adamw_patterns", "*embed*", "expected a list of name patterns (strings)"),
    ("adamw_patterns", [None], "expected a list of name patterns (strings)"),
    ("adamw_patterns", None, "expected a list of name patterns (strings)"),
    ("ns_backend", "cuda", "expected one of ['auto', 'torch', 'triton']"),
    ("ns_algorithm", "polar", "expected one of ['standard', 'gram', 'auto']"),
    ("owner_imbalance_limit", 0.9, "expected a number in [1.0, inf)"),
    ("owner_imbalance_limit", "1.1", "expected a number in [1.0, inf)"),
    ("owner_team_max", 0, "expected an integer >= 1"),
    ("owner_team_max", 2.0, "expected an integer >= 1"),
    ("team_flops_per_byte", -1.0, "expected a number in [0.0, inf)"),
    ("exchange_bucket_mb", 0, POSITIVE),
    ("exchange_bucket_mb", -64.0, POSITIVE),
    ("decay_vectors_and_embeddings", "false", "expected true or false"),
    ("decay_vectors_and_embeddings", 0, "expected true or false"),
]


def _message(key: str, value: Any, allowed: str) -> str:
    return re.escape(f"{key}={value!r} is not allowed: {allowed}")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    ERROR_CASES,
    ids=[f"{k}={v!r}" for k, v, _ in ERROR_CASES],
)
def test_invalid_value_error_names_key_value_and_allowed(
    key: str, value: Any, allowed: str
) -> None:
    with pytest.raises(MuonConfigError, match=_message(key, value, allowed)):
        MuonConfig.from_dict({key: value})
    with pytest.raises(MuonConfigError, match=_message(key, value, allowed)):
        MuonConfig(**{key: value})


def test_every_field_has_an_error_case() -> None:
    """A new knob without validation (or without a test of it) fails here."""
    fields = {f.name for f in dataclasses.fields(MuonConfig)}
    assert fields == {key for key, _, _ in ERROR_CASES}


@pytest.mark.parametrize(
    ("index", "value"),
    [(0, 1.0), (1, 1.5), (0, -0.1), (1, "0.95"), (0, math.nan)],
)
def test_invalid_adamw_beta_error_names_which_beta(index: int, value: Any) -> None:
    betas = [0.9, 0.95]
    betas[index] = value
    with pytest.raises(MuonConfigError, match=_message(f"adamw_betas[{index}]", value, FRACTION)):
        MuonConfig.from_dict({"adamw_betas": betas})


@pytest.mark.parametrize("steps", [6, 10])
def test_polar_express_with_more_than_five_steps_is_rejected(steps: int) -> None:
    with pytest.raises(
        MuonConfigError,
        match=re.escape(
            f"ns_steps={steps} is not allowed with ns_coefficients='polar_express': "
            "that set defines 5 steps, so ns_steps must be 1..5"
        ),
    ):
        MuonConfig.from_dict({"ns_coefficients": "polar_express", "ns_steps": steps})


def test_moonlight_coefficients_allow_any_number_of_steps() -> None:
    assert MuonConfig(ns_steps=9).ns_steps == 9
    assert MuonConfig(ns_coefficients="polar_express", ns_steps=5).ns_steps == 5


def test_unknown_key_error_names_it_and_lists_allowed_keys() -> None:
    allowed = sorted({f.name for f in dataclasses.fields(MuonConfig)} | {"betas", "eps"})
    with pytest.raises(
        MuonConfigError,
        match=re.escape(
            f"unknown MuonConfig key(s) ['adam_w_mode', 'muon_lr']; allowed keys: {allowed}"
        ),
    ):
        MuonConfig.from_dict({"lr": 1e-3, "muon_lr": 2e-2, "adam_w_mode": True})


def test_deepspeed_adam_keys_set_the_adamw_part() -> None:
    """HF's DeepSpeed template fills "betas" and "eps" from TrainingArguments."""
    config = MuonConfig.from_dict({"lr": 0.02, "betas": [0.8, 0.98], "eps": 1e-6})
    assert (config.adamw_betas, config.adamw_eps) == ((0.8, 0.98), 1e-6)


@pytest.mark.parametrize(
    ("alias", "key", "value"), [("betas", "adamw_betas", [0.9, 0.95]), ("eps", "adamw_eps", 1e-8)]
)
def test_an_adam_key_and_its_muon_ds_name_together_are_refused(
    alias: str, key: str, value: Any
) -> None:
    with pytest.raises(
        MuonConfigError,
        match=re.escape(
            f"{alias}={value!r} and {key}={value!r} are both given; "
            f"{alias} is DeepSpeed's name for {key}"
        ),
    ):
        MuonConfig.from_dict({alias: value, key: value})


@pytest.mark.parametrize("key", ["lr", "betas", "weight_decay"])
def test_an_unfilled_auto_says_only_hugging_face_fills_it(key: str) -> None:
    with pytest.raises(
        MuonConfigError,
        match=re.escape(
            f"{key}='auto' is not allowed here: only Hugging Face's Trainer fills 'auto'"
        ),
    ):
        MuonConfig.from_dict({key: "auto"})


def test_auto_stays_a_real_choice_of_ns_dtype() -> None:
    assert MuonConfig.from_dict({"ns_dtype": "auto"}).ns_dtype == "auto"


def test_replace_validates_like_construction() -> None:
    with pytest.raises(MuonConfigError, match=_message("momentum", 1.5, FRACTION)):
        MuonConfig().replace(momentum=1.5)


def test_defaults_are_moonlight() -> None:
    config = MuonConfig()
    assert config.lr == 1e-3
    assert config.weight_decay == 0.1
    assert config.momentum == 0.95
    assert config.nesterov is True
    assert config.decay_vectors_and_embeddings is True  # Moonlight decays everything
    assert config.ns_steps == 5
    assert config.ns_coefficients == "moonlight"
    assert (
        coefficient_schedule(config.ns_coefficients, config.ns_steps)
        == [(3.4445, -4.7750, 2.0315)] * 5
    )
    assert config.ns_dtype == "auto"  # bf16 where the device has bf16 units, else fp32
    assert config.ns_eps == 1e-7
    assert config.scale_mode == "moonlight"
    for rows, cols in [(1024, 4096), (4096, 1024), (512, 512), (1, 7)]:
        assert update_scale(rows, cols, config.scale_mode) == 0.2 * math.sqrt(max(rows, cols))
    assert config.adamw_betas == (0.9, 0.95)
    assert config.adamw_eps == 1e-8
    assert config.muon_patterns == ()
    assert config.adamw_patterns == ("*embed*", "*wte*", "*wpe*", "*lm_head*", "*output_layer*")


def test_empty_dict_gives_defaults() -> None:
    assert MuonConfig.from_dict({}) == MuonConfig()


def test_json_lists_become_tuples_and_round_trip() -> None:
    """A DeepSpeed JSON "params" holds lists; the config stores tuples, so it is hashable
    and equal to the same config built in Python."""
    params = {
        "lr": 0.02,
        "weight_decay": 0.0,
        "momentum": 0.9,
        "nesterov": False,
        "ns_steps": 4,
        "ns_coefficients": "polar_express",
        "ns_dtype": "float32",
        "ns_eps": 1e-6,
        "scale_mode": "spectral",
        "adamw_betas": [0.8, 0.99],
        "adamw_eps": 1e-10,
        "muon_patterns": ["*experts*"],
        "adamw_patterns": ["*router*", "*embed*"],
    }
    config = MuonConfig.from_dict(params)
    assert config.adamw_betas == (0.8, 0.99)
    assert config.muon_patterns == ("*experts*",)
    assert config.adamw_patterns == ("*router*", "*embed*")
    hash(config)
    assert MuonConfig.from_dict(dataclasses.asdict(config)) == config
    assert {k: getattr(config, k) for k in params} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in params.items()
    }


def test_integer_lr_and_betas_are_accepted_as_numbers() -> None:
    config = MuonConfig.from_dict({"lr": 1, "weight_decay": 0, "adamw_betas": [0, 0]})
    assert config.lr == 1
    assert config.adamw_betas == (0.0, 0.0)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MuonConfig().lr = 0.5  # type: ignore[misc]
