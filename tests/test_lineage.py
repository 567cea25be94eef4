"""Lineage names: the grammar's rules one by one, malformed names, and round-trip properties."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dalle_data.model.lineage import (
    Architecture,
    LineageError,
    ModelName,
    Segment,
    extend,
    format_epochs,
    format_lineage,
    model_name,
    parse_lineage,
    parse_name,
)

ARCH = Architecture(depth=12, dim_head=64, heads=8, dim=512, text_seq_len=128)
D = Decimal


def test_architecture_string_order_is_depth_dimhead_heads_dim_textseqlen() -> None:
    assert str(ARCH) == "12L_64HD_8H_512I_128T"


def test_architecture_from_hparams_ignores_other_keys_and_uses_dalle_defaults() -> None:
    hparams = {"depth": 12, "dim": 512, "text_seq_len": 128, "reversible": True}
    assert Architecture.from_hparams(hparams) == ARCH


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"dim": 512}, "hparams has no 'depth'"),
        ({"depth": 0, "dim": 512}, "depth=0 is not a positive integer"),
        ({"depth": 2, "dim": "512"}, "dim='512' is not a positive integer"),
        ({"depth": True, "dim": 512}, "depth=True is not a positive integer"),
    ],
)
def test_architecture_from_bad_hparams(hparams: dict, message: str) -> None:
    with pytest.raises(LineageError, match=message):
        Architecture.from_hparams(hparams)


def test_one_dataset_uses_underscore() -> None:
    name = parse_name("12L_64HD_8H_512I_128T_cc12m_1E")
    assert name == ModelName(ARCH, (Segment("cc12m", D(1)),))


def test_several_datasets_use_dash_inside_segments() -> None:
    name = parse_name("12L_64HD_8H_512I_128T_cc12m-2E_wit-1E")
    assert name.lineage == (Segment("cc12m", D(2)), Segment("wit", D(1)))
    assert str(name) == "12L_64HD_8H_512I_128T_cc12m-2E_wit-1E"


def test_name_without_lineage() -> None:
    assert parse_name("12L_64HD_8H_512I_128T") == ModelName(ARCH, ())
    assert model_name(ARCH, ()) == "12L_64HD_8H_512I_128T"


def test_family_prefix_and_pt_suffix_are_accepted() -> None:
    assert parse_name("taming/12L_64HD_8H_512I_128T_cc12m_1E.pt") == parse_name(
        "12L_64HD_8H_512I_128T_cc12m_1E"
    )


def test_same_dataset_adds() -> None:
    assert format_lineage(extend(parse_lineage("cc12m_1E"), "cc12m", D(1))) == "cc12m_2E"


def test_new_dataset_appends() -> None:
    assert format_lineage(extend(parse_lineage("cc12m_2E"), "wit", 1)) == "cc12m-2E_wit-1E"


def test_return_to_earlier_dataset_appends_new_segment() -> None:
    lineage = extend(parse_lineage("cc12m-2E_wit-1E"), "cc12m", D(1))
    assert format_lineage(lineage) == "cc12m-2E_wit-1E_cc12m-1E"


def test_extend_empty_lineage() -> None:
    assert extend((), "sample", D("0.5")) == (Segment("sample", D("0.5")),)


def test_partial_epochs_keep_two_decimals_and_drop_trailing_zeros() -> None:
    assert format_epochs(D("0.50")) == "0.5"
    assert format_epochs(D("2.00")) == "2"
    assert format_epochs(D("12.25")) == "12.25"
    assert format_epochs(D(10)) == "10"
    assert format_lineage(extend(parse_lineage("cc12m_1E"), "wit", D("0.5"))) == (
        "cc12m-1E_wit-0.5E"
    )


def test_extend_rounds_to_hundredths() -> None:
    assert extend((), "wit", D("0.333333")) == (Segment("wit", D("0.33")),)
    assert extend((), "wit", D("0.125")) == (Segment("wit", D("0.13")),)
    assert format_lineage(extend(extend((), "wit", D("0.75")), "wit", D("0.25"))) == "wit_1E"


def test_extend_that_rounds_to_zero_is_an_error() -> None:
    with pytest.raises(LineageError, match="rounds to 0.00"):
        extend(parse_lineage("cc12m_1E"), "wit", D("0.004"))


@pytest.mark.parametrize("epochs", [D(0), D(-1), "nan", "abc", D("1e12")])
def test_extend_refuses_non_positive_or_non_numbers(epochs: object) -> None:
    with pytest.raises(LineageError, match="epoch"):
        extend((), "wit", epochs)  # type: ignore[arg-type]


@pytest.mark.parametrize("dataset", ["CC12M", "cc-12m", "cc_12m", "cc.12m", ""])
def test_extend_refuses_dataset_names_outside_a_z_0_9(dataset: str) -> None:
    with pytest.raises(LineageError, match=r"must match \[a-z0-9\]\+"):
        extend((), dataset, D(1))


def test_format_epochs_refuses_three_decimals_and_zero() -> None:
    with pytest.raises(LineageError, match="more than two decimals"):
        format_epochs(D("0.125"))
    with pytest.raises(LineageError, match="greater than 0"):
        format_epochs(D(0))


def test_format_lineage_refuses_unmerged_consecutive_segments() -> None:
    with pytest.raises(LineageError, match="must be merged"):
        format_lineage((Segment("wit", D(1)), Segment("wit", D(1))))


def test_parse_lineage_empty() -> None:
    assert parse_lineage("") == ()


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("12L_64HD_8H_512I_128T_cc12m-1E", "12L_64HD_8H_512I_128T_cc12m_1E"),
        ("12L_64HD_8H_512I_128T_cc12m_2E_wit_1E", "12L_64HD_8H_512I_128T_cc12m-2E_wit-1E"),
        ("12L_64HD_8H_512I_128T_cc12m-1E_cc12m-1E", "12L_64HD_8H_512I_128T_cc12m_2E"),
        ("12L_64HD_8H_512I_128T_wit_1.50E", "12L_64HD_8H_512I_128T_wit_1.5E"),
        ("12L_64HD_8H_512I_128T_wit_1.0E", "12L_64HD_8H_512I_128T_wit_1E"),
        ("12L_64HD_8H_512I_128T_wit_01E", "12L_64HD_8H_512I_128T_wit_1E"),
        ("12L_64HD_8H_512I_128T_wit_.5E", "12L_64HD_8H_512I_128T_wit_0.5E"),
        ("12L_64HD_8H_512I_128T_Wit_1e", "12L_64HD_8H_512I_128T_wit_1E"),
        ("12L_8H_64HD_512I_128T_cc12m_1E", "12L_64HD_8H_512I_128T_cc12m_1E"),
        ("012L_64hd_8H_512I_128T", "12L_64HD_8H_512I_128T"),
        ("12L_64HD_8H_512I_128T_", "12L_64HD_8H_512I_128T"),
    ],
)
def test_non_canonical_names_are_refused_with_the_canonical_spelling(
    name: str, suggestion: str
) -> None:
    with pytest.raises(LineageError, match="not in canonical form") as err:
        parse_name(name)
    assert f"did you mean {suggestion!r}" in str(err.value)
    assert str(parse_name(suggestion)) == suggestion


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is empty"),
        ("dalle.pt", "does not start with the five architecture fields"),
        ("12L_64HD_8H_512I_cc12m_1E", r"missing or malformed: <text_seq_len>T"),
        ("12L_64HD_8H_0I_128T", "dim is 0"),
        ("12L_64HD_8H_512I_128T_cc12m", "does not pair each dataset with an epoch count"),
        ("12L_64HD_8H_512I_128T_c.c_1E", r"dataset name 'c.c' .* must match \[a-z0-9\]\+"),
        ("12L_64HD_8H_512I_128T_cc12m_1", "epoch count '1' .* followed by E"),
        ("12L_64HD_8H_512I_128T_cc12m_0E", "must be greater than 0"),
        ("12L_64HD_8H_512I_128T_cc12m_0.125E", "at most two"),
        ("12L_64HD_8H_512I_128T_cc12m_1.5.5E", "followed by E"),
        ("other/12L_64HD_8H_512I_128T", "only prefix allowed is a family folder"),
        ("taming/x/12L_64HD_8H_512I_128T", "only prefix allowed is a family folder"),
    ],
)
def test_malformed_names_say_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(LineageError, match=message):
        parse_name(name)


def test_parse_lineage_refuses_non_canonical_with_suggestion() -> None:
    with pytest.raises(LineageError, match="write it as 'cc12m_1E'"):
        parse_lineage("cc12m-1E")


# Properties

datasets = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
epochs = st.decimals(min_value=D("0.01"), max_value=D(500), places=2)
archs = st.builds(
    Architecture,
    depth=st.integers(1, 128),
    dim_head=st.integers(1, 512),
    heads=st.integers(1, 64),
    dim=st.integers(1, 8192),
    text_seq_len=st.integers(1, 1024),
)


@st.composite
def lineages(draw: st.DrawFn) -> tuple[Segment, ...]:
    segments: tuple[Segment, ...] = ()
    for _ in range(draw(st.integers(0, 5))):
        segments = extend(segments, draw(datasets), draw(epochs))
    return segments


@given(arch=archs, lineage=lineages())
def test_format_parse_round_trip(arch: Architecture, lineage: tuple[Segment, ...]) -> None:
    name = model_name(arch, lineage)
    parsed = parse_name(name)
    assert str(parsed) == name
    assert parsed == ModelName(arch, lineage)
    assert parse_name(f"custom/{name}.pt") == parsed


@given(lineage=lineages(), dataset=datasets, a=epochs, b=epochs)
def test_extension_is_associative_on_one_dataset(
    lineage: tuple[Segment, ...], dataset: str, a: Decimal, b: Decimal
) -> None:
    assert extend(extend(lineage, dataset, a), dataset, b) == extend(lineage, dataset, a + b)


@given(lineage=lineages(), dataset=datasets, a=epochs)
def test_extension_adds_exactly_the_epochs(
    lineage: tuple[Segment, ...], dataset: str, a: Decimal
) -> None:
    extended = extend(lineage, dataset, a)
    assert sum(s.epochs for s in extended) == sum(s.epochs for s in lineage) + a
    assert extended[-1].dataset == dataset


name_alphabet = st.sampled_from(list("0123456789_-.eELHDITcw/") + ["wit", "cc12m", "HD", "pt"])


@given(text=st.lists(name_alphabet, max_size=30).map("".join))
def test_any_text_parses_canonically_or_raises_lineage_error(text: str) -> None:
    try:
        parsed = parse_name(text)
    except LineageError:
        return
    assert str(parsed) == text.removesuffix(".pt").split("/")[-1]
