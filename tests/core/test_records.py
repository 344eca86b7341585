"""Record validation, MaskStrategy.check_config messages and infer_params."""

from __future__ import annotations

import functools
import keyword
import re
import string
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actsparse.core import (
    COMBINE_OPS,
    ActsparseError,
    AggregateStrategy,
    ConfigError,
    MaskStrategy,
    ReduceStrategy,
    Serializer,
    infer_params,
    split_sparse_config,
)


def _ident(x: Any) -> Any:
    return x


def _fold(acc: Any, x: Any) -> Any:
    return acc


# For each record type: a factory that builds a valid record, overriding one field.
FACTORIES: dict[str, Callable[..., Any]] = {
    "AggregateStrategy": lambda **kw: AggregateStrategy(**{"name": "agg", "fn": _fold, **kw}),
    "ReduceStrategy": lambda **kw: ReduceStrategy(**{"name": "red", "fn": _ident, **kw}),
    "MaskStrategy": lambda **kw: MaskStrategy(**{"name": "msk", "fn": _ident, **kw}),
    "Serializer": lambda **kw: Serializer(
        **{"name": "ser", "dumps": _ident, "loads": _ident, **kw}
    ),
}

CALLABLE_FIELDS = [
    ("AggregateStrategy", "fn"),
    ("AggregateStrategy", "init"),
    ("AggregateStrategy", "finalize"),
    ("ReduceStrategy", "fn"),
    ("MaskStrategy", "fn"),
    ("Serializer", "dumps"),
    ("Serializer", "loads"),
    ("AggregateStrategy", "check"),
    ("MaskStrategy", "check"),
]

# Fields that attrs checks with instance_of: (record type, field, a wrong value).
TYPED_FIELDS = [
    ("AggregateStrategy", "elementwise", 1),
    ("AggregateStrategy", "description", None),
    ("ReduceStrategy", "description", b"bytes"),
    ("MaskStrategy", "description", 3),
    ("Serializer", "binary", "yes"),
    ("Serializer", "suffix", None),
    ("Serializer", "description", ["x"]),
]

BAD_NAMES: list[object] = ["", " ", " lead", "trail ", "\tboth\n", None, 3, b"bytes", ["x"]]


# ------------------------------------------------------------------- names


@pytest.mark.parametrize("record", list(FACTORIES))
@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_bad_name_is_refused_naming_the_field(record: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"\b{record}\.name\b") as info:
        FACTORIES[record](name=bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("record", list(FACTORIES))
@given(
    core=st.text(min_size=1).filter(lambda s: s == s.strip()),
    pad=st.sampled_from([" ", "\t", "\n", "  \r\n"]),
    where=st.sampled_from(["left", "right", "both"]),
)
def test_surrounding_whitespace_is_refused(record: str, core: str, pad: str, where: str) -> None:
    name = {"left": pad + core, "right": core + pad, "both": pad + core + pad}[where]
    with pytest.raises(ConfigError, match=rf"{record}\.name"):
        FACTORIES[record](name=name)


@pytest.mark.parametrize("record", list(FACTORIES))
@given(name=st.text(min_size=1).filter(lambda s: s == s.strip()))
def test_any_stripped_nonempty_name_is_accepted(record: str, name: str) -> None:
    assert FACTORIES[record](name=name).name == name


# --------------------------------------------------------------- callables


@pytest.mark.parametrize(("record", "field"), CALLABLE_FIELDS)
@pytest.mark.parametrize("bad", [0, "torch.add", [], torch.zeros(1)], ids=repr)
def test_non_callable_is_refused_naming_the_field(record: str, field: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"\b{record}\.{field} must be callable"):
        FACTORIES[record](**{field: bad})


@pytest.mark.parametrize(("record", "field"), CALLABLE_FIELDS)
def test_callables_of_every_kind_are_accepted(record: str, field: str) -> None:
    class CallMe:
        def __call__(self, *args: Any) -> Any:
            return args

    for fn in (torch.add, functools.partial(_fold, 0), CallMe(), lambda *a: a):
        assert getattr(FACTORIES[record](**{field: fn}), field) is fn


@pytest.mark.parametrize("field", ["init", "finalize"])
def test_optional_callables_default_to_none(field: str) -> None:
    record = AggregateStrategy(name="agg", fn=_fold, **{field: None})
    assert getattr(record, field) is None
    assert record.elementwise is False


@pytest.mark.parametrize(("record", "field", "bad"), TYPED_FIELDS)
def test_wrongly_typed_field_is_refused_naming_the_field(
    record: str, field: str, bad: object
) -> None:
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        FACTORIES[record](**{field: bad})


@pytest.mark.parametrize(("record", "field", "bad"), TYPED_FIELDS)
def test_wrongly_typed_field_raises_an_actsparse_error(
    record: str, field: str, bad: object
) -> None:
    with pytest.raises(ActsparseError):
        FACTORIES[record](**{field: bad})


def test_records_are_frozen() -> None:
    record = MaskStrategy(name="m", fn=_ident)
    with pytest.raises(AttributeError):
        record.name = "other"  # type: ignore[misc]


def test_records_call_their_functions() -> None:
    calls: list[tuple[Any, ...]] = []

    def mask(data: Any, **config: Any) -> str:
        calls.append((data, config))
        return "mask"

    assert MaskStrategy(name="m", fn=mask)("data", level=1) == "mask"
    assert calls == [("data", {"level": 1})]
    assert AggregateStrategy(name="a", fn=lambda a, x: a + x)(2, 3) == 5
    assert ReduceStrategy(name="r", fn=lambda t: t * 2)(4) == 8


# ------------------------------------------------------------------ params

identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
non_identifiers = st.one_of(
    st.sampled_from(["", "1x", "with space", "a-b", "a.b", "é-x"]),
    st.text(alphabet=string.punctuation, min_size=1, max_size=4),
).filter(lambda s: not s.isidentifier())


@pytest.mark.parametrize("field", ["params", "required"])
@given(good=st.frozensets(identifiers, max_size=3), bad=non_identifiers)
def test_non_identifier_keys_are_refused_naming_the_field(
    field: str, good: frozenset[str], bad: str
) -> None:
    keys = [*good, bad]
    kwargs: dict[str, Any] = {field: keys}
    if field == "required":
        kwargs["params"] = None
    with pytest.raises(ConfigError, match=rf"MaskStrategy\.{field}\b") as info:
        MaskStrategy(name="m", fn=_ident, **kwargs)
    assert repr(bad) in str(info.value)
    for key in good:
        assert repr(key) not in str(info.value).split("got", 1)[1]


@pytest.mark.parametrize("field", ["params", "required"])
@pytest.mark.parametrize("bad", [3, None, b"key"], ids=repr)
def test_non_string_keys_are_refused(field: str, bad: object) -> None:
    kwargs: dict[str, Any] = {"params": None, field: ["ok", bad]}
    with pytest.raises(ConfigError, match=rf"MaskStrategy\.{field}\b"):
        MaskStrategy(name="m", fn=_ident, **kwargs)


@given(params=st.frozensets(identifiers, max_size=4), extra=st.frozensets(identifiers, max_size=4))
def test_required_must_be_a_subset_of_params(params: frozenset[str], extra: frozenset[str]) -> None:
    required = params | extra
    missing = required - params
    if missing:
        with pytest.raises(ConfigError, match=r"MaskStrategy\.required") as info:
            MaskStrategy(name="m", fn=_ident, params=params, required=required)
        assert "MaskStrategy.params" in str(info.value)
        for key in missing:
            assert key in str(info.value)
    else:
        record = MaskStrategy(name="m", fn=_ident, params=params, required=required)
        assert record.required == required


def test_required_is_free_when_params_is_none() -> None:
    record = MaskStrategy(name="m", fn=_ident, params=None, required=["a", "b"])
    assert record.params is None
    assert record.required == frozenset({"a", "b"})


@given(keys=st.lists(identifiers, max_size=5))
def test_params_are_converted_to_frozensets(keys: list[str]) -> None:
    record = MaskStrategy(name="m", fn=_ident, params=keys, required=keys[:1])
    assert record.params == frozenset(keys)
    assert isinstance(record.params, frozenset)
    assert record.required == frozenset(keys[:1])
    assert isinstance(record.required, frozenset)


def test_a_single_string_is_one_key() -> None:
    record = MaskStrategy(name="m", fn=_ident, params="level", required="level")
    assert record.params == frozenset({"level"})
    assert record.required == frozenset({"level"})


def test_defaults_accept_any_key() -> None:
    record = MaskStrategy(name="m", fn=_ident)
    assert record.params is None
    assert record.required == frozenset()


# ------------------------------------------------------------ check_config


@given(
    params=st.none() | st.frozensets(identifiers, max_size=4),
    required_pick=st.frozensets(identifiers, max_size=3),
    config_keys=st.frozensets(identifiers, max_size=5),
    layer=st.text(min_size=1, max_size=10),
    name=st.text(min_size=1, max_size=10).filter(lambda s: s == s.strip()),
)
def test_check_config_raises_iff_a_key_is_unknown_or_missing(
    params: frozenset[str] | None,
    required_pick: frozenset[str],
    config_keys: frozenset[str],
    layer: str,
    name: str,
) -> None:
    required = required_pick if params is None else required_pick & params
    record = MaskStrategy(name=name, fn=_ident, params=params, required=required)
    config = dict.fromkeys(config_keys, 0.5)
    unknown = set() if params is None else set(config_keys) - params
    missing = set(required) - set(config_keys)
    if not unknown and not missing:
        record.check_config(config, layer=layer)
        return
    with pytest.raises(ConfigError) as info:
        record.check_config(config, layer=layer)
    message = str(info.value)
    assert f"layer {layer!r}" in message
    assert f"mask strategy {name!r}" in message
    for key in unknown:
        assert repr(key) in message
    for key in missing:
        assert repr(key) in message
    if unknown:
        assert "unknown key" in message
    if missing:
        assert "missing key" in message
    accepts = message.rsplit("it accepts", 1)[1]
    if params is None:
        assert "any key" in accepts
    elif params:
        for key in params:
            assert repr(key) in accepts
    else:
        assert "no keys" in accepts


def test_check_config_message_example() -> None:
    record = MaskStrategy(
        name="magnitude", fn=_ident, params={"sparsity_level"}, required={"sparsity_level"}
    )
    with pytest.raises(ConfigError) as info:
        record.check_config({"sparsity": 0.5}, layer="features.0")
    message = str(info.value)
    assert "'features.0'" in message
    assert "'magnitude'" in message
    assert re.search(r"unknown key\(s\) 'sparsity'", message)
    assert re.search(r"missing key\(s\) 'sparsity_level'", message)
    assert message.endswith("it accepts 'sparsity_level'")


# ------------------------------------------------------------- value checks


def _level_check(options: Any) -> None:
    level = options.get("level")
    if not isinstance(level, float):
        raise ConfigError(f"level must be a float, got {level!r}")


def test_a_value_check_runs_after_the_key_check_and_names_layer_strategy_and_key() -> None:
    record = MaskStrategy(
        name="levelled", fn=_ident, params={"level"}, required={"level"}, check=_level_check
    )
    record.check_config({"level": 0.5}, layer="a.b")
    with pytest.raises(ConfigError) as info:
        record.check_config({"level": "0.5"}, layer="a.b")
    assert str(info.value) == (
        "layer 'a.b': sparse_config for mask strategy 'levelled': level must be a float, got '0.5'"
    )
    with pytest.raises(ConfigError, match=r"missing key\(s\) 'level'"):
        record.check_config({}, layer="a.b")  # the key check comes first


def test_split_sparse_config_checks_both_strategies_values() -> None:
    aggregate = AggregateStrategy(name="agg", fn=_fold, params={"level"}, check=_level_check)
    mask = MaskStrategy(name="msk", fn=_ident, params={"k"}, check=lambda o: None)
    assert split_sparse_config(aggregate, mask, {"level": 1.0, "k": 1}, layer="x") == (
        {"level": 1.0},
        {"k": 1},
    )
    with pytest.raises(ConfigError, match=r"^layer 'x': sparse_config for aggregate strategy "):
        split_sparse_config(aggregate, mask, {"level": 1, "k": 1}, layer="x")


@pytest.mark.parametrize("raised", [TypeError("'<' not supported"), ValueError("bad")])
def test_a_check_that_raises_a_builtin_error_is_reported_as_a_config_error(
    raised: Exception,
) -> None:
    def check(options: Any) -> None:
        raise raised

    record = MaskStrategy(name="strict", fn=_ident, check=check)
    with pytest.raises(ConfigError, match=r"layer 'x': sparse_config for mask strategy 'strict'"):
        record.check_config({}, layer="x")


def test_a_check_receives_a_copy() -> None:
    def check(options: Any) -> None:
        options["sneaky"] = 1

    config = {"k": 1}
    MaskStrategy(name="m", fn=_ident, check=check).check_config(config, layer="x")
    assert config == {"k": 1}


def test_check_config_with_no_accepted_keys() -> None:
    record = MaskStrategy(name="sign", fn=_ident, params=())
    record.check_config({}, layer="fc")
    with pytest.raises(ConfigError, match="it accepts no keys"):
        record.check_config({"level": 1}, layer="fc")


# ------------------------------------------------------------ infer_params


def _positional(data, level):  # type: ignore[no-untyped-def]
    return data


def _defaults(data, a=1, *, b, c=2):  # type: ignore[no-untyped-def]
    return data


def _var_kw(data, level, **kwargs):  # type: ignore[no-untyped-def]
    return data


def _pos_only(data, /, level, other=0):  # type: ignore[no-untyped-def]
    return data


def _var_args(data, *rest, level=0.5):  # type: ignore[no-untyped-def]
    return data


def _data_only(data):  # type: ignore[no-untyped-def]
    return data


class _Callable:
    def __call__(self, data, threshold, *, scale=1.0):  # type: ignore[no-untyped-def]
        return data


class _WithMethod:
    def mask(self, data, keep):  # type: ignore[no-untyped-def]
        return data


INFER_CASES: list[tuple[str, Callable[..., Any], frozenset[str] | None, frozenset[str]]] = [
    ("positional", _positional, frozenset({"level"}), frozenset({"level"})),
    ("defaults", _defaults, frozenset({"a", "b", "c"}), frozenset({"b"})),
    ("var_kw", _var_kw, None, frozenset({"level"})),
    ("pos_only", _pos_only, frozenset({"level", "other"}), frozenset({"level"})),
    ("var_args", _var_args, frozenset({"level"}), frozenset()),
    ("data_only", _data_only, frozenset(), frozenset()),
    ("lambda", lambda t, level: t, frozenset({"level"}), frozenset({"level"})),
    ("callable_object", _Callable(), frozenset({"threshold", "scale"}), frozenset({"threshold"})),
    ("bound_method", _WithMethod().mask, frozenset({"keep"}), frozenset({"keep"})),
    ("partial", functools.partial(_positional, level=0.3), frozenset({"level"}), frozenset()),
    ("no_signature", torch.add, None, frozenset()),
]


@pytest.mark.parametrize(
    ("fn", "params", "required"),
    [case[1:] for case in INFER_CASES],
    ids=[c[0] for c in INFER_CASES],
)
def test_infer_params(
    fn: Callable[..., Any], params: frozenset[str] | None, required: frozenset[str]
) -> None:
    assert infer_params(fn) == (params, required)


@given(
    names=st.lists(
        identifiers.filter(lambda s: s != "data" and not keyword.iskeyword(s)),
        unique=True,
        max_size=5,
    ),
    data=st.data(),
)
def test_infer_params_on_generated_signatures(names: list[str], data: st.DataObject) -> None:
    with_default = [data.draw(st.booleans()) for _ in names]
    keyword_only = [data.draw(st.booleans()) for _ in names]
    var_kw = data.draw(st.booleans())
    # Parameters without a default must come before those with one, among positional ones.
    positional = [
        (n, d) for n, d, k in zip(names, with_default, keyword_only, strict=True) if not k
    ]
    positional.sort(key=lambda item: item[1])
    kw_only = [(n, d) for n, d, k in zip(names, with_default, keyword_only, strict=True) if k]
    parts = ["data"]
    parts += [f"{n}=0" if d else n for n, d in positional]
    if kw_only:
        parts.append("*")
        parts += [f"{n}=0" if d else n for n, d in kw_only]
    if var_kw:
        parts.append("**extra")
    namespace: dict[str, Any] = {}
    exec(f"def fn({', '.join(parts)}):\n    return data\n", namespace)
    params, required = infer_params(namespace["fn"])
    assert params == (None if var_kw else frozenset(names))
    assert required == frozenset(n for n, d in zip(names, with_default, strict=True) if not d)


# ------------------------------------------------------------------ combine


@pytest.mark.parametrize(
    "bad",
    ["mean", "", ["max", "avg"], [], ("sum", 1), 1, True, b"sum", {"sum"}],
    ids=repr,
)
def test_bad_combine_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"AggregateStrategy\.combine") as info:
        AggregateStrategy(name="agg", fn=_fold, combine=bad)
    assert "'sum', 'max', 'min'" in str(info.value)


@given(st.one_of(st.sampled_from(COMBINE_OPS), st.lists(st.sampled_from(COMBINE_OPS), min_size=1)))
def test_named_combines_are_accepted_and_lists_become_tuples(spec: Any) -> None:
    record = AggregateStrategy(name="agg", fn=_fold, combine=spec)
    assert record.combine == (tuple(spec) if isinstance(spec, list) else spec)
    assert record.bind({}).combine == record.combine


def test_combine_defaults_to_none_and_is_keyword_compatible() -> None:
    record = AggregateStrategy("agg", _fold, None, None, False, None, (), (), "text")
    assert record.combine is None
    assert record.bind({}).combine is None


def test_a_callable_combine_gets_the_options_bound() -> None:
    seen: list[Any] = []

    def combine(acc: Any, group: Any, scale: int = 1) -> Any:
        seen.append((acc, group, scale))
        return acc

    record = AggregateStrategy(name="agg", fn=_fold, combine=combine, params={"scale"})
    bound = record.bind({"scale": 3}).combine
    assert callable(bound)
    bound("acc", "group")
    assert seen == [("acc", "group", 3)]
